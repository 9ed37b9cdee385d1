"""`materialize()`: turn deferred tensors into real ones, exactly.

Each deferred tensor is found in the module tree (parameters, buffers, plain
tensor attributes), its storage replayed from the record on the CPU (exact) or
on the target device (not exact), cast and moved per storage as soon as its
last writer ran, then swapped into the very Python object the model holds, so
tied weights stay tied and references taken before (optimizers, other modules,
attributes) see the real tensor.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _deferred, _lazy, _markers, _paths
from . import _torch_compat as tc
from ._checkpoint import Checkpoint, CheckpointShapeError, KeyPlan, open_checkpoint, plan_keys, renamer
from ._distributed import Shard, Sharded, materialize_shards, sharded_targets
from ._errors import ArgumentError, CheckpointError, DeferredError, ShapeError, listed
from ._modtree import Placement, module_tensors, release_graphs, swap_all, unswappable
from ._record import GENERATOR_LOCK, Record, default_generator, explicit_generators_kept, global_sets

__all__ = ["materialize"]

Progress = Callable[[int, int, int, int], None]  # tensors done, total, bytes done, total


@dataclass
class _Target:
    path: str
    tensor: torch.Tensor  # the fake tensor the model holds (or a real one, to load, cast or move)
    record: Record | None  # None: a real tensor
    sid: int


def _collect(module: nn.Module) -> tuple[list[_Target], list[_Target]]:
    """The deferred tensors of `module` (with their record) and the real ones (already materialized: they
    take the checkpoint and the placement too), in one walk of the module tree."""
    dtensor = tc.dtensor_type()
    seen: set[int] = set()
    deferred: list[_Target] = []
    real: list[_Target] = []
    for path, _, _, t in module_tensors(module):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if not tc.is_fake(t):
            if not (_lazy.is_placeholder(t) or (dtensor and isinstance(t, dtensor))):
                real.append(_Target(path, t, None, -1))
            continue
        owner = _deferred.storage_of(t)
        if owner is None:
            raise DeferredError(
                f"`{path}` is a fake tensor that no `tl.deferred()` block recorded, so torchlazy "
                "cannot tell how to compute it. It was probably made after the block, by an "
                "operation on the deferred model (`model.to(dtype)`, `.half()`, `.cuda()`, a deep "
                "copy): pass `dtype=`/`device=` to `tl.materialize` instead, or do that work inside "
                "the `tl.deferred()` block."
            )
        deferred.append(_Target(path, t, owner[0], owner[1]))
    return deferred, real


class _Bar:
    def __init__(self, total: int, nbytes: int, progress: bool | Progress | None) -> None:
        self.total, self.nbytes, self.done, self.done_bytes = total, nbytes, 0, 0
        self.callback: Progress | None = None
        if callable(progress):
            self.callback = progress
        elif progress or (progress is None and nbytes > 2**30 and sys.stderr.isatty()):
            self.callback = self._print
        self.start = time.perf_counter()

    def step(self, count: int, nbytes: int) -> None:
        self.done += count
        self.done_bytes += nbytes
        if self.callback is not None:
            self.callback(self.done, self.total, self.done_bytes, self.nbytes)

    def _print(self, done: int, total: int, done_bytes: int, nbytes: int) -> None:
        width = 30
        filled = width * done_bytes // max(nbytes, 1)
        rate = done_bytes / max(time.perf_counter() - self.start, 1e-9) / 2**20
        sys.stderr.write(
            f"\rmaterialize [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tensors, "
            f"{done_bytes / 2**20:.1f}/{nbytes / 2**20:.1f} MiB, {rate:.0f} MiB/s"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def materialize(
    module: nn.Module,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    exact: bool = True,
    progress: bool | Progress | None = None,
    checkpoint: Any = None,
    strict: bool = True,
    key_map: Any = None,
) -> nn.Module:
    """Give every deferred tensor of `module` its real value; return `module`.

    `exact=True` reproduces eager construction bit for bit (same seed), on any
    `device`: values are computed on the CPU, then cast to `dtype` (floating
    tensors only) and moved, one storage at a time. `exact=False` draws each
    initializer's law from a counter-based stream (Philox) keyed by the seed,
    the draw's place in the record and the element's index: the same values
    on any layout, thread count or FSDP2 sharding, not eager's bits. `checkpoint` takes values from
    a file instead (see the checkpoint documentation). Works on a sub-module;
    the rest of the model stays deferred. On failure the model is unchanged.

    >>> import torch, torchlazy as tl
    >>> with tl.deferred():
    ...     emb = torch.nn.Embedding(10, 4, padding_idx=0)
    >>> tl.materialize(emb, dtype=torch.bfloat16).weight.dtype
    torch.bfloat16
    >>> emb.weight[0].abs().sum().item()
    0.0
    """
    if not isinstance(module, nn.Module):
        raise ArgumentError(f"`tl.materialize` takes a torch.nn.Module, not {type(module).__name__}.")
    if not isinstance(exact, bool) or not isinstance(strict, bool):
        raise ArgumentError("`tl.materialize`: `exact=` and `strict=` take True or False.")
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise ArgumentError(
            "`tl.materialize`: `progress=` takes True, False, None (a bar for models over 1 GiB on a terminal) "
            f"or a callable (done, total, bytes_done, bytes_total), not {type(progress).__name__} `{progress!r}`."
        )
    if key_map is not None and not (callable(key_map) or isinstance(key_map, dict)):
        raise ArgumentError(
            f"`tl.materialize`: `key_map=` takes a callable (checkpoint key -> model key or None) or a dict of "
            f"prefix rules such as {{'module.': ''}}, not {type(key_map).__name__} `{key_map!r}`."
        )
    _paths.remember_paths(module)
    placement = Placement.of(device, dtype, "tl.materialize")
    # the tensors eager construction made: ordinary ones, trainable, whatever mode the caller materializes under
    # (under `torch.inference_mode()` they were inference tensors, and the next training step failed)
    with _deferred.suspended(), _lazy.transaction(), _deferred.gc_paused(), torch.inference_mode(False):
        changes = checkpoint is not None or device is not None or dtype is not None  # real tensors take them too
        _refuse_unsharded(module, changes)  # first: reading a model's keys (`state_dict`) makes FSDP reshard
        ckpt = None
        if checkpoint is not None:
            ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
            _build_lazy_from_checkpoint(module, ckpt, renamer(module, ckpt, key_map), strict)
        targets, real = _collect(module)
        shards = sharded_targets(module, real=changes)
        involved = [t.record for t in targets] + [s.record for s in shards if isinstance(s, Shard)]
        if not exact:
            _refuse_read_values(involved)
        for record in {id(r): r for r in involved if r is not None}.values():
            record.run_checks()  # a check eager construction failed at: no model, refused before anything changes
        plan = plan_keys(module, ckpt, key_map) if ckpt is not None else None
        everything = targets + real
        if plan is not None:
            values, rest = _read_checkpoint(plan, everything, strict, placement, shards)
        else:
            values, rest = {}, everything
        _refuse_valueless(module, [t for t in rest if t.record is None], shards, plan)
        for t in rest:
            if t.record is None:  # real, not in the checkpoint: cast and move only
                values[id(t.tensor)] = placement.place(t.tensor, t.tensor)
        rest = [t for t in rest if t.record is not None]
        for t in rest:  # made on the meta device in the block: meta, as in eager (nothing to replay, nothing drawn)
            if tc.fake_device(t.tensor).type == "meta":
                values[id(t.tensor)] = _meta_like(t.tensor, placement.final_dtype(t.tensor))
        rest = [t for t in rest if id(t.tensor) not in values]
        if rest:
            values.update(_replay(rest, placement, exact, progress))
        records = {id(t.record): t.record for t in everything if t.record is not None}
        for sub in module.modules():  # tensors replaced wholesale (`load_state_dict(assign=True)`): their records
            for origin in _deferred.origins(sub):
                owner = _deferred.storage_of(origin)
                if owner is not None:
                    records.setdefault(id(owner[0]), owner[0])
        for t in rest:  # replayed: `_replay` moved the generator past their late draws
            records.pop(id(t.record), None)
        _late_draws_only(list(records.values()))
        targets = [t for t in everything if values[id(t.tensor)] is not t.tensor]
        _refuse_held(targets)  # before FSDP's shards are installed: a refusal leaves the whole model as it was
        if shards:
            reader = _shard_reader(plan, strict) if plan is not None else None
            materialize_shards(module, shards, placement, exact, reader)
        _swap_in(module, targets, values)
    return module


def _meta_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor of `t`'s geometry in `dtype` (`dtype=` casts floating tensors made on meta too, as `.to` does)."""
    with tc.no_dispatch():
        return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="meta")


