"""Sharded materialization: FSDP2 (DTensor) parameters get only their local shard.

`fully_shard` on a deferred model replaces each parameter by a DTensor whose
local tensor is fake. Its values come from the record of the parameter it
replaced (kept per module at construction as `_torchlazy_origin`): for each
storage, the full tensor is replayed once, exactly, the local slice given by
the DTensor's mesh and placements is kept, and the full tensor is freed before
the next one. No rank ever holds more than its shards plus one full tensor.
A sharded parameter written after `fully_shard` (or whose source was written
after FSDP copied it) takes its values from its local tensor's own record.
With a checkpoint, each rank reads only its slices. The new local tensors are
handed to FSDP the way `Module.to_empty` would (`reset_sharded_param`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _counter, _rng
from . import _torch_compat as tc
from ._deferred import fake_attrs, origin_of, storage_of
from ._drawkernels import run_draw
from ._modtree import Placement, swap_all, unswappable
from ._record import (
    GENERATOR_LOCK,
    Const,
    Node,
    Record,
    TRef,
    contiguous_strides,
    counter_key,
    counter_law,
    draw_of,
    explicit_generators_kept,
    global_sets,
    law_marker,
    unflatten,
)

__all__ = ["sharded_targets", "materialize_shards"]


@dataclass
class Sharded:
    """A DTensor parameter FSDP registered, with no record: already real (to load or cast), or meta (a model
    built on the meta device, then sharded: only a checkpoint gives its values)."""

    path: str
    owners: list[tuple[nn.Module, str]]
    param: Any  # the DTensor parameter FSDP registered
    layouts: dict[Any, tuple[slice, ...]]  # slices by layout, shared by one call's shards

    @functools.cached_property
    def slices(self) -> tuple[slice, ...]:
        """The local slices of the full parameter, by the DTensor's mesh and placements."""
        p = self.param
        key = (tuple(p.shape), id(p.device_mesh), tuple(p.placements))
        found = self.layouts.get(key)
        if found is None:  # torch's computation: 0.2 ms, asked for every parameter, of a few shapes
            shape, offset = tc.local_shape_and_offset(p.shape, p.device_mesh, p.placements)
            found = self.layouts[key] = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        return found


@dataclass
class Shard(Sharded):
    """A DTensor parameter whose local tensor is deferred: its values come from a record."""

    record: Record = field(kw_only=True)
    ref: TRef = field(kw_only=True)  # the full tensor it is a slice of (`whole`: the local tensor itself)
    whole: bool = False  # `ref` is the local tensor itself, not the full parameter it is a slice of

    @functools.cached_property
    def kept(self) -> tuple[slice, ...]:
        """The local values' slices of `ref`: the layout's slices of the full parameter, or all of the local tensor."""
        return tuple(slice(0, n) for n in self.ref.size) if self.whole else self.slices


def sharded_targets(module: nn.Module, real: bool = False) -> list[Sharded]:
    """DTensor parameters whose local tensors are still fake (with their record) or meta (no record: only a
    checkpoint can give their values); with `real`, those already materialized too (to load or cast)."""
    DTensor = tc.dtensor_type()
    if DTensor is None:
        return []
    shards: dict[int, Sharded] = {}
    layouts: dict[Any, tuple[slice, ...]] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for name, p in owner._parameters.items():
            if not isinstance(p, DTensor):
                continue
            local = tc.dtensor_local(p)
            waiting = local.is_meta or tc.is_fake(local)
            if not (waiting or real):
                continue
            if id(p) in shards:
                shards[id(p)].owners.append((owner, name))
                continue
            original = origin_of(owner, name) if waiting else None
            origin = storage_of(original) if original is not None else None
            path = f"{prefix}.{name}" if prefix else name
            own = storage_of(local) if waiting else None
            shard: Sharded | None = None
            if original is not None and origin is not None:
                shard = Shard(path, [(owner, name)], p, layouts, record=origin[0], ref=TRef.of(origin[1], original))
            if own is not None and not (
                isinstance(shard, Shard) and _copied_untouched(shard, own[0], TRef.of(own[1], local))
            ):
                # no origin kept (a lazy layer sized in the block), or written since `fully_shard` copied it (or its
                # source written before the copy, after the block): the local tensor's own record holds its values
                shard = Shard(path, [(owner, name)], p, layouts, record=own[0], ref=TRef.of(own[1], local), whole=True)
            # real, or with nothing recorded: a checkpoint's values
            shards[id(p)] = shard if shard is not None else Sharded(path, [(owner, name)], p, layouts)
    return list(shards.values())


