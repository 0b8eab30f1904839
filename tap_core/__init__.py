"""TAP federation: what the server, the agents and the tools share.

``from tap_core import load_model`` loads a model exported with ``tap-client export``
(see :mod:`tap_core.inference`). It is imported on first use, so ``import tap_core``
stays cheap (no torch, no transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tap_core.inference import TapPredictor, load_model

__all__ = ["TapPredictor", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tap_core import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'tap_core' has no attribute {name!r}")