def _refuse_read_values(records: list[Record | None]) -> None:
    """`exact=False` of a model whose construction read values under `concretize=True` (`w / w.abs().max()
    .item()`, a rejection loop): those values came from eager's draws and steered the recorded program, which
    other values would not fit (a max that is not 1, index sizes that no longer match). Refused, unchanged."""
    if any(r is not None and r.read_values for r in records):
        raise DeferredError(
            "`tl.materialize(exact=False)`: this model was constructed under `tl.deferred(concretize=True)` and "
            "read tensor values while constructing; they came from eager's random draws and shaped what was "
            "recorded, so other draws would not fit them. Use `exact=True` (eager's values), or construct without "
            "reading values that depend on random draws."
        )


def _refuse_unsharded(module: nn.Module, changes: bool) -> None:
    """A forward tried before materialize left FSDP mid-forward with uninitialized unsharded parameters in place
    of the deferred shards: materializing would keep those. Refused, the model unchanged. So is loading or casting
    (`changes`) a materialized FSDP model that holds its unsharded parameters (`reshard_after_forward=False`): the
    values would go into tensors FSDP drops at its next all-gather."""
    if changes:
        held = [_paths.attribute_path(owner, name) for owner, name in tc.fsdp_unsharded(module, deferred=False)]
        if held:
            raise ArgumentError(
                f"`tl.materialize`: FSDP holds the unsharded parameters of {len(held)} sharded ones "
                f"({listed(held)}), as a forward leaves "
                "them with `reshard_after_forward=False`: a checkpoint or cast would go into tensors FSDP replaces "
                "at its next all-gather. Reshard each FSDP module first (`for m in model.modules(): if isinstance(m, "
                "FSDPModule): m.reshard()`); the model is unchanged."
            )
    stale = tc.fsdp_unsharded(module, deferred=True)
    if stale:
        names = [_paths.attribute_path(owner, name) for owner, name in stale]  # paths remembered on entry
        raise DeferredError(
            f"`tl.materialize`: {len(names)} FSDP parameters ({listed(names)}) were expected sharded with deferred "
            "local tensors, but a "
            "forward called before materialize (and refused) left FSDP's unsharded parameters, fresh "
            "uninitialized tensors, in their place and FSDP's state mid-forward. Construct the model again "
            "under `tl.deferred()`, `fully_shard` it, and materialize before the first forward."
        )