def _copied_untouched(shard: Shard, record: Record, local: TRef) -> bool:
    """Whether the local tensor `local` holds only what `fully_shard` put there: a new buffer, then one copy of
    this rank's slice of the parameter it replaced into the local tensor's elements (the rest of the buffer,
    FSDP's padding on the last ranks, left as made), with no write to either since. Then the slice of that
    parameter's record is its value; otherwise the storage's own record is (a write since `fully_shard`
    counts, a write to the replaced parameter after the copy does not, as in eager)."""
    sid = local.sid
    writers = record.storages[sid].writers if record is shard.record else None
    if not writers or len(writers) != 2 or all(made != sid for _, made in writers[0].outputs):
        return False
    copy = writers[1]
    # a copy into part of the buffer (the rows before the padding) reads the buffer too: it keeps the rest
    if copy.writes != (sid,) or set(copy.reads) - {sid} != {shard.ref.sid}:
        return False
    target = copy.leaves[0] if copy.leaves else None
    if not isinstance(target, TRef) or target.sid != sid:
        return False
    if (target.offset, target.size, target.stride) != (local.offset, local.size, local.stride):
        return False
    source = next((x for x in copy.leaves if isinstance(x, TRef) and x.sid == shard.ref.sid), None)
    origin = shard.ref
    offset = origin.offset + sum(s.start * step for s, step in zip(shard.slices, origin.stride))
    size = tuple(s.stop - s.start for s in shard.slices)
    if source is None or (source.offset, source.size, source.stride) != (offset, size, origin.stride):
        return False
    return record.storages[origin.sid].writers[-1].key < copy.key


def materialize_shards(
    module: nn.Module,
    shards: list[Sharded],
    placement: Placement,
    exact: bool,
    read_slice: Callable[[Sharded, tuple[slice, ...]], torch.Tensor | None] | None = None,
) -> None:
    """Give every shard its local values, then hand them to FSDP."""
    local: dict[int, torch.Tensor] = {}
    todo: list[Shard] = []
    for shard in shards:
        value = read_slice(shard, shard.slices) if read_slice is not None else None
        if value is not None:
            local[id(shard.param)] = value
        elif isinstance(shard, Shard):
            todo.append(shard)
        else:  # real already (cast or moved only); a meta one without a checkpoint value was refused up front
            local[id(shard.param)] = tc.dtensor_local(shard.param)
    by_record: dict[int, list[Shard]] = {}
    for shard in todo:
        by_record.setdefault(id(shard.record), []).append(shard)
    with GENERATOR_LOCK, explicit_generators_kept(shard.record for shard in todo):
        _replay_shards(by_record, local, placement.device, exact)
    _install(module, shards, local, placement)


def _replay_shards(by_record: dict[int, list[Shard]], local: dict[int, torch.Tensor], device: Any, exact: bool) -> None:
    saved = torch.default_generator.get_state()
    sets = global_sets()
    try:
        for group in by_record.values():
            record = group[0].record
            by_sid: dict[int, list[Shard]] = {}
            for shard in group:
                by_sid.setdefault(shard.ref.sid, []).append(shard)

            # only this rank's slice, where every operation on the tensor is elementwise
            for sid in list(by_sid):
                if len(by_sid[sid]) == 1:
                    shard = by_sid[sid][0]
                    value = _local_exact(record, shard) if exact else _local_only(record, shard, device or "cpu")
                    if value is not None:
                        local[id(by_sid.pop(sid)[0].param)] = value

            def on_ready(sid: int, storage: torch.UntypedStorage, by_sid: dict[int, list[Shard]] = by_sid) -> None:
                for shard in by_sid[sid]:
                    full = shard.ref.on(storage)
                    local[id(shard.param)] = full[shard.kept].clone()  # keep the slice, drop the rest

            # one storage at a time, in the order they are finished: one full tensor alive at most
            order = sorted(by_sid, key=lambda sid: record.storages[sid].writers[-1].key)
            for sid in order:
                record.evaluate([sid], device="cpu" if exact else (device or "cpu"), exact=exact, on_ready=on_ready)
    finally:
        if global_sets() != sets:  # an op with no `generator=` argument ran on the global generator
            torch.default_generator.set_state(saved)
        for group in by_record.values():
            group[0].record.release_scratch()


