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


def _modules_on_stack() -> list[nn.Module]:
    """The modules whose methods are running (each frame's `self`), innermost first."""
    held: list[nn.Module] = []
    frame = _outer_frame(0)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and (not held or held[-1] is not owner):
            held.append(owner)
        frame = frame.f_back  # type: ignore[assignment]
    return held


def _path_in(outer: nn.Module, module: nn.Module) -> str | None:
    for name, sub in outer.named_modules(remove_duplicate=False):
        if sub is module and name:
            return name
    return None


def _handed_path(module: nn.Module) -> str | None:
    """`module`'s path in a model a running function was handed (`fully_shard(layer)` called from `shard(model)`):
    from the innermost function frame whose locals hold a model containing it, each such model then replaced by
    one an outer frame holds that contains it. None where the models that remain give different paths (a frame
    holding two models that share the layer does not say which one is meant)."""
    current: list[nn.Module] = []
    frame = _outer_frame(0)
    while frame is not None:
        if frame.f_code.co_name != "<module>":
            held = {id(v): v for v in frame.f_locals.values() if isinstance(v, nn.Module) and v is not module}
            holding = [h for h in held.values() if _path_in(h, module) is not None]
            roots = [h for h in holding if not any(o is not h and _contains(o, h) for o in holding)]
            if not current:
                current = roots
            else:
                wider: list[nn.Module] = []
                for r in current:
                    outer = [h for h in roots if h is not r and _contains(h, r)]
                    if len({_path_in(h, module) for h in outer}) > 1:
                        return None  # two models an outer frame holds contain it at different paths: no guess
                    wider.append(outer[0] if outer else r)
                current = list({id(m): m for m in wider}.values())
        frame = frame.f_back  # type: ignore[assignment]
    paths = {_path_in(m, module) for m in current}
    return paths.pop() if len(paths) == 1 else None


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def module_path(module: nn.Module) -> str:
    """The best name for `module`: its path in the model when it can be found (from the forwards running, else
    from a model a running function was handed, else from the model last walked from its root)."""
    for outer in reversed(_modules_on_stack()):
        if outer is module:
            break
        path = _path_in(outer, module)
        if path is not None:
            return path
    path = _handed_path(module) or _known.get(module)
    return path if path else type(module).__name__


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