def _build_lazy_from_checkpoint(
    module: nn.Module, ckpt: Checkpoint, rename: Callable[[str], str | None], strict: bool
) -> None:
    """Shape unbuilt lazy layers from the checkpoint's tensor shapes (no data read); with `strict`, a layer the
    checkpoint has no keys for is missing from it (it stayed unbuilt, and nothing said so)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in ckpt.entries.items():
        new = rename(key)
        if new is not None:
            shapes[new] = entry.shape
    for path, sub in list(module.named_modules()):
        if _lazy.is_lazy_layer(sub):
            prefix = f"{path}." if path else ""
            mine = {k[len(prefix) :]: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(prefix)}
            if mine:
                try:
                    _lazy.build_from_state(sub, mine, prefix, deferred=True)
                except ShapeError as e:  # a checkpoint error too: `except tl.CheckpointError` around a load sees it
                    raise CheckpointShapeError(
                        f"`{ckpt.path}`: its tensors under `{prefix or '(root)'}` ({listed(sorted(mine), 8)}) do not fit "
                        f"the lazy layer there: {e}"
                    ) from None
    if strict:
        unbuilt = [k for k, t in (*module.named_parameters(), *module.named_buffers()) if _lazy.is_placeholder(t)]
        if unbuilt:
            raise CheckpointError(
                f"`{ckpt.path}` does not match the model (missing from the checkpoint: {listed(unbuilt, 8)}, of lazy layers "
                "that take their sizes from it). Use `strict=False` to leave them unbuilt, or shape them first "
                "with `tl.build(model, example)`."
            )


def _refuse_valueless(module: nn.Module, real: list[_Target], shards: list[Sharded], plan: KeyPlan | None) -> None:
    """Tensors on the meta device (a model built under `torch.device("meta")`, sharded by FSDP or not) with no
    record and no value in the checkpoint: nothing can give them values (they stayed meta, silently). Refused
    before anything changes, after a strict checkpoint's own missing-key error."""
    meta = [t.path for t in real if t.tensor.is_meta]
    for shard in shards:
        local = tc.dtensor_local(shard.param)
        unrecorded = not isinstance(shard, Shard) and (local.is_meta or tc.is_fake(local))
        if unrecorded and not (plan is not None and plan.find(shard.param)):
            meta.append(shard.path)
    if not meta:
        return
    unsaved = {
        f"{path}.{name}" if path else name
        for path, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
    }
    never = [p for p in meta if p in unsaved]
    hint = (
        f" Non-persistent buffers ({listed(never)}) are never in a checkpoint: give them values before materialize "
        "(assign a real tensor, as the module's own init computes it)."
        if never
        else ""
    )
    taken = [t.path for t in real if t.tensor.is_meta and getattr(t.tensor.untyped_storage(), _markers.RECORD, None)]
    if taken:  # `real.data = f(real.data)` inside the block: the result was a deferred tensor, its memory now theirs
        hint += (
            f" {listed(taken)} took a deferred tensor's memory by `.data =` inside the `tl.deferred()` block (as "
            "transformers' `tie_weights` does to a bias after `load_state_dict(..., assign=True)`): the values they "
            "held are gone. Load checkpoints with `tl.materialize(model, checkpoint=...)`, or make that assignment "
            "outside the block."
        )
    one = len(meta) == 1
    where = (
        f"`{plan.ckpt.path}` has no value for {'it' if one else 'them'}"
        if plan is not None
        else ("no `checkpoint=` was given")
    )
    raise DeferredError(
        f"`tl.materialize`: {len(meta)} tensor{'' if one else 's'} ({listed(meta)}) on the meta device with no record "
        f"of how to make {'it' if one else 'them'}, and {where}: construct the model under `tl.deferred()` (not "
        f"`torch.device('meta')`, before any `fully_shard`), or pass a `checkpoint=` that holds "
        f"{'it' if one else 'them'}.{hint}"
    )