def _elementwise_closure(record: Record, ref: TRef) -> list[Node] | None:
    """The nodes that make the tensor `ref`, if they are a full overwrite followed by elementwise
    operations on that tensor alone (fills, draws, scaling): then any slice can be made alone."""
    nodes = record.closure([ref.sid], None)
    if not nodes or nodes[0].overwrites != ref.sid:
        return None
    for node in nodes:
        func = node.func
        if func is None or node.outputs or node.spec is None:
            return None
        if func is law_marker:  # an initializer's law (`trunc_normal_`): its samples overwrite each element alone
            if node.law is None:
                return None
        elif node.law is not None:
            return None
        elif not (torch.Tag.pointwise in func.tags or func.overloadpacket in _ELEMENTWISE_FILLS):  # type: ignore[attr-defined]
            return None
        for leaf in node.leaves:
            if isinstance(leaf, Const) or (isinstance(leaf, TRef) and leaf != ref):
                return None
    return nodes


def _flat_range(shard: Shard) -> tuple[int, int] | None:
    """The local slice as a range of flat elements, when it is one (rows of a contiguous tensor)."""
    ref = shard.ref
    if ref.stride != contiguous_strides(ref.size) or not ref.size:
        return None
    rest = shard.kept[1:]
    if any(s.start != 0 or s.stop != n for s, n in zip(rest, ref.size[1:])):
        return None
    row = math.prod(ref.size[1:])
    return shard.kept[0].start * row, shard.kept[0].stop * row


def _run_on_rows(
    nodes: list[Node], values: torch.Tensor, draw: Callable[[Node, tuple[Any, ...], dict[str, Any]], None]
) -> None:
    """Run an elementwise closure on `values` (a flat range of the tensor's elements) in place of the
    whole tensor; its random nodes and initializers' laws are made by `draw(node, args, kwargs)`."""
    with torch.no_grad():
        for node in nodes:
            assert node.spec is not None and node.func is not None
            args, kwargs = unflatten([values if isinstance(x, TRef) else x for x in node.leaves], node.spec)
            if node.stream is not None or node.func is law_marker:
                draw(node, args, kwargs)
            else:
                node.func(*args, **kwargs)


def _local_rows(record: Record, shard: Shard) -> tuple[list[Node], tuple[int, int]] | None:
    """The nodes that make the shard's tensor and the flat element range of the local slice, where a rank
    can make that range alone: every node elementwise over the whole tensor, the slice a range of rows."""
    nodes = _elementwise_closure(record, shard.ref)
    span = _flat_range(shard)
    return None if nodes is None or span is None else (nodes, span)


