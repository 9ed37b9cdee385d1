"""torchlazy: lazy shapes, deferred construction, exact materialization for PyTorch."""

from . import nn
from ._costs import CostError, MemoryEstimate, estimate_memory
from ._deferred import deferred, deferred_tensors, is_deferred
from ._errors import (
    ArgumentError,
    CheckpointError,
    DeferredError,
    DtypeError,
    LazyError,
    NotBuiltError,
    ShapeError,
)
from ._infer import build
from ._lazy import LazyModule, is_built, lazy
from ._materialize import materialize
from ._save import save
from ._spec import Spec
from ._summary import Row, Summary, summary

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "CostError",
    "DeferredError",
    "DtypeError",
    "LazyError",
    "LazyModule",
    "MemoryEstimate",
    "NotBuiltError",
    "Row",
    "ShapeError",
    "Spec",
    "Summary",
    "build",
    "deferred",
    "deferred_tensors",
    "estimate_memory",
    "is_built",
    "is_deferred",
    "lazy",
    "materialize",
    "save",
    "nn",
    "summary",
]
__version__ = "0.1.0"
