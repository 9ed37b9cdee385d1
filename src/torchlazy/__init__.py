"""torchlazy: lazy shapes, deferred construction, exact materialization for PyTorch."""

from ._deferred import deferred, deferred_tensors, is_deferred
from . import nn
from ._errors import CheckpointError, DeferredError, LazyError, NotBuiltError, ShapeError
from ._lazy import LazyModule, is_built, lazy
from ._materialize import materialize

__all__ = [
    "CheckpointError",
    "DeferredError",
    "LazyError",
    "LazyModule",
    "NotBuiltError",
    "ShapeError",
    "deferred",
    "deferred_tensors",
    "is_built",
    "is_deferred",
    "lazy",
    "materialize",
    "nn",
]
__version__ = "0.1.0"
