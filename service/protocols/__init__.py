"""Front doors over the one data plane: REST v1 and REST v2 (the Open Inference Protocol)
over HTTP, with their schemas and error mapping; the tensor codec the v2 doors share."""
