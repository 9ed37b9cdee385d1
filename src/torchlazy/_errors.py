"""The torchlazy exceptions: one root, a few precise kinds.

Every message names where (a module path such as `encoder.layers.3.norm`),
what was expected, what was seen, and what to do.
"""

from __future__ import annotations

__all__ = [
    "listed",
    "ArgumentError",
    "CheckpointError",
    "DeferredError",
    "DtypeError",
    "LazyError",
    "NotBuiltError",
    "ShapeError",
]


class LazyError(Exception):
    """Root of every error torchlazy raises on purpose."""


class ArgumentError(LazyError, TypeError, ValueError):
    """A torchlazy function got an argument it cannot use (a wrong type or value).

    Also a `TypeError` and a `ValueError`, so code catching the built-in errors keeps working.
    """


class NotBuiltError(LazyError, ValueError, RuntimeError):
    """A lazy layer's parameter was used before its sizes were known.

    Also a `ValueError` and a `RuntimeError`, the errors PyTorch raises for its
    own uninitialized parameters, so existing `except` clauses keep working.
    """


class ShapeError(LazyError, ValueError, RuntimeError):
    """An input, a state dict or a checkpoint disagrees with a module's sizes.

    Also a `ValueError` and a `RuntimeError` (what PyTorch raises for shape mismatches).
    """


class DtypeError(LazyError, TypeError, RuntimeError):
    """An input's dtype disagrees with a module's (a float64 input to a float32 layer).

    Also a `RuntimeError` (what PyTorch's kernels raise for it) and a `TypeError`.
    """


class DeferredError(LazyError, RuntimeError):
    """Deferred construction or materialization cannot go on."""


class CheckpointError(LazyError, ValueError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model."""


def listed(names: list[str], most: int = 3) -> str:
    """Names for a message, in backticks: the first `most`, then `...` if there are more.

    >>> listed(["a.weight", "a.bias", "b.weight", "b.bias"])
    '`a.weight`, `a.bias`, `b.weight`, ...'
    """
    return ", ".join(f"`{n}`" for n in names[:most]) + (", ..." if len(names) > most else "")
