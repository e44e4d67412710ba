"""dropout-service: eval and Monte-Carlo-dropout predictions for PyTorch MLPs over HTTP.

``service.save_torch_model`` writes a model folder from a trained torch module; it is
imported when first used, so that ``import service`` (and the client) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "save_torch_model"]

if TYPE_CHECKING:
    from service.core.importer import save_torch_model


def __getattr__(name: str) -> Any:
    if name == "save_torch_model":
        from service.core.importer import save_torch_model

        return save_torch_model
    raise AttributeError(f"module 'service' has no attribute {name!r}")