def _read_checkpoint(
    plan: KeyPlan,
    targets: list[_Target],
    strict: bool,
    placement: Placement,
    shards: list[Sharded],
) -> tuple[dict[int, torch.Tensor], list[_Target]]:
    """Values read from the checkpoint, and the targets left for the record (all checked before any read)."""
    rest: list[_Target] = []
    missing: list[str] = []
    reads: list[tuple[_Target, str]] = []
    for target in targets:
        found = plan.find(target.tensor)
        if found is None:
            rest.append(target)
            missing += plan.keys_of(target.tensor)[:1]
            continue
        key, source = found
        plan.check(key, source, tuple(target.tensor.shape), target.tensor.dtype)
        reads.append((target, source))
    sharded_found = False  # FSDP's sharded parameters are read later, per rank: only looked up here
    for shard in shards:
        found = plan.find(shard.param)
        if found is None:
            missing += plan.keys_of(shard.param)[:1]
        else:
            sharded_found = True
            plan.check(*found, tuple(shard.param.shape), shard.param.dtype)  # a wrong shape: refused before any work
    error = plan.mismatch(missing) if strict else None
    if error is not None:
        raise error
    wanted = missing + [shard.path for shard in shards]
    if not reads and wanted and plan.ckpt.entries and not sharded_found:  # strict=False, nothing at all matched
        raise CheckpointError(
            f"none of the model's tensors is in `{plan.ckpt.path}` (the model's keys look like "
            f"{', '.join(f'`{k}`' for k in wanted[:2])}, the checkpoint's like "
            f"{', '.join(f'`{k}`' for k in list(plan.ckpt.entries)[:2])}): with `strict=False` every tensor would "
            "come from the record, the checkpoint ignored. Pass `key_map=` to rename its keys (a callable, or prefix "
            "rules such as {'module.': ''}), or materialize without `checkpoint=`."
        )
    values = {}
    for t, source in reads:
        entry = plan.ckpt.entries[source]
        values[id(t.tensor)] = _as_loaded(entry.read(), t.tensor, placement, entry.mapped)
    return values, rest


