"""Runs on fake tensors that leave the model as they found it.

Summaries, cost estimates and `tl.build` run a model's forward on fake tensors. Model code does more than compute:
it sets attributes, registers sub-modules, buffers and hooks on a first call, appends to lists, reassigns `.data`,
freezes parameters, and a custom autograd Function may keep its graph alive. `attributes_kept` puts all of that
back; `fresh_fakes` gives the run tensors of its own in place of the model's, so that gradients, buffer updates and
any leaked graph land on those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from . import _lazy
from . import _torch_compat as tc
from ._modtree import MODULE_TABLES

__all__ = ["attributes_kept", "built_by_lazy", "fresh_fakes"]


@contextlib.contextmanager
def attributes_kept(
    module: nn.Module, keep: Callable[[nn.Module], bool] = lambda m: True, builds: bool = False
) -> Iterator[None]:
    """Whatever a forward sets on the modules (`self.last = y`, a flag, a sub-module, buffer or hook registered on a
    first call, `p.data = ...`, `p.requires_grad_(False)`, an entry in a list or dict the module holds) is put back
    as it was on exit, for every module `keep` accepts: a run on fake tensors leaves the model as it found it.
    `builds`: lazy layers build meanwhile, and what they register in a list or dict stays."""
    modules = [m for m in {id(m): m for m in module.modules()}.values() if keep(m)]
    # each module's attributes, and the contents of its tables (parameters, buffers, sub-modules, hooks), put
    # back into the very objects: something may hold a module's `_parameters`
    saved = [(m, type(m), dict(m.__dict__), [(t, t.copy()) for t in _tables(m)]) for m in modules]
    shared = _containers_of(m for m in module.modules() if not keep(m))  # a lazy build may write into those
    held_lists = [(v, list(v)) for m in modules for v in m.__dict__.values() if type(v) is list and id(v) not in shared]
    held_dicts = [
        (v, dict(v))
        for m in modules
        for k, v in m.__dict__.items()
        if type(v) is dict and k not in MODULE_TABLES and id(v) not in shared
    ]
    held = {id(t): t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None}
    tensors = [(t, t.data, t.untyped_storage(), t.requires_grad) for t in held.values() if _has_storage(t)]
    try:
        yield
    finally:
        for m, cls, attributes, tables in saved:
            if m.__dict__.keys() != attributes.keys() or any(m.__dict__[k] is not v for k, v in attributes.items()):
                m.__dict__.clear()
                m.__dict__.update(attributes)
            for table, content in tables:
                table.clear()
                table.update(content)
            if type(m) is not cls:
                m.__class__ = cls
        # a list or dict the module holds, appended to or written by the forward; where lazy layers build
        # (`builds`), only one left holding fake tensors: what a `LazyModule.build` registers there stays
        for items, contents in held_lists:
            if not builds or _holds_fakes(items):
                items[:] = contents
        for mapping, entries in held_dicts:
            if not builds or _holds_fakes(list(mapping.values())):
                mapping.clear()
                mapping.update(entries)
        for t, data, storage, requires_grad in tensors:
            if t.untyped_storage()._cdata != storage._cdata:  # `.data` reassigned: the real values were let go
                t.data = data
            if t.requires_grad != requires_grad and t.is_leaf:
                t.requires_grad_(requires_grad)


def _tables(module: nn.Module) -> list[Any]:
    """The module's own tables: parameters, buffers, sub-modules, the non-persistent set, every hook table."""
    return [v for k, v in module.__dict__.items() if k in MODULE_TABLES and isinstance(v, (dict, set))]


def fresh_fakes(module: nn.Module, mode: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fresh fake tensors of `mode` for the module's parameters and buffers, by name (tied ones shared; unbuilt
    placeholders left out): put in place for a run (`tc.tensors_in_place`), gradients, optimizer state, buffer
    updates and any graph the run keeps land on those, never on the model's own."""
    fresh: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fresh:
            with mode:
                new = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
            fresh[id(t)] = new.requires_grad_(t.requires_grad) if t.is_floating_point() else new
        return fresh[id(t)]

    with torch._C.DisableTorchFunctionSubclass():
        params = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if not _lazy.is_placeholder(p)]
        buffers = [(n, b) for n, b in module.named_buffers(remove_duplicate=False) if not _lazy.is_placeholder(b)]
    return {name: fake(p) for name, p in params}, {name: fake(b) for name, b in buffers}


def built_by_lazy(module: nn.Module) -> set[int]:
    """The modules a build may change: unbuilt lazy layers and `LazyModule`s, and everything under them (a
    `LazyModule.build` fills its own `ModuleList`s and sets up its children)."""
    ids: set[int] = set()
    for sub in module.modules():
        if id(sub) not in ids and (_lazy.is_lazy_layer(sub) or _lazy.is_lazy_module(sub)):
            ids.update(id(m) for m in sub.modules())
    return ids


def _holds_fakes(items: list[Any]) -> bool:
    return any(isinstance(x, torch.Tensor) and tc.is_fake(x) for x in items)


def _containers_of(modules: Iterable[nn.Module]) -> set[int]:
    """Ids of the plain lists and dicts these modules hold, directly or through a module kept as a plain attribute
    (a parent's registry a `LazyModule` appends to in `build`)."""
    found: set[int] = set()
    for m in modules:
        for k, v in m.__dict__.items():
            if k in MODULE_TABLES:
                continue
            if type(v) in (list, dict):
                found.add(id(v))
            elif isinstance(v, nn.Module):
                found.update(id(x) for x in v.__dict__.values() if type(x) in (list, dict))
    return found


def _has_storage(t: torch.Tensor) -> bool:
    """A plain or fake tensor (not an unbuilt lazy placeholder, not a wrapper subclass such as a DTensor)."""
    return not _lazy.is_placeholder(t) and (type(t) in (torch.Tensor, nn.Parameter) or tc.is_fake(t))
