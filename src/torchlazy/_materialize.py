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
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from . import _deferred, _paths
from ._distributed import materialize_shards, sharded_targets
from ._errors import DeferredError
from ._record import GENERATOR_LOCK, Record

__all__ = ["materialize"]

Progress = Callable[[int, int, int, int], None]  # tensors done, total, bytes done, total


def module_tensors(
    module: nn.Module,
) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(path, owner, attribute, tensor) for every tensor the module tree holds."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in owner._parameters.items():
            if p is not None:
                yield f"{dot}{name}", owner, name, p
        for name, b in owner._buffers.items():
            if b is not None:
                yield f"{dot}{name}", owner, name, b
        for name, value in owner.__dict__.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                yield f"{dot}{name}", owner, name, value
            elif isinstance(value, (list, tuple)) and name not in ("_forward_hooks",):
                for i, item in enumerate(value):
                    if isinstance(item, torch.Tensor):
                        yield f"{dot}{name}.{i}", owner, name, item


@dataclass
class _Target:
    path: str
    tensor: torch.Tensor  # the fake tensor the model holds
    record: Record
    sid: int


def _collect(module: nn.Module) -> list[_Target]:
    seen: set[int] = set()
    targets: list[_Target] = []
    for path, _, _, t in module_tensors(module):
        if id(t) in seen or not isinstance(t, FakeTensor):
            continue
        seen.add(id(t))
        owner = _deferred.storage_of(t)
        if owner is None:
            raise DeferredError(
                f"`{path}` is a fake tensor that no `tl.deferred()` block recorded, so torchlazy "
                "cannot tell how to compute it. It was probably made after the block, by an "
                "operation on the deferred model (`model.to(dtype)`, `.half()`, `.cuda()`, a deep "
                "copy): pass `dtype=`/`device=` to `tl.materialize` instead, or do that work inside "
                "the `tl.deferred()` block."
            )
        targets.append(_Target(path, t, owner[0], owner[1]))
    return targets


def _final_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


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
    tensors only) and moved, one storage at a time. `exact=False` computes on
    `device` with a seeded generator per operation: same distributions, not
    the same bits, and no serial random stream. `checkpoint` takes values from
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
        raise TypeError(f"`tl.materialize` takes a torch.nn.Module, not {type(module).__name__}.")
    _paths.remember_paths(module)
    from . import _lazy

    with _lazy.transaction():
        if checkpoint is not None:
            from ._checkpoint import Checkpoint, _mapper, build_lazy_from_checkpoint, load_into_targets, open_checkpoint

            if not isinstance(checkpoint, Checkpoint):
                checkpoint = open_checkpoint(checkpoint)
            build_lazy_from_checkpoint(module, checkpoint, _mapper(key_map))
        targets = _collect(module)
        shards = sharded_targets(module)
        if checkpoint is not None:
            values, rest = load_into_targets(module, targets, checkpoint, strict, key_map, device, dtype)
        else:
            values, rest = {}, targets
        if rest:
            values.update(_replay(rest, device, dtype, exact, progress))
        if shards:
            reader = None
            if checkpoint is not None:
                from ._checkpoint import shard_reader

                reader = shard_reader(module, checkpoint, key_map, strict)
            materialize_shards(module, shards, device, dtype, exact, reader)
        _swap_in(module, targets, values)
    return module


def _replay(
    targets: list[_Target],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    exact: bool,
    progress: bool | Progress | None,
) -> dict[int, torch.Tensor]:
    by_record: dict[int, list[_Target]] = {}
    records: dict[int, Record] = {}
    for t in targets:
        by_record.setdefault(id(t.record), []).append(t)
        records[id(t.record)] = t.record
    order = sorted(records.values(), key=lambda r: getattr(r, "order", 0))
    bar = _Bar(len(targets), sum(t.tensor.nbytes for t in targets), progress)
    with GENERATOR_LOCK:
        return _replay_locked(order, by_record, device, dtype, exact, bar)


def _replay_locked(
    order: list[Record],
    by_record: dict[int, list[_Target]],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    exact: bool,
    bar: _Bar,
) -> dict[int, torch.Tensor]:
    values: dict[int, torch.Tensor] = {}
    saved = torch.default_generator.get_state()
    try:
        for record in order:
            group = by_record[id(record)]
            if record.live:
                torch.default_generator.set_state(saved)
            values.update(_replay_record(record, group, device, dtype, exact, bar))
            stream = record.streams.get(id(torch.default_generator))
            if stream is not None and record.live:  # the live generator moves past every draw, as eagerly
                saved = stream.finish()
    finally:
        torch.default_generator.set_state(saved)
        for record in order:
            record.release_scratch()
    return values