def _as_loaded(value: torch.Tensor, like: torch.Tensor, placement: Placement, mapped: bool) -> torch.Tensor:
    """A checkpoint's tensor as eager's `load_state_dict` then `.to(dtype)` leave its values: rounded to the model's
    dtype, then cast to `dtype=`, in memory of the model tensor's geometry. Where nothing is to change, a safetensors
    memory map is kept as it is (`mapped`); anything else is copied into the model's own memory: a caller's tensor,
    a `torch.load` map (a `torch.save` to the same path truncated it under the model: a bus error), keys sharing
    one storage (they stayed shared)."""
    final, device = placement.final_dtype(like), placement.final_device(like)
    if value.dtype != like.dtype and final != like.dtype:
        value = value.to(like.dtype)  # eager rounds to the model's dtype when it loads, then casts
        mapped = False
    if mapped and value.dtype == final and value.device == device and value.stride() == like.stride():
        return value
    out = torch.empty_strided(tuple(like.shape), like.stride(), dtype=final, device=device)
    return out.copy_(value)


def _shard_reader(plan: KeyPlan, strict: bool) -> Callable[[Sharded, tuple[slice, ...]], torch.Tensor | None]:
    """For sharded parameters: read each rank's slice of the checkpoint tensor, nothing more."""

    def read(shard: Sharded, index: tuple[slice, ...]) -> torch.Tensor | None:
        found = plan.find(shard.param)
        if found is None:
            if strict:
                raise CheckpointError(
                    f"`{shard.path}` is missing from `{plan.ckpt.path}`; use `strict=False` to initialize it "
                    "from the record."
                )
            return None
        key, source = found
        entry = plan.check(key, source, tuple(shard.param.shape), shard.param.dtype)
        value = entry.slice(index)
        if value.dtype != shard.param.dtype:
            return value.to(shard.param.dtype)  # rounded to the model's dtype, as eager's load: a fresh tensor
        # a safetensors slice is the file's memory map: copied (the other entries' slices are copies already)
        return value.clone(memory_format=torch.contiguous_format) if entry.mapped else value

    return read


def _replay(
    targets: list[_Target],
    placement: Placement,
    exact: bool,
    progress: bool | Progress | None,
) -> dict[int, torch.Tensor]:
    by_record: dict[int, list[_Target]] = {}
    records: dict[int, Record] = {}
    for t in targets:
        assert t.record is not None
        by_record.setdefault(id(t.record), []).append(t)
        records[id(t.record)] = t.record
    order = sorted(records.values(), key=lambda r: getattr(r, "order", 0))
    bar = _Bar(len(targets), sum(t.tensor.nbytes for t in targets), progress)
    with GENERATOR_LOCK, explicit_generators_kept(order):
        return _replay_locked(order, by_record, placement, exact, bar)


def _replay_locked(
    order: list[Record],
    by_record: dict[int, list[_Target]],
    placement: Placement,
    exact: bool,
    bar: _Bar,
) -> dict[int, torch.Tensor]:
    values: dict[int, torch.Tensor] = {}
    start = saved = torch.default_generator.get_state()
    sets = global_sets()
    # exact=False seeds the target device's own generator for draws with no counter-based law: put it back too
    device = placement.device
    device_gen = default_generator(device) if device is not None and device.type == "cuda" else None
    device_saved = device_gen.get_state() if device_gen is not None else None
    try:
        for record in order:
            group = by_record[id(record)]
            if record.live:
                torch.default_generator.set_state(saved)
            values.update(_replay_record(record, group, placement, exact, bar))
            stream = record.streams.get(id(torch.default_generator))
            if stream is not None and record.live:  # the live generator moves past every draw, as eagerly
                saved = stream.finish()
            elif stream is not None:
                saved = _add_late_draws(record, stream, saved)
    finally:
        # put back only what replay moved (an op with no `generator=` argument ran on it) or moves on purpose (past
        # lazy layers' late draws): another thread drawing meanwhile keeps its place in the stream
        if saved is not start or global_sets() != sets:
            torch.default_generator.set_state(saved)
        if device_gen is not None and device_saved is not None:
            device_gen.set_state(device_saved)
        for record in order:
            record.release_scratch()
    return values


