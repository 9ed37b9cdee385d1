"""torchlazy: lazy shapes, deferred construction, exact materialization for PyTorch."""

from ._deferred import deferred, deferred_tensors, is_deferred
from ._errors import CheckpointError, DeferredError, LazyError, NotBuiltError, ShapeError
from ._materialize import materialize

__all__ = [
    "CheckpointError",
    "DeferredError",
    "LazyError",
    "NotBuiltError",
    "ShapeError",
    "deferred",
    "deferred_tensors",
    "is_deferred",
    "materialize",
]
__version__ = "0.1.0"