def _replay_record(
    record: Record,
    group: list[_Target],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    exact: bool,
    bar: _Bar,
) -> dict[int, torch.Tensor]:
    by_sid: dict[int, list[_Target]] = {}
    for t in group:
        by_sid.setdefault(t.sid, []).append(t)
    values: dict[int, torch.Tensor] = {}

    def on_ready(sid: int, storage: torch.UntypedStorage) -> None:
        users = by_sid[sid]
        target_device = torch.device(device) if device is not None else users[0].tensor.device
        for t in users:
            real = _view(storage, t.tensor)
            values[id(t.tensor)] = real.to(target_device, _final_dtype(t.tensor, dtype))
        bar.step(len(users), sum(t.tensor.nbytes for t in users))

    sample = group[0].tensor.device
    replay_on = "cpu" if exact or device is None and sample.type == "cpu" else (device or sample)
    kept = [
        sid
        for sid, users in by_sid.items()
        if all(
            _final_dtype(t.tensor, dtype) == t.tensor.dtype and (device is None or torch.device(device).type == "cpu")
            for t in users
        )
    ]
    record.evaluate(by_sid.keys(), device=replay_on, exact=exact, on_ready=on_ready, adopt=kept)
    return values


def _view(storage: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty(0, dtype=like.dtype, device=storage.device)
    return out.set_(storage, like.storage_offset(), like.shape, like.stride())


_FAKE_ATTRS: set[str] | None = None


def _fake_attrs() -> set[str]:
    global _FAKE_ATTRS
    if _FAKE_ATTRS is None:
        with _deferred.fake_mode():
            probe = nn.Parameter(torch.empty(1))
        _FAKE_ATTRS = set(probe.__dict__) | {"_is_param"}
    return _FAKE_ATTRS


def _forget_conversions(targets: list[_Target]) -> None:
    """Drop fake-mode caches that hold weak references to our tensors (they block swaps)."""
    ours = {id(t.tensor) for t in targets}
    for mode in {id(t.tensor.fake_mode): t.tensor.fake_mode for t in targets}.values():  # type: ignore[attr-defined]
        memo = mode.fake_tensor_converter.meta_converter.tensor_memo
        for key in [k for k, v in list(memo.items()) if id(v) in ours]:
            del memo[key]


def drop_parameter_caches(module: nn.Module) -> None:
    """Forget cached references to parameters (RNNs keep weak ones) before swapping them."""
    for sub in module.modules():
        if isinstance(sub, nn.RNNBase):
            sub._flat_weights = []
            sub._flat_weight_refs = []


def refresh_parameter_caches(module: nn.Module) -> None:
    """Modules that cache references to their parameters (RNNs) re-read them."""
    for sub in module.modules():
        if isinstance(sub, nn.RNNBase):
            sub._init_flat_weights()


def _replace_references(module: nn.Module, new: dict[int, torch.Tensor]) -> None:
    for _, owner, name, t in list(module_tensors(module)):
        real = new.get(id(t))
        if real is None:
            continue
        if owner._parameters.get(name) is t:
            owner._parameters[name] = real  # type: ignore[assignment]
        elif owner._buffers.get(name) is t:
            owner._buffers[name] = real
        elif owner.__dict__.get(name) is t:
            owner.__dict__[name] = real
        elif isinstance(owner.__dict__.get(name), (list, tuple)):
            items = owner.__dict__[name]
            fixed = [new.get(id(x), x) if isinstance(x, torch.Tensor) else x for x in items]
            owner.__dict__[name] = type(items)(fixed) if isinstance(items, tuple) else fixed


def _swap_in(module: nn.Module, targets: list[_Target], values: dict[int, torch.Tensor]) -> None:
    """Put the real tensors into the objects the model holds (all or nothing)."""
    internal = _fake_attrs()
    _forget_conversions(targets)
    drop_parameter_caches(module)
    replacements: dict[int, torch.Tensor] = {}
    for t in targets:
        fake = t.tensor
        real = values[id(fake)]
        if isinstance(fake, nn.Parameter):
            real = nn.Parameter(real, requires_grad=fake.requires_grad)
        elif fake.requires_grad and real.is_floating_point():
            real.requires_grad_(True)
        attrs = {k: v for k, v in fake.__dict__.items() if k not in internal}
        if weakref.getweakrefcount(fake) == 0:
            torch.utils.swap_tensors(fake, real)
            fake.__dict__.clear()
            fake.__dict__.update(attrs)
        else:  # something holds a weak reference: replace it wherever the model holds it
            real.__dict__.update(attrs)
            replacements[id(fake)] = real
    if replacements:
        _replace_references(module, replacements)
    refresh_parameter_caches(module)
    for sub in module.modules():
        if "_torchlazy_guard" in sub.__dict__ and not any(
            isinstance(x, FakeTensor) for x in (*sub._parameters.values(), *sub._buffers.values())
        ):
            _deferred.drop_guard(sub)