def _late_draws_only(records: list[Record]) -> None:
    """Records whose every tensor came from a checkpoint (nothing replayed): the generator still moves past
    their lazy layers' late draws, as it does when something is replayed (eager drew them at construction)."""
    left = [r for r in records if not r.live]
    if not left:
        return
    with GENERATOR_LOCK:
        start = saved = torch.default_generator.get_state()
        for record in sorted(left, key=lambda r: getattr(r, "order", 0)):
            stream = record.streams.get(id(torch.default_generator))
            if stream is not None:
                saved = _add_late_draws(record, stream, saved)
        if saved is not start:
            torch.default_generator.set_state(saved)


def _add_late_draws(record: Record, stream: Any, now: torch.Tensor) -> torch.Tensor:
    """Lazy layers shaped after their `deferred()` block drew in their construction-order slots:
    if nothing has used the generator since the block left it, move it past those draws too, so
    it ends where eager construction (with explicit sizes) left it."""
    key = id(torch.default_generator)
    left = record.exit_states.get(key)
    if left is None or not torch.equal(left, now):
        return now
    final = stream.finish()
    if torch.equal(final, now):  # no late draws: nothing to move (the caller then leaves the generator alone)
        return now
    record.exit_states[key] = final
    return final


def _replay_record(
    record: Record,
    group: list[_Target],
    placement: Placement,
    exact: bool,
    bar: _Bar,
) -> dict[int, torch.Tensor]:
    by_sid: dict[int, list[_Target]] = {}
    for t in group:
        by_sid.setdefault(t.sid, []).append(t)
    values: dict[int, torch.Tensor] = {}

    def on_ready(sid: int, storage: torch.UntypedStorage) -> None:
        users = by_sid[sid]
        for t in users:
            values[id(t.tensor)] = placement.place(_view(storage, t.tensor), t.tensor)
        bar.step(len(users), sum(t.tensor.nbytes for t in users))

    replay_on = placement.replay_device(exact, group[0].tensor.device)
    kept = [sid for sid, users in by_sid.items() if all(placement.keeps(t.tensor) for t in users)]
    record.evaluate(by_sid.keys(), device=replay_on, exact=exact, on_ready=on_ready, adopt=kept)
    return values


def _view(storage: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty(0, dtype=like.dtype, device=storage.device)
    return out.set_(storage, like.storage_offset(), like.shape, like.stride())


def _refuse_held(targets: list[_Target]) -> None:
    """Refuse, changing nothing, where a view of a parameter or buffer is alive outside the model."""
    fakes = [t for t in targets if tc.is_fake(t.tensor)]
    for mode in {id(m): m for m in (tc.fake_mode_of(t.tensor) for t in fakes)}.values():
        tc.forget_fake_conversions(mode, [t.tensor for t in targets])  # their weak references block swaps
    olds = [t.tensor for t in targets]
    release_graphs(olds)
    held = unswappable(olds)
    if held:
        paths = [targets[i].path for i in held]
        raise DeferredError(
            f"`tl.materialize`: {len(paths)} tensor{'s' if len(paths) > 1 else ''} "
            f"({listed(paths)}) cannot take their values in place: something else holds their "
            "tensor, a view of it kept in a variable (`row = model.layer.weight[0]`) or as a module attribute "
            "(`self.wt = self.weight.t()`), and torch refuses to swap a tensor whose views are alive. Drop such "
            "views before `tl.materialize` and make them afterwards (or in `forward`); the model is unchanged."
        )


def _swap_in(module: nn.Module, targets: list[_Target], values: dict[int, torch.Tensor]) -> None:
    """Put the real tensors into the objects the model holds (all or nothing: `_refuse_held` asked first)."""
    swap_all(module, [(t.tensor, values[id(t.tensor)]) for t in targets], _deferred.fake_attrs())
    for sub in module.modules():
        if _deferred.has_guard(sub) and not any(
            tc.is_fake(x) for x in (*sub._parameters.values(), *sub._buffers.values())
        ):
            _deferred.drop_guard(sub)