def _local_exact(record: Record, shard: Shard) -> torch.Tensor | None:
    """Eager's exact values of the local slice alone: each draw starts from a generator jumped to
    the slice's first word (the smallest covering range where a kernel works in blocks)."""
    ref = shard.ref
    rows = _local_rows(record, shard)
    if rows is None:
        return None
    nodes, (a, b) = rows
    draws = {id(n): draw_of(n) for n in nodes if n.stream is not None}
    if any(d is None or d.target != ref or d.align is None for d in draws.values()):
        return None
    numel = math.prod(ref.size)
    align = max([1, *(d.align for d in draws.values() if d is not None and d.align is not None)])
    start, stop = a // align * align, min(numel, -(-b // align) * align)
    if numel - align < stop < numel:  # ends among the last `align` elements, which the kernel draws again
        stop = numel  # last (`normal_` of n % 16 != 0 elements): the piece runs to the end, as `pieces` cut it
    if stop == numel and numel - start < align:  # the ragged last piece holds at least `align` elements
        start = max(0, (numel - align) // align * align)
    values = torch.empty(stop - start, dtype=ref.dtype)

    def draw(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if node.func is law_marker:
            return  # exact values are the recorded program's, which made them
        d = draws[id(node)]
        assert d is not None and node.stream is not None and node.func is not None
        offset = _rng.word_offset(d.op, ref.dtype, numel, start, **d.params) or 0
        run_draw(node.func, args, kwargs, node.stream.state_into(node, offset))

    _run_on_rows(nodes, values, draw)
    local_shape = tuple(s.stop - s.start for s in shard.kept)
    piece = values[a - start : b - start]
    return (piece.clone() if piece.numel() != values.numel() else piece).view(local_shape)


def _local_only(record: Record, shard: Shard, device: Any) -> torch.Tensor | None:
    """Only the local slice (exact=False): every draw is counter-based, so the slice's elements
    are the very values the whole tensor has, on any layout. None where a node on the tensor is
    not elementwise, a draw has no counter law, or the slice is not a range of rows."""
    rows = _local_rows(record, shard)
    if rows is None:
        return None
    nodes, (a, b) = rows
    laws = {id(n): counter_law(n) for n in nodes if n.stream is not None}
    if any(law is None for law in laws.values()):
        return None
    values = torch.empty(b - a, dtype=shard.ref.dtype)

    def draw(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if node.func is law_marker:  # an initializer's law, sampled by counter as unsharded replay does
            assert node.law is not None
            try:
                _counter.fill(values, node.law[0], node.law[1], counter_key(record, node), start=a)
            except ValueError:  # a law too narrow to sample by counter: the recorded program's values stand
                pass
            return
        law = laws[id(node)]
        assert law is not None
        _counter.fill(values, law[0], law[1], counter_key(record, node), start=a)

    _run_on_rows(nodes, values, draw)
    return values.view(tuple(s.stop - s.start for s in shard.kept)).to(device)


_aten = torch.ops.aten
_ELEMENTWISE_FILLS = {
    _aten.normal_, _aten.uniform_, _aten.zero_, _aten.fill_, _aten.bernoulli_, _aten.random_,
    _aten.exponential_, _aten.geometric_, _aten.log_normal_, _aten.cauchy_,
}  # fmt: skip


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device


def _install(module: nn.Module, shards: list[Sharded], local: dict[int, torch.Tensor], placement: Placement) -> None:
    """Put each local tensor in place and let FSDP re-pad it at once, so one shard is live twice at most. Each
    parameter stays the object the model, its ties and an optimizer hold: its local tensor replaced in place, or
    (another dtype or device) a new DTensor swapped into it, its attributes kept, as `Module._apply` does."""
    DTensor: Any = tc.dtensor_type()
    # FSDP's managers under `module` (a sub-module's parameters managed above it: FSDP re-pads at its lazy init)
    managers = {(id(owner), name): manager for owner, name, manager in tc.fsdp_params(module)}
    fresh: list[tuple[Sharded, Any, nn.Parameter, Any]] = []  # (shard, parameter, its new value, manager)
    with torch.no_grad():
        for shard in shards:
            p = shard.param
            if placement.device is None:  # a sharded parameter lives where its mesh does
                placement_here = Placement(torch.device(p.device_mesh.device_type), placement.dtype)
            else:
                placement_here = placement
            given = local.pop(id(p))
            values = placement_here.place(given, p).contiguous()
            current = tc.dtensor_local(p)
            if values is current:
                continue  # real already, nothing to load, cast or move
            del given
            if not (tc.is_fake(current) or current.is_meta) and _same_layout(values, current):
                current.copy_(values)  # a load into a real shard: in place, as eager's, FSDP's memory still its own
                continue
            manager = next((managers[(id(o), n)] for o, n in shard.owners if (id(o), n) in managers), None)
            if tc.take_local(p, values):  # the same parameter, its values in place
                if manager is not None:
                    manager.reset_sharded_param()  # re-padded: FSDP's own state follows
                continue
            new = DTensor.from_local(
                values, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
            del values
            fresh.append((shard, p, nn.Parameter(new, requires_grad=p.requires_grad), manager))
        if not fresh:
            return
        refused = set(unswappable([p for _, p, _, _ in fresh]))  # a view of it held elsewhere: put in by reference
        swap_all(module, [(p, new) for i, (_, p, new, _) in enumerate(fresh) if i not in refused], fake_attrs())
        for i, (shard, _, new, manager) in enumerate(fresh):
            if i in refused:
                for owner, name in shard.owners:
                    owner._parameters[name] = new
            if manager is not None:
                manager.reset_sharded_param()
