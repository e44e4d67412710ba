"""The model itself: its config and plain torch module, the engine's tensor maths, the
repository of model folders, and the domain errors. No HTTP, no serving machinery."""
