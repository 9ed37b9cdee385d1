"""Where is this module? Names for error messages, found without bookkeeping.

PyTorch modules do not know their parents. The path of a module in a model is
known to whoever walks the model from its root (build, summary, materialize:
they record it with `remember_paths`), and otherwise can be recovered from the
Python call stack, which holds the modules whose forward is running.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

_known: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def remember_paths(root: nn.Module, prefix: str = "") -> None:
    """Record the path of every module under `root` for later messages."""
    for name, module in root.named_modules(prefix=prefix, remove_duplicate=False):
        if name or module not in _known:
            _known[module] = name


def known_path(module: nn.Module) -> str | None:
    """The path recorded for `module` when its model was last walked from the root, if any."""
    return _known.get(module)


def attribute_path(owner: nn.Module, name: str) -> str:
    """`owner.name` as a path in the model last walked by `remember_paths` (just `name` at its root or where
    `owner` was not walked)."""
    prefix = _known.get(owner)
    return f"{prefix}.{name}" if prefix else name


def _outer_frame(depth: int) -> Any:
    """The frame `depth` levels above the caller of this function; None under `torch.compile`, whose tracer
    cannot walk frames (a forward of a deferred model compiled with it failed inside dynamo): the walks
    below then find nothing and the messages fall back to the paths last walked from a model's root."""
    if torch.compiler.is_compiling():
        return None
    return sys._getframe(depth + 2)


def _modules_on_stack(handed: bool = False) -> list[nn.Module]:
    """The modules whose methods are running (each frame's `self`), innermost first; with `handed`, the modules
    functions were handed instead (`fully_shard(model)`: the locals of function frames, not a script's globals),
    each once, where the outermost frame holds it."""
    held: list[nn.Module] = []
    frame = _outer_frame(0)
    while frame is not None:
        local = frame.f_locals
        if not handed:
            owner = local.get("self")
            if isinstance(owner, nn.Module) and (not held or held[-1] is not owner):
                held.append(owner)
        elif frame.f_code.co_name != "<module>":
            held += [value for value in local.values() if isinstance(value, nn.Module)]
        frame = frame.f_back  # type: ignore[assignment]
    if not handed:
        return held
    found: list[nn.Module] = []
    seen: set[int] = set()
    for module in reversed(held):
        if id(module) not in seen:
            seen.add(id(module))
            found.append(module)
    return found[::-1]


def module_path(module: nn.Module) -> str:
    """The best name for `module`: its path in the model when it can be found (from the forwards running, else
    from the models functions were handed, else from the model last walked from its root)."""
    for handed in (False, True):
        for outer in reversed(_modules_on_stack(handed)):
            if outer is module:
                break
            for name, sub in outer.named_modules(remove_duplicate=False):
                if sub is module and name:
                    return name
    known = _known.get(module)
    if known:
        return known
    return type(module).__name__


def constructing_module() -> str:
    """Describe the innermost module whose `__init__` is running, if any."""
    frame = _outer_frame(0)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                return f"`{type(owner).__qualname__}` (constructor at {where})"
        frame = frame.f_back  # type: ignore[assignment]
    return "the model"


def frames_include(codes: Iterable[object]) -> bool:
    """Whether any of the given code objects is running on this thread."""
    return innermost_frame(codes) is not None


def innermost_frame(codes: Iterable[object]) -> Any:
    """The innermost running frame of any of the given code objects on this thread, or None."""
    wanted = set(map(id, codes))
    if not wanted:
        return None
    frame = _outer_frame(0)
    while frame is not None:
        if id(frame.f_code) in wanted:
            return frame
        frame = frame.f_back  # type: ignore[assignment]
    return None
