"""dropout-service: eval and Monte-Carlo-dropout predictions for PyTorch MLPs over HTTP."""

__version__ = "0.1.0"
