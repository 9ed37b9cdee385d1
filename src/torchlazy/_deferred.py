"""`deferred()`: construct any model without memory, recording how.

Construction runs unchanged under a fake-tensor mode: every tensor reports the
device eager code would have seen (so model code that looks at the device
takes the eager path) and has no storage. A dispatch mode on top of it records,
in order, every operation that creates a storage or writes into one (see
`_record.py`). Random operations are recorded, not drawn: the generator state
at entry is captured instead, and materialization replays the draws.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import functools
import gc
import hashlib
import math
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from . import _markers, _paths, _ranges
from . import _torch_compat as tc
from ._errors import ArgumentError, DeferredError
from ._fastops import (
    CPU,
    FACTORIES,
    FILL_SCALAR,
    FILLS,
    LEAF_TYPES,
    META,
    NORMAL,
    PLAIN_VIEWS,
    SLOW,
    SPECS,
    TENSOR_OPS,
    UNIFORM,
    VIEWS,
    ZERO,
    draw_refused,
    fast_fake,
    fast_on_fakes,
    fill_refused,
    flatten,
    for_fake_kernel,
    leaves_of,
    made_view,
    normal_ok,
    op_info,
    uniform_ok,
)
from ._modtree import module_tensors
from ._record import (
    GENERATOR_LOCK,
    Const,
    Key,
    Node,
    Record,
    Reseed,
    SRef,
    Stream,
    TRef,
    contiguous_strides,
    explicit_generators_kept,
    law_marker,
    memory_of,
    shared,
    view_bits,
)

__all__ = ["deferred", "deferred_tensors", "fake_attrs", "is_deferred"]


class _Local(threading.local):
    def __init__(self) -> None:
        self.fake_mode: Any = None
        self.recorders: list[_Recorder] = []
        self.quiet = 0  # > 0 while torchlazy itself runs a deferred forward
        self.after_block = 0  # > 0 while an op after a block is being recorded


_local = _Local()


def fake_mode() -> Any:
    """This thread's fake-tensor mode (one per thread, shared by all records)."""
    if _local.fake_mode is None:
        _local.fake_mode = tc.new_fake_mode(_open_record_mode())
    return _local.fake_mode


@functools.cache
def _open_record_mode() -> type:
    """A fake-tensor mode under which the records of closed blocks stay open.

    Outside any block, an op on a fake tensor runs under that tensor's fake mode:
    when one of its tensors belongs to a record, the op is appended to that record,
    exactly as inside the block (in-place init, `copy_`, `load_state_dict`, `.to()`).
    """
    base = tc.fake_tensor_mode_type()
    base_dispatch = tc.without_dynamo_disable(base.__torch_dispatch__)  # type: ignore[attr-defined]
    copyreg.pickle(tc.fake_tensor_type(), _refuse_pickle)  # type: ignore[arg-type]

    class _OpenRecordMode(base):  # type: ignore[misc,valid-type]
        @classmethod
        def _should_skip_dynamo(cls) -> bool:  # no dynamo import on first use
            return False

        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            # a deep copy of a deferred tensor copies its `fake_mode` attribute: the thread's one mode stays one
            # (a copied mode duplicated the converter's storage weak references, each freed at exit: a double free)
            return self

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is _PRIM_DEVICE and tc.is_fake(args[0]):
                return _device_of(args[0])
            kwargs = kwargs or {}
            tail = None
            if not (_local.recorders or _local.quiet or _local.after_block):
                tail = _tail_of(args, kwargs)
            if tail is None:
                # torchlazy's own fake forward keeps the fake mode's constant folding
                out = SLOW if _local.quiet else fast_fake(self, func, args, kwargs)
                return base_dispatch(self, func, types, args, kwargs) if out is SLOW else out
            return _after_block(self, tail, func, types, args, kwargs)

    return _OpenRecordMode


def _after_block(mode: Any, tail: _Recorder, func: Any, types: Any, args: Any, kwargs: Any, fast: bool = False) -> Any:
    """An op on a closed record's tensors, run and recorded by the block's recorder (`fast`: only where
    `fast_fake` runs it, else `SLOW`)."""
    _local.after_block += 1
    try:
        out = tail.record_fast(func, args, kwargs) if fast else tail.__torch_dispatch__(func, types, args, kwargs)
    finally:
        _local.after_block -= 1
    if out is not SLOW:
        # the mode's conversion cache holds weak references that would make
        # `Module._apply` (`.to()`, `.half()`) refuse to swap these tensors
        tc.forget_fake_conversions(mode, (args, kwargs, out))
    return out


@functools.cache
def _install_dispatch_shortcut() -> None:
    """Send the common ops on a closed record's tensors straight to its recorder.

    After a block, an op on its tensors reaches the fake tensor class's dispatch, which enters
    their fake mode and dispatches the op again, only for that mode (`_OpenRecordMode`) to hand it
    to the recorder: twice the cost of recording it. `fully_shard` makes eight such ops of every
    parameter (chunks, a padded copy, views). The ops `fast_fake` runs skip that detour; every
    other op, any other fake tensor, and any op while a block records or a fake mode is active
    take torch's own dispatch, as before.
    """
    original = tc.fake_tensor_type().__torch_dispatch__  # type: ignore[attr-defined]

    def dispatch(cls: type, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _PRIM_DEVICE:
            return _device_of(args[0])
        kwargs = kwargs or {}
        if id(func) in TENSOR_OPS:
            out = _shortcut(func, types, args, kwargs)
            if out is not SLOW:
                return out
        return original(func, types, args, kwargs)

    original_detach = tc.fake_tensor_type().detach  # type: ignore[attr-defined]

    def detach(self: Any) -> Any:
        # `nn.Parameter(t)` detaches every new parameter: for a tensor this thread's block records, the
        # detached tensor is made here, without the round trip through dispatch (a third of its cost);
        # under any other mode, a torch-function mode or inference mode, torch's own `detach` runs
        if _local.recorders and not _local.quiet and tc.only_the_block_dispatches():
            recorder = _local.recorders[-1]
            if recorder._sole_target((self,), {}) is not None:
                detached = tc.fake_detached(_local.fake_mode, self, tc.fake_device(self))
                if detached is not None:
                    return detached
        return original_detach(self)

    detach.__doc__ = original_detach.__doc__
    original_data: Any = torch.Tensor.data  # the C descriptor: `__get__` reads, `__set__` is `set_data`

    def set_data(self: Any, value: Any) -> None:
        # `p.data = real` swaps the tensor's storage for the real one's without any dispatch: the recorder never
        # saw it, and the parameter held a real storage under a fake class (refused later, under another name).
        # As eager means it: `p` takes `real`'s values (a copy, as a view of an outside tensor is), recorded.
        if isinstance(value, torch.Tensor) and not tc.is_fake(value) and storage_of(self) is not None:
            if value.is_meta:
                raise DeferredError(
                    f"`.data = ` a meta tensor of shape {tuple(value.shape)} on a deferred tensor of shape "
                    f"{tuple(self.shape)}: it would hold no values, and materialize could not give it any. Assign a "
                    "tensor with values (it is copied in), or a deferred one (`p.new_empty(shape)`), or assign after "
                    "`tl.materialize(model)`."
                )
            with torch.no_grad():
                value = self.new_empty(value.shape, dtype=value.dtype).copy_(value)
        original_data.__set__(self, value)

    data = property(original_data.__get__, set_data, doc=original_data.__doc__)
    original_deepcopy = tc.fake_tensor_type().__deepcopy__  # type: ignore[attr-defined]

    def deepcopy(self: Any, memo: dict[int, Any]) -> Any:
        # `Tensor.__deepcopy__` asks a subclass its `data_ptr()` (0 for an unallocated one), which torch warns
        # about for fake tensors (the copy is a fake tensor of the same mode)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            return original_deepcopy(self, memo)

    tc.override_fake_methods(
        {"__torch_dispatch__": classmethod(dispatch), "detach": detach, "data": data, "__deepcopy__": deepcopy}
    )


def _shortcut(func: Any, types: Any, args: Any, kwargs: Any) -> Any:
    mode = _local.fake_mode
    if mode is None or _local.recorders or _local.quiet or _local.after_block or tc.fake_mode_active():
        return SLOW
    if id(func) in VIEWS and storage_of(args[0]) is not None:  # a view records nothing: made at once
        if id(func) in PLAIN_VIEWS and _alone_of(mode, args, kwargs):  # `fully_shard`'s chunks, views, detach
            out = made_view(mode, func, args, kwargs)
        else:
            out = fast_on_fakes(mode, func, args, kwargs)
        if out is not SLOW:
            tc.forget_fake_conversions(mode, (args, kwargs, out))
        return out
    tail = _tail_of(args, kwargs)
    return SLOW if tail is None else _after_block(mode, tail, func, types, args, kwargs, fast=True)


def _alone_of(mode: Any, args: Any, kwargs: Any) -> bool:
    """Whether `args[0]` is a fake tensor of `mode` (not a constant) and no other argument is a tensor."""
    target = args[0]
    if tc.fake_mode_of(target) is not mode or tc.fake_constant(target) is not None:
        return False
    for x in (*args[1:], *kwargs.values()):
        if isinstance(x, torch.Tensor):
            return False
    return True


def _refuse_pickle(t: torch.Tensor) -> Any:
    """Pickling (`torch.save(model.state_dict())`) a deferred tensor: say what to do instead."""
    owner = storage_of(t)
    if owner is not None:
        name = owner[0].names.get(owner[1])
        raise DeferredError(
            f"pickling {f'`{name}`, ' if name else ''}a deferred tensor of shape {tuple(t.shape)} "
            "(`torch.save(model.state_dict())`, `pickle`): it has no values yet. Call `tl.materialize(model)` "
            "first, or save the materialized model with `tl.save(model, 'model.safetensors')`."
        )
    return t.__reduce_ex__(2)


def _tail_of(args: Any, kwargs: Any) -> _Recorder | None:
    for t in leaves_of(*args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            owner = storage_of(t)
            if owner is not None:
                return owner[0].tail  # type: ignore[no-any-return]
    return None


def storage_of(t: torch.Tensor) -> tuple[Record, int] | None:
    """The record and storage id of a deferred tensor, or None for a real one."""
    if not tc.is_fake(t):
        return None
    return getattr(t.untyped_storage(), _markers.RECORD, None)


def is_deferred(obj: nn.Module | torch.Tensor) -> bool:
    """Whether a tensor, or any tensor of a module, still waits for materialization.

    Lazy layers constructed under `tl.deferred()` count too: they are deferred once shaped.

    >>> import torch, torchlazy as tl
    >>> with tl.deferred():
    ...     layer = torch.nn.Linear(4, 2)
    >>> tl.is_deferred(layer), tl.is_deferred(layer.weight)
    (True, True)
    >>> _ = tl.materialize(layer)
    >>> tl.is_deferred(layer)
    False
    """
    if isinstance(obj, torch.Tensor):
        return tc.is_fake_or_fake_shard(obj)  # sharded by FSDP2: its local tensor is what waits
    if not isinstance(obj, nn.Module):
        raise ArgumentError(f"`tl.is_deferred` takes a torch.nn.Module or a tensor, not {type(obj).__name__}.")
    unshaped = any(m.__dict__.get(_markers.SLOT) is not None for m in obj.modules())  # lazy, made under deferred
    return unshaped or bool(deferred_tensors(obj))


def deferred_tensors(module: nn.Module) -> list[str]:
    """Paths of the tensors of `module` that are still deferred.

    >>> import torch, torchlazy as tl
    >>> with tl.deferred():
    ...     net = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    >>> tl.deferred_tensors(net)[:3]
    ['0.weight', '0.bias', '1.weight']
    """
    if not isinstance(module, nn.Module):
        raise ArgumentError(f"`tl.deferred_tensors` takes a torch.nn.Module, not {type(module).__name__}.")
    _paths.remember_paths(module)
    paths: list[str] = []
    listed: set[int] = set()
    for path, owner, name, t in module_tensors(module):
        if not tc.is_fake(t):
            continue
        own = owner._parameters.get(name) is t or owner._buffers.get(name) is t or owner.__dict__.get(name) is t
        if own or id(t) not in listed:  # tied tensors under each name; one a container also holds, once
            paths.append(path)
            listed.add(id(t))
    # FSDP's sharded parameters with fake local tensors, wherever a forward left its unsharded ones in place
    DTensor = tc.dtensor_type()
    for owner, name, fsdp_param in tc.fsdp_params(module):
        path = _paths.attribute_path(owner, name)
        current = owner._parameters.get(name)
        materialized = DTensor is not None and isinstance(current, DTensor) and not tc.is_fake_or_fake_shard(current)
        if materialized and current is not fsdp_param.sharded_param:
            continue  # a sharded parameter materialized from a sub-module: FSDP takes it at its lazy init
        if tc.is_fake(tc.dtensor_local(fsdp_param.sharded_param)) and path not in paths:
            paths.append(path)
    return paths


# -- the recorder ------------------------------------------------------------

# Initializers whose control flow reads random values (rejection sampling). Only
# inside them is a value computed for real during deferred construction.
_CHEAP_BYTES = 1 << 20
# Registering a parametrization may check the values it is given (`orthogonal`'s
# `right_inverse`): computed for real there too, exactly, from the record.
_REGISTERS = (parametrize.register_parametrization.__code__,)
_READS_VALUES = {
    "numpy": "`.numpy()`",
    "__repr__": "printing a tensor",
    "__format__": "formatting a tensor",
}


class _Recorder(tc.DispatchModeBase):  # type: ignore[misc,valid-type]
    """Appends every storage-creating or storage-writing op to a record."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # no dynamo import on first use
        return False

    def __init__(self, record: Record, prefix: Key = (), concretize: bool = False) -> None:
        super().__init__()
        self.record = record
        self.prefix = prefix
        self.count = 0
        self.concretize = concretize
        self.closed = False  # the block has ended: ops come from the program after it
        # a running trunc_normal_: (frame, target, law, the stream it draws from)
        self.law_call: tuple[Any, TRef, dict[str, float], Stream] | None = None

    def let_go(self) -> None:
        """The block has ended: see the record through a weak reference from now on, so that the record and
        this recorder (its tail) hold no cycle and go with the last of the record's tensors. Inside the block
        `record` is a plain attribute (the hot path); after it, each use goes through `__getattr__`."""
        self._record_ref = weakref.ref(self.record)
        del self.record

    def __getattr__(self, name: str) -> Any:
        ref = self.__dict__.get("_record_ref")
        if name == "record" and ref is not None:
            record = ref()
            if record is not None:
                return record
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def where(self, sid: int | None = None) -> str:
        """Where an op happens, for messages: the module under construction, or the tensor after the block."""
        if not self.closed:
            return f"during deferred construction of {_paths.constructing_module()}"
        name = self.record.names.get(sid, "") if sid is not None else ""
        what = f"`{name}`, a deferred tensor" if name else "a deferred tensor"
        return f"on {what} after its `tl.deferred()` block"

    def _where_of(self, args: Any, kwargs: Any) -> str:
        """`where()` for an op: named by the first of its arguments that is this record's tensor."""
        ref = next(filter(None, map(self._ref_or_none, tc.tree_leaves((args, kwargs)))), None)
        return self.where(ref.sid if ref is not None else None)

    def next_key(self) -> Key:
        return (*self.prefix, self.count)

    def reserve(self) -> Key:
        """A place in construction order for something shaped later (a lazy layer)."""
        key = self.next_key()
        self.count += 1
        return key

    def reserve_slot(self) -> Key:
        """A lazy layer's place in construction order; a generator the program set since the last draw
        (`torch.manual_seed(s)` just before the layer) is noted first, so that the layer's draws, recorded when it
        is shaped, come after that seed as in eager (the seed was noted only at the next draw, after them)."""
        if self.prefix == () and not self.record.live:
            self.record.stream_for(None)  # the global generator's stream, even before any draw
            for stream in list(self.record.streams.values()):
                self._sync(stream)
        return self.reserve()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _PRIM_DEVICE and tc.is_fake(args[0]):
            return _device_of(args[0])
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR and self._owned(args[0]) is not None and tc.fake_constant(args[0]) is None:
            return self._needs_values(func, args, kwargs)  # what the fake mode would raise for
        out = self.record_fast(func, args, kwargs)
        if out is not SLOW:
            return out
        if getattr(func, "namespace", None) in _COLLECTIVES:
            self._refuse_collective(func, args, kwargs)
        leaves = tc.tree_leaves((args, kwargs))
        reals = [t for t in leaves if isinstance(t, torch.Tensor) and not tc.is_fake(t)]
        if reals:  # their stand-ins, made by an earlier op, may show an older shape (`r.data = other` since)
            tc.forget_real_conversions(_local.fake_mode, reals, stale_only=True)
        written = self._written(func, args, kwargs)
        reshapes = op_info(func).reshapes
        if written and reshapes and not any(tc.is_fake(t) for t in written):
            deferred_memory = any(  # a fake tensor, or its storage (`real.set_(fake.untyped_storage())`)
                tc.is_fake(x) or (isinstance(x, torch.UntypedStorage) and not _real_storage(x)) for x in leaves
            )
            if not deferred_memory:
                with tc.disable_current_modes():  # `real.t_()`: a shape change of a real tensor, as eager makes it
                    out = func(*args, **kwargs)
                tc.forget_real_conversions(_local.fake_mode, written)  # its stand-in kept the old shape
                return out
            self._refuse_real_target(func, written[0], args, kwargs)  # `real.set_(deferred)`
        if (
            written
            and not reshapes
            and not op_info(func).random
            and _real_only(leaves)
            and not _read_by_records(written)
        ):
            # `sd["w"].mul_(0.5)` of a loaded (or pre-block) tensor: a write into real memory alone, made as eager
            # makes it (a record that read the tensor before sees its version move, and materialize refuses it)
            with tc.disable_current_modes():
                return func(*args, **kwargs)
        for t in written:
            if not tc.is_fake(t) and not reshapes:  # refused before it runs (a draw, or deferred memory involved)
                self._refuse_real_target(func, t, args, kwargs)
        if id(func) in _SETS_STORAGE and len(args) > 1 and isinstance(args[1], torch.UntypedStorage):
            if _real_storage(args[1]) and self._owned(args[0]):
                args = (args[0], self._recorded_storage(args[1]), *args[2:])
            elif hasattr(args[1], "_fake_device") and self._owned_storage(args[1]) is None:  # `torch.load` under a
                # fake-tensor mode makes these: no byte read
                raise DeferredError(
                    f"`torch.load` {self.where()} ran under the block's fake-tensor mode, which loads shapes only, "
                    "through a reference to it taken before torchlazy was imported (`from torch import load`, a "
                    "`functools.partial`): the loaded tensors would have no values. Call `torch.load` itself, "
                    "import torchlazy before taking the reference, or load before the block."
                )
        if op_info(func).quantizes:
            self._refuse_layout(func, "quantized", args, kwargs)
        try:
            out = func(*args, **for_fake_kernel(func, kwargs))
        except tc.data_dependent_errors():
            return self._needs_values(func, args, kwargs)
        except tc.unsupported_operator_error():
            raise DeferredError(
                f"`{func}` has no fake-tensor (meta) implementation, so it cannot run {self.where()}. "
                "Construct that module outside `tl.deferred()` (eagerly), materialize before this "
                "operation, or register a fake kernel for the op (`torch.library.register_fake`)."
            ) from None
        if op_info(func).linalg:
            self._kernel_check(func, args, kwargs)
        for t in (out,) if isinstance(out, torch.Tensor) else leaves_of(out):
            if not isinstance(t, torch.Tensor):
                continue
            if t.layout is not torch.strided:
                self._refuse_layout(func, "sparse", args, kwargs)
            if t.dtype in _QUANTIZED:  # `torch.empty_like(x, dtype=torch.qint8)`
                self._refuse_layout(func, "quantized", args, kwargs)
        self._log(func, args, kwargs, out)
        return out

    def _refuse_layout(self, func: Any, kind: str, args: Any, kwargs: Any) -> None:
        """A sparse or quantized tensor made in the block: the record holds strided memory only (a sparse one
        failed on its storage; a quantized one came out float32 holding garbage, silently)."""
        raise DeferredError(
            f"`{func}` {self._where_of(args, kwargs)} makes a {kind} tensor, which deferred construction cannot "
            f"record (it records dense, strided tensors). Make the {kind} tensor after `tl.materialize(model)` "
            "(from the materialized dense one), or construct this module outside `tl.deferred()`."
        )

    @staticmethod
    def _views_of_real(func: Any, args: Any) -> bool:
        """Whether `func` makes a view of a real tensor made before the block (not an unbuilt placeholder: a write
        through its `.data` is dropped, as torch drops it for its own lazy parameters)."""
        base = args[0] if args else None
        return (
            op_info(func).aliases
            and isinstance(base, torch.Tensor)
            and not tc.is_fake(base)
            and not is_lazy(base)
            and base.numel() > 0
        )

    def _stands_for_real_view(self, t: torch.Tensor) -> bool:
        """Whether `t` stands for a view of a real tensor made before the block (a write to it would be lost)."""
        owner = storage_of(t)
        return owner is not None and owner[1] in owner[0].real_views

    @staticmethod
    def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
        """The tensors `func` writes (its schema's mutated arguments, and those it writes unsaid)."""
        found: list[torch.Tensor] = []
        for i, name in op_info(func).written_by(args, kwargs):
            value = args[i] if i < len(args) else kwargs.get(name)
            targets = [value] if isinstance(value, torch.Tensor) else tc.tree_leaves(value)
            found += [t for t in targets if isinstance(t, torch.Tensor)]
        return found

    def _refuse_real_target(self, func: Any, target: torch.Tensor, args: Any, kwargs: Any) -> None:
        """An op that writes into a real tensor while it records (`real.add_(deferred)`, `real.copy_(deferred)`,
        `real[0] = deferred[0]`): the write ran on fake stand-ins, so the real tensor would silently keep its old
        values, where eager changes them. Refused; nothing was written."""
        if tc.is_fake_or_fake_shard(target) and not tc.is_fake(target):  # a DTensor over a deferred tensor
            raise DeferredError(
                f"`{func}` {self._where_of(args, kwargs)}: it writes into a sharded tensor (a DTensor of shape "
                f"{tuple(target.shape)}, as `fully_shard` or `distribute_tensor` make) inside the `tl.deferred()` "
                "block, where writes to sharded tensors cannot be recorded. Shard after the block: construct and "
                "initialize the model under `tl.deferred()`, then call `fully_shard`, then `tl.materialize(model)`."
            )
        shape = tuple(target.shape)
        if not tc.is_fake(target) and _read_by_records([target]):
            raise DeferredError(
                f"`{func}` {self._where_of(args, kwargs)}: it writes into a real tensor of shape {shape} whose memory "
                "a deferred model reads at materialize (a `load_state_dict` source, or memory shared with one): eager "
                "had copied the old values, which materialize would no longer find. Change a copy instead "
                "(`t.clone()`), or materialize first."
            )
        what = (
            f"through a view of shape {shape} of a real tensor"
            if tc.is_fake(target)
            else f"into a real tensor of shape {shape}"
        )
        raise DeferredError(
            f"`{func}` {self._where_of(args, kwargs)}: it writes {what}"
            " (one the block does not record: a module-level constant, a materialized one, or one made from memory "
            "such as `torch.from_numpy`). Ops that involve deferred tensors, or run inside the block, run on "
            "shape-only stand-ins, so the "
            "real tensor would silently keep its old values. Write into a tensor made in the block instead "
            "(`t.clone()` it there), or do this outside the block, after `tl.materialize(model)`."
        )

    def _refuse_collective(self, func: Any, args: Any, kwargs: Any) -> None:
        """Communication between ranks on a deferred tensor: refused before it runs. Its fake kernel would do
        nothing (no values to send), and a replay cannot talk to the other ranks: recorded, it was replayed on
        real tensors out of the collective's order (a crash), or dropped (a `scatter_` writes its output with no
        alias in its schema: the output kept garbage)."""
        raise DeferredError(
            f"`{func}` {self._where_of(args, kwargs)} is a collective (it communicates with other ranks: "
            "FSDP's all-gather when a sharded model runs a forward, a DTensor op that needs the whole tensor, such "
            "as a norm, a mean, `full_tensor()`, `redistribute`, `distribute_tensor` of a deferred tensor, or a "
            "`dist.barrier()` inside the block): deferred tensors have no values to send, and materialization "
            "cannot replay communication. Run it outside the block, on the model after `tl.materialize(model)`."
        )

    def record_fast(self, func: Any, args: Any, kwargs: Any) -> Any:
        """Run and record `func` where `fast_fake` can run it; `SLOW` where the fake-tensor mode must."""
        op = id(func)
        if op in FILLS:
            done = self._fill(func, args, kwargs)
            if done is not None:
                return done
        elif op in PLAIN_VIEWS:
            done = self._view(func, args, kwargs)
            if done is not None:
                return done
        out = fast_fake(_local.fake_mode, func, args, kwargs)
        if out is SLOW:
            return out
        if op in FACTORIES:  # `fast_fake` made it from sizes and options alone
            if out.dtype in _QUANTIZED:  # `torch.empty(3, dtype=torch.qint8)`
                self._refuse_layout(func, "quantized", args, kwargs)
            self._log_new(func, args, kwargs, out)
        else:
            self._log(func, args, kwargs, out)
        return out

    def _sole_target(self, args: Any, kwargs: Any) -> int | None:
        """The storage id of `args[0]` when it is a fake tensor of this thread's mode and this record (no
        constant) and no other argument is a tensor: the case `_fill` and `_view` take on alone; else None."""
        target = args[0]
        if not tc.is_fake(target) or not _alone_of(_local.fake_mode, args, kwargs):
            return None
        owner = storage_of(target)
        return owner[1] if owner is not None and owner[0] is self.record else None

    def _fill(self, func: Any, args: Any, kwargs: Any) -> Any:
        """The usual fill or draw (`zero_`, `fill_`, `uniform_`, `normal_` by numbers) over this record's
        tensor, checked and recorded in one step: half of construction's ops, so the checks of
        `_sole_target`, `flatten` and `_append` are made here inline, for what a fill can hold. None where
        the general path must look closer (a tensor or container among the arguments, a law the meta kernel
        must check, a tensor of another record or mode)."""
        target = args[0]
        if not tc.is_fake(target) or tc.fake_mode_of(target) is not _local.fake_mode:
            return None
        if tc.fake_constant(target) is not None:
            return None
        leaf_types = LEAF_TYPES
        for x in args[1:]:
            if type(x) not in leaf_types:
                return None
        for x in kwargs.values():
            if type(x) not in leaf_types and type(x) is not torch.Generator:
                return None
        owner = getattr(target.untyped_storage(), _markers.RECORD, None)
        if owner is None or owner[0] is not self.record:
            return None
        sid = owner[1]
        if sid in self.record.real_views:
            self._refuse_real_target(func, target, args, kwargs)
        if func is not ZERO:
            refused = fill_refused(func, target, args, contiguous=target.is_contiguous())
            if refused is not None:  # what eager's kernel raises at once; replay would only at materialize
                error, message = refused
                raise error(f"`{func}` {self.where(sid)}: {message}")
            if func is UNIFORM and not uniform_ok(*args[1:3], **kwargs):
                return None
            if func is NORMAL and not normal_ok(*args[1:3], **kwargs):
                return None
        size = shared(tuple(target.shape))
        stride = shared(target.stride())
        offset = target.storage_offset()
        ref = TRef(sid, size, stride, offset, target.dtype, view_bits(target))
        whole = _covers(ref, self.record.storages[sid].nbytes)
        # every argument a leaf (checked above): `flatten`'s cache key, without its walk over the values
        spec = SPECS.get((len(args), tuple(kwargs), (None,) * (len(args) + len(kwargs))))
        if spec is None:
            spec = flatten(args, kwargs)[1]
        leaves = [ref, *args[1:], *kwargs.values()]
        this = shared((sid,))
        overwrites = sid if whole else None
        if func is ZERO or func is FILL_SCALAR:
            if self.law_call is None:  # `_append` for an op that draws nothing, inlined
                key = (*self.prefix, self.count)
                self.count += 1
                self.record.add(Node(key, func, spec, leaves, (), () if whole else this, this, None, overwrites))
                return target
        self._append(func, args, kwargs, spec, leaves, (), this, this, overwrites)
        return target

    def _view(self, func: Any, args: Any, kwargs: Any) -> Any:
        """A view (`detach`: every `nn.Parameter`) of this record's tensor made directly: it records nothing.
        None where `fast_fake` must look (another tensor among the arguments, another mode or record)."""
        if self._sole_target(args, kwargs) is None:
            return None
        return made_view(_local.fake_mode, func, args, kwargs)

    def _owned(self, t: Any) -> tuple[Record, int] | None:
        """(record, storage id) of `t` when it is a tensor of this recorder's record, else None."""
        owner = storage_of(t) if isinstance(t, torch.Tensor) else None
        return owner if owner is not None and owner[0] is self.record else None

    def _reads_memory_of(self, storage: torch.UntypedStorage) -> None:
        """Note real memory this record reads at materialize (a constant's): writes into it in a block are refused."""
        if _real_storage(storage) and storage.nbytes():
            self.record.read_memory.add((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
            _READING.add(self.record)

    def _owned_storage(self, storage: torch.UntypedStorage) -> int | None:
        """The storage id of a storage of this recorder's record (`t.set_(w.untyped_storage())`), else None."""
        owner = getattr(storage, _markers.RECORD, None)
        return owner[1] if owner is not None and owner[0] is self.record else None

    def _recorded_storage(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        """A real storage handed to a tensor of the block (`t.set_(storage, ...)`: `torch.load` and safetensors'
        `get_tensor` make their tensors so) as a storage of the record holding its bytes, a constant read at
        materialize (as `torch.tensor(data)` in a block is): the tensor stays deferred, like every tensor made
        in the block, and the model takes a copy of the bytes."""
        with tc.disable_current_modes():
            real = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        with tc.no_dispatch():
            meta = torch.empty(storage.nbytes(), dtype=torch.uint8, device="meta")
        made = tc.wrap_fake(_local.fake_mode, meta, storage.device).untyped_storage()
        sid = self.record.new_storage(made, made.nbytes(), storage.device)
        setattr(made, _markers.RECORD, (self.record, sid))
        self.record.add(Node(self.reserve(), None, None, [Const.of(real)], [(0, sid)], (), ()))
        self._reads_memory_of(storage)
        if tc.storage_shared(storage):  # a real tensor's memory (`set_(r.untyped_storage())`): eager writes go to `r`
            self.record.real_views.add(sid)
        return made

    def _ref_or_none(self, t: Any) -> TRef | None:
        owner = self._owned(t)
        return TRef.of(owner[1], t) if owner is not None else None

    def _ref(self, t: torch.Tensor, func: Any) -> TRef | Const:
        if not tc.is_fake(t):
            if type(t) in _PLAIN and not t.is_meta:  # a subclass (a DTensor wrapper) has no memory of its own
                self._reads_memory_of(t.untyped_storage())
            return Const.of(t)
        owner = storage_of(t)
        if owner is None or owner[0] is not self.record:
            raise DeferredError(
                f"`{func}` {self.where()} uses a tensor that this `tl.deferred()` block did not "
                "create (a tensor of another deferred model, or an activation). Materialize that "
                "model first, or construct both models in one `tl.deferred()` block."
            )
        return TRef.of(owner[1], t)

    # The two shapes nearly all construction ops have, recorded without `_log`'s general analysis.

    def _log_new(self, func: Any, args: Any, kwargs: Any, out: torch.Tensor) -> None:
        """A factory's new tensor (`empty`, `zeros`, ... from sizes): one new storage, nothing read."""
        leaves, spec = flatten(args, kwargs)
        storage = out.untyped_storage()
        record = self.record
        sid = record.new_storage(storage, storage.nbytes(), CPU)  # `fast_fake` makes factories on the CPU
        setattr(storage, _markers.RECORD, (record, sid))
        key = (*self.prefix, self.count)  # `reserve()`, inlined
        self.count += 1
        record.add(
            Node(
                key, func, spec, leaves, ((0, sid),), (), (), default_dtype=self._default_dtype(),
                numerics=self._numerics() if id(func) in _UNINITIALIZED else None,
            )
        )  # fmt: skip

    def _default_dtype(self) -> torch.dtype | None:
        """torch's default dtype now, where a `set_default_dtype` inside the block made it other than the
        record's (`Node.default_dtype`: `torch.zeros(n)` follows it); else None."""
        dtype = torch.get_default_dtype()
        return None if dtype is self.record.default_dtype else dtype

    def _numerics(self) -> tuple[Any, ...] | None:
        """`tc.numerics()` now, where other than the record's (`Node.numerics`); else None."""
        numerics = tc.numerics()
        return None if numerics == self.record.numerics else numerics

    def _log(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        if id(func) in VIEWS and self._owned(args[0]) is not None:
            return  # a view of this record's tensor: no storage made or written, nothing to record
        written: set[int] = set()
        reshapes = op_info(func).reshapes
        for t in self._written(func, args, kwargs):
            if not reshapes and (not tc.is_fake(t) or self._stands_for_real_view(t)):
                self._refuse_real_target(func, t, args, kwargs)
            written.add(id(t))
        flat, spec = flatten(args, kwargs)
        leaves: list[Any] = []
        reads: list[int] = []
        writes: list[int] = []
        for x in flat:
            if isinstance(x, torch.Tensor):
                ref = self._ref(x, func)
                if isinstance(ref, TRef):
                    reads.append(ref.sid)
                    if id(x) in written:
                        writes.append(ref.sid)
                leaves.append(ref)
            else:
                owned = self._owned_storage(x) if isinstance(x, torch.UntypedStorage) else None
                if owned is not None:  # `t.set_(storage)`: the storage itself, replayed
                    reads.append(owned)
                leaves.append(x if owned is None else SRef(owned))
        outputs: list[tuple[int, int]] = []
        for index, t in enumerate((out,) if isinstance(out, torch.Tensor) else leaves_of(out)):
            if tc.is_fake(t):
                storage = t.untyped_storage()
                if getattr(storage, _markers.RECORD, None) is None:
                    device = tc.fake_device(t)  # what `t.device` reports, without a `prim.device` dispatch
                    sid = self.record.new_storage(storage, storage.nbytes(), device)
                    setattr(storage, _markers.RECORD, (self.record, sid))
                    outputs.append((index, sid))
                    if self._views_of_real(func, args):
                        self.record.real_views.add(sid)  # `r[0]` of a real `r`: its stand-in takes no writes
        if not outputs and not writes:
            if id(func) in tc.VALUE_CHECKS and reads:
                self._value_check(func, args, kwargs, spec, leaves, reads)
            return
        for sid in writes:  # `resize_` grows a storage: what covers it whole, and what replay allocates
            storage = self.record.storages[sid]
            meta = storage.meta()  # alive: this op's argument holds it
            if meta is not None:
                storage.nbytes = max(storage.nbytes, meta.nbytes())
        overwrites = self._full_overwrite(func, leaves, writes)
        self._append(func, args, kwargs, spec, leaves, outputs, reads, writes, overwrites)

    def _checks_at_once(self, args: Any, kwargs: Any) -> bool:
        """Whether a check of the values of `args` runs now, as eager's does: under `concretize`, or where they
        involve no draw and little data (as `.item()` of such values is read for real: a jitter loop around
        `cholesky` of a constant matrix takes eager's path)."""
        if self.concretize:
            return True
        drawn, nbytes = self._what_values_need(args, kwargs)
        return not drawn and nbytes <= _CHEAP_BYTES

    def _kernel_check(self, func: Any, args: Any, kwargs: Any) -> None:
        """A `torch.linalg` kernel that raises on the values it is given (`svd` of a matrix with nan): run for real
        where checks run at once (`_checks_at_once`), so that it raises where eager's does; its output stays
        recorded."""
        if self._checks_at_once(args, kwargs):
            self._check_values_allowed(func, args, kwargs)  # notes values read (exact=False refuses such records)
            flat, spec = tc.tree_flatten((args, kwargs))
            with tc.disable_current_modes():
                real_args, real_kwargs = spec.unflatten(self._force(flat))  # type: ignore[attr-defined]
                func(*real_args, **real_kwargs)

    def _value_check(self, func: Any, args: Any, kwargs: Any, spec: Any, leaves: list[Any], reads: list[int]) -> None:
        """A check of computed values (`tc.VALUE_CHECKS`: `torch.linalg`'s error check, an assert): eager code raises when it
        fails. Under `concretize` the values are computed and the check runs now, raising as eager's does (a
        program may catch it); otherwise it runs first thing at materialize (`Record.run_checks`)."""
        if self._checks_at_once(args, kwargs):
            self._needs_values(func, args, kwargs)
            return
        node = Node(self.reserve(), func, spec, leaves, (), shared(tuple(reads)), (), numerics=self._numerics())
        self.record.add(node)
        self.record.checks.append((node, self._where_of(args, kwargs)))

    def _append(
        self,
        func: Any,
        args: Any,
        kwargs: Any,
        spec: Any,
        leaves: list[Any],
        outputs: Sequence[tuple[int, int]],
        reads: Sequence[int],
        writes: Sequence[int],
        overwrites: int | None,
    ) -> None:
        """Add the node of an op that makes or writes storages (`overwrites`: the storage it rewrites
        whole without reading it, or None), with its generator stream."""
        meta_draw = op_info(func).random and _on_meta(args, kwargs)  # a draw on meta draws nothing, as in eager
        random = op_info(func).random and not meta_draw
        if random:
            refused = draw_refused(func, args, kwargs)
            if refused is not None:  # eager's kernel raises at once; replay would only at materialize
                raise DeferredError(f"`{func}` {self._where_of(args, kwargs)}: {refused}")
        if random or (self.law_call is not None and self.law_call[1].sid in writes):
            self._follow_law(random)
        if overwrites is not None and overwrites in reads:
            reads = () if len(reads) == 1 else [r for r in reads if r != overwrites]
        reads = reads if type(reads) is tuple else shared(tuple(reads))
        writes = writes if type(writes) is tuple else shared(tuple(writes))
        dtype = self._default_dtype()
        if not random:
            key = (*self.prefix, self.count)  # `reserve()`, inlined: one node per op
            self.count += 1
            self.record.add(
                Node(
                    key, func, spec, leaves, outputs, reads, writes, None, overwrites, default_dtype=dtype,
                    meta_draw=meta_draw, numerics=self._numerics(),
                )
            )  # fmt: skip
            return
        # generator states come from C++, never through dispatch: no mode needs disabling here
        stream = self.record.stream_for(_generator_arg(func, args, kwargs))
        top = self.prefix == () and not self.record.live  # in program order, not a lazy layer's slot
        if top:
            self._sync(stream)  # a reseed it notes comes before the node
        key = self.reserve()
        self.record.add(Node(key, func, spec, leaves, outputs, reads, writes, stream, overwrites, default_dtype=dtype))
        if top:
            self._park(stream, key)

    # -- initializers whose law a rejection loop hides -------------------------------
    # `trunc_normal_` redraws values until all fall in [a, b]; how many times depends on
    # eager's values. Exact replay repeats the recorded program; exact=False draws other
    # values, for which that program may not have redrawn enough. So the call is noted
    # as a law node after its ops: exact replay ignores it, exact=False samples the law.

    def _follow_law(self, random: bool) -> None:
        frame = _paths.innermost_frame(tc.trunc_normal_codes())
        if self.law_call is not None and frame is not self.law_call[0]:
            self.flush_law()
        if frame is not None and self.law_call is None and random:
            target = frame.f_locals.get("tensor")
            ref = self._ref(target, "trunc_normal_") if isinstance(target, torch.Tensor) else None
            numbers = {name: self._number(frame.f_locals.get(name)) for name in ("mean", "std", "a", "b")}
            if isinstance(ref, TRef) and None not in numbers.values():
                stream = self.record.stream_for(frame.f_locals.get("generator"))
                self.law_call = (frame, ref, numbers, stream)  # type: ignore[assignment]

    def _number(self, x: Any) -> float | None:
        """A law's parameter as a float: a number, a real tensor's value, or a recorded constant's; None where
        it is not known without computing (then no law is noted: exact=False replays the recorded program)."""
        if type(x) in (int, float, bool):
            return float(x)
        if not isinstance(x, torch.Tensor) or x.numel() != 1:
            return None
        with tc.disable_current_modes():
            if not tc.is_fake(x):
                return float(x)
            ref = self._ref_or_none(x)
            known = None if ref is None else _ranges.known_item(self.record, ref, self.next_key())
        return None if known is None else float(known)

    def truncated_normal(self, tensor: Any, mean: Any, std: Any, a: Any, b: Any, generator: Any) -> bool:
        """torch's `trunc_normal_` on a tensor of this record whose bounds its law never reaches: recorded as
        what eager does there (one `normal_`, nothing rejected) and its law, without the ops of the rejection
        test. False where torch's own body must run (its ops are recorded and `_ranges` decides its test)."""
        ref = self._ref_or_none(tensor)
        if ref is None or not _ranges.normal_stays_within(ref.dtype, mean, std, a, b):
            return False
        self.flush_law()
        with torch.no_grad():
            tensor.normal_(mean, std, generator=generator)
        law = {"mean": float(mean), "std": float(std), "a": float(a), "b": float(b)}
        self.law_call = (None, ref, law, self.record.stream_for(generator))
        self.flush_law()
        return True

    def flush_law(self) -> None:
        """The running `trunc_normal_` call has returned: note its law after its ops."""
        if self.law_call is None:
            return
        _, ref, law, stream = self.law_call
        self.law_call = None
        spec = _one_tensor_spec()
        node = Node(
            self.reserve(), law_marker, spec, [ref], [], (ref.sid,), (ref.sid,), law=("truncated_normal", law),
            law_stream=stream,
        )  # fmt: skip
        self.record.add(node)

    # -- the program's own seeding -------------------------------------------------
    # Nothing is drawn while recording, so the real generator is free to carry a
    # token: after each recorded draw it is parked in a fresh state derived from the
    # last one. Finding it elsewhere at the next draw means the program set it
    # (`manual_seed`, `set_rng_state`, `fork_rng` restoring a saved state): a reseed
    # event goes into the stream, and replay draws from there as eager code did.

    # A token is the state `manual_seed` gives for a seed derived from the previous token and
    # the draw's key; `initial_seed()` names it without reading the 5 KB state. The program
    # sets the generator only through `manual_seed`/`set_state` (nothing is drawn for real
    # while recording), and both replace `initial_seed`: the same seed is still the token.

    def _sync(self, stream: Stream) -> None:
        gen = stream.generator
        if stream.parked_seed is not None and gen.initial_seed() == stream.parked_seed:
            return  # still the token parked after the last draw: nobody set the generator
        with tc.disable_current_modes():  # reading a state's bytes dispatches
            now = gen.get_state()
            digest = _digest(now)
            if stream.parked_seed is None and stream.parked is not None and digest == _digest(stream.parked):
                if not stream.keys:  # a generator's first draw: from a state it was given in the block?
                    self._refuse_other_token(stream, digest)
                return
            after = stream.tokens.get(digest)
            if after is None:
                after = _seed_token(stream, gen.initial_seed(), digest)
            if after is None:
                self._refuse_other_token(stream, digest)
        stream.reseed(Reseed(self.reserve(), None if after is not None else now, after))
        stream.parked, stream.parked_seed = now, None

    def _refuse_other_token(self, stream: Stream, digest: bytes) -> None:
        """A generator about to draw from a state that stands for a place in another generator's recorded stream
        (`g.set_state(torch.get_rng_state())`, `clone_state()`, `copy.deepcopy(g)` after a draw in the block): not
        eager's state, and replay could not tell which it stands for. Refused, not drawn silently other values."""
        seed = stream.generator.initial_seed()
        sources = [s for s in self.record.streams.values() if s is not stream and _seed_token(s, seed, digest)]
        if sources or (seed in _EARLIER_TOKENS and _is_token_state(seed, digest)):  # or an earlier block's token
            if not sources:
                which = "a generator in an earlier block"
            elif sources[0].generator is torch.default_generator:
                which = "the global generator"
            else:
                which = "another generator"
            raise DeferredError(
                f"a draw {self.where()} from a generator whose state was copied, inside a `tl.deferred()` block, "
                f"from {which} after it drew (`get_rng_state()`/`get_state()` set into another generator, "
                "`clone_state()`, `copy.deepcopy`, or `manual_seed(torch.initial_seed())`: read in a block, the "
                "seed names the same stand-in): under `tl.deferred()` nothing is drawn, so such a state is a "
                "stand-in for a place in the recorded stream, not eager's state, and the draws would differ from "
                "eager's. Copy generator states before the block, seed the generator by a number of your own "
                "(`g.manual_seed(n)`), or construct this module outside `tl.deferred()`."
            )

    def _park(self, stream: Stream, key: Key) -> None:
        if self.closed:  # after the block, the program sees eager's generator (a jump; few ops get here)
            with tc.disable_current_modes():  # the jump may run unmodelled draws for real
                park_exactly(stream)
            return
        if stream.parked_seed is not None:  # the usual case: chained from the last token, by Python's hash of
            # ints (the same in every process; a token only has to differ from seeds a program sets)
            seed = hash((stream.parked_seed, key))
        else:
            with tc.disable_current_modes():
                before = _digest(stream.parked if stream.parked is not None else stream.generator.get_state())
            seed = int.from_bytes(hashlib.blake2b(before + repr(key).encode(), digest_size=8).digest(), "little")
        stream.parked_seed = seed & ((1 << 63) - 1)
        stream.parked = None
        stream.generator.manual_seed(stream.parked_seed)
        stream.seeds[stream.parked_seed] = key
        _EARLIER_TOKENS[stream.parked_seed] = None
        if len(_EARLIER_TOKENS) > _TOKENS_KEPT:
            del _EARLIER_TOKENS[next(iter(_EARLIER_TOKENS))]

    def _full_overwrite(self, func: Any, leaves: list[Any], writes: list[int]) -> int | None:
        """The storage `func` rewrites entirely without reading it (a fill, a draw, a copy into it)."""
        if not op_info(func).overwrites or len(set(writes)) != 1:
            return None
        sid = writes[0]
        refs = [leaf for leaf in leaves if isinstance(leaf, TRef)]
        target = refs[0]  # `self` comes first in every such op
        if target.sid != sid or any(r.sid == sid for r in refs[1:]):
            return None
        return sid if _covers(target, self.record.storages[sid].nbytes) else None

    def _what_values_need(self, args: Any, kwargs: Any) -> tuple[bool, int]:
        """Whether the values of the tensors among `args` depend on a random draw, and the bytes computing them
        touches."""
        sids = {
            ref.sid
            for t in tc.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
            for ref in [self._ref(t, "read")]
            if isinstance(ref, TRef)
        }
        nodes = self.record.closure(sids, self.next_key())
        touched = {sid for n in nodes for sid in (*n.reads, *n.writes, *(s for _, s in n.outputs))}
        return any(n.stream is not None for n in nodes), sum(self.record.storages[sid].nbytes for sid in touched)

    def values_of(self, t: torch.Tensor) -> torch.Tensor:
        """The real values of this record's tensor `t` where `.item()` may compute them (see `_needs_values`),
        computed once for the whole tensor: `tolist()` of a draw-free tensor (drop-path rates from a
        `linspace`) would otherwise read each element by its own `.item()`, each replaying the tensor."""
        if tc.fake_device(t).type == "meta":
            return _meta_twin(t)  # no values in eager code either: reading them raises eager's error
        self._check_values_allowed(_LOCAL_SCALAR, (t,), {})
        with tc.disable_current_modes():
            return self._force([t])[0]  # type: ignore[no-any-return]

    def _check_values_allowed(self, func: Any, args: Any, kwargs: Any) -> None:
        if _paths.frames_include((*tc.trunc_normal_codes(), *_REGISTERS)):
            return
        drawn, nbytes = self._what_values_need(args, kwargs)
        if not drawn and nbytes <= _CHEAP_BYTES:
            return  # no draw, little data (drop-path rates from a `linspace`): costs nothing, decides nothing
        if self.concretize:
            # read for real; where they depend on draws, exact replay repeats them and exact=False could not
            self.record.read_values = self.record.read_values or drawn
            return
        what = "reading a tensor's value (`.item()`, `.tolist()`, `bool(t)`)"
        if func is not _LOCAL_SCALAR:
            what = f"`{func}` (its output shape depends on tensor values)"
        if self.closed:
            raise DeferredError(
                f"{what} {self._where_of(args, kwargs)}: it has a shape but no value until "
                "`tl.materialize(model)`. Materialize the model first, then read the value."
            )
        raise DeferredError(
            f"{what} during deferred construction of {_paths.constructing_module()}: under "
            "`tl.deferred()` tensors have shapes but no values yet. Compute the value from "
            "Python numbers instead, construct this module outside `tl.deferred()`, or use "
            "`tl.deferred(concretize=True)` to compute such values for real (exact, but it "
            "costs the work needed to produce them)."
        )

    def _needs_values(self, func: Any, args: Any, kwargs: Any) -> Any:
        flat, spec = tc.tree_flatten((args, kwargs))
        if any(isinstance(x, torch.Tensor) and tc.is_fake(x) and tc.fake_device(x).type == "meta" for x in flat):
            # a meta tensor has no values in eager code either: its op runs on meta, raising eager's error
            twins = [_meta_twin(x) if isinstance(x, torch.Tensor) and tc.is_fake(x) else x for x in flat]
            meta_args, meta_kwargs = spec.unflatten(twins)  # type: ignore[attr-defined]
            with tc.no_dispatch():
                return func(*meta_args, **meta_kwargs)
        self._check_values_allowed(func, args, kwargs)
        if func is _LOCAL_SCALAR:  # a rejection sampler's test is often decided by its draws' law alone
            ref = self._ref_or_none(args[0])
            with tc.disable_current_modes():  # constants' min and max are read for real
                known = None if ref is None else _ranges.known_item(self.record, ref, self.next_key())
            if known is not None:
                return known
        flat, spec = tc.tree_flatten((args, kwargs))
        with tc.disable_current_modes():
            real_flat = self._force(flat)
            real_args, real_kwargs = spec.unflatten(real_flat)  # type: ignore[attr-defined]
            out = func(*real_args, **real_kwargs)
            # the values to keep, copied while no mode runs (under the fake mode a clone is fake), each in its layout
            # (`lstsq`'s solution is a strided view of a larger buffer: a clone made it dense, under the fake's strides)
            kept = [_copy_in_layout(t) if isinstance(t, torch.Tensor) else t for t in tc.tree_leaves(out)]
        if not any(isinstance(t, torch.Tensor) for t in tc.tree_leaves(out)):
            return out
        # A tensor whose shape depends on values: keep its values as a constant.
        flat_out, out_spec = tc.tree_flatten(out)
        mode = fake_mode()
        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in flat_out]
        for real, fake in zip(kept, fakes):
            if tc.is_fake(fake):
                storage = fake.untyped_storage()
                sid = self.record.new_storage(storage, storage.nbytes(), fake.device)
                setattr(storage, _markers.RECORD, (self.record, sid))
                self.record.add(
                    Node(
                        self.reserve(),
                        None,
                        None,
                        [Const(real, None, memory_of(real))],
                        [(0, sid)],
                        (),
                        (),
                    )
                )
        return out_spec.unflatten(fakes)  # type: ignore[attr-defined]

    def _force(self, flat: list[Any]) -> list[Any]:
        """Real values of the recorded tensors in `flat`, as they are now."""
        refs = {id(x): self._ref(x, "reading values") for x in flat if isinstance(x, torch.Tensor)}
        sids = {r.sid for r in refs.values() if isinstance(r, TRef)}
        with GENERATOR_LOCK, explicit_generators_kept([self.record]):  # replay sets the generators' states
            saved = torch.default_generator.get_state()
            try:
                env = self.record.evaluate(sids, bound=self.next_key())
            finally:
                torch.default_generator.set_state(saved)
                self.record.release_scratch()
        out: list[Any] = []
        for x in flat:
            ref = refs.get(id(x))
            if isinstance(ref, TRef):
                out.append(ref.on(env[ref.sid]))
            elif isinstance(ref, Const):
                out.append(ref.value)
            else:
                out.append(x)
        return out


_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})
# factories whose memory is left as it is (deterministic mode fills it): of `tc.numerics()`, the only ones a
# factory's values depend on (`zeros`, `arange` do not: no snapshot taken on construction's hot path)
_UNINITIALIZED = frozenset(id(op) for op in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default))


def _copy_in_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of the real tensor `t` over a copy of its whole storage, with its offset, sizes and strides."""
    storage = t.untyped_storage().clone()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, t.stride())


def _meta_twin(t: torch.Tensor) -> torch.Tensor:
    """A plain meta tensor of the fake tensor `t`'s geometry (one made on the meta device in a block)."""
    with tc.no_dispatch():
        twin = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return twin.requires_grad_(t.requires_grad) if t.dtype.is_floating_point or t.dtype.is_complex else twin


@functools.cache
def _one_tensor_spec() -> Any:
    """The argument spec of an op on one tensor, `((t,), {})`: a law node's (flattened once, not per call)."""
    _, spec = flatten((0,), {})
    return spec


def _digest(state: torch.Tensor) -> bytes:
    return hashlib.blake2b(state.numpy().tobytes(), digest_size=16).digest()


# The seeds of the tokens recent blocks parked generators in (any record), so that a token carried out of its block
# (copied into a generator drawn from in a later block, or set back there) is refused too, not drawn from silently.
# Bounded: the oldest are forgotten first.
_EARLIER_TOKENS: dict[int, None] = {}
_TOKENS_KEPT = 1 << 16


def _is_token_state(seed: int, digest: bytes, device: torch.device | str = "cpu") -> bool:
    """Whether the state of `digest` is the one `manual_seed(seed)` gives (a parked token, not a set state)."""
    fresh = torch.Generator(device=device)
    fresh.manual_seed(seed)
    return _digest(fresh.get_state()) == digest


def _seed_token(stream: Stream, seed: int, digest: bytes) -> Key | None:
    """The draw after which the recorder parked the generator of `stream` in the state of `digest` (whose seed
    is `seed`), if it is such a token."""
    key = stream.seeds.get(seed)
    return key if key is not None and _is_token_state(seed, digest, stream.generator.device) else None


def _covers(ref: TRef, nbytes: int) -> bool:
    """Whether `ref` lays its elements over every byte of a storage of `nbytes`, in order from its start."""
    if ref.offset != 0 or math.prod(ref.size) * ref.dtype.itemsize != nbytes:
        return False
    return ref.stride == contiguous_strides(ref.size)


def _generator_arg(func: Any, args: Any, kwargs: Any) -> torch.Generator | None:
    i = op_info(func).generator
    if i is None:
        return None
    gen = args[i] if i < len(args) else kwargs.get("generator")
    return gen if gen is not None and isinstance(gen, torch.Generator) else None  # its isinstance is Python's


# ops that communicate between ranks (torch.distributed's and DTensor's): refused on deferred tensors
_COLLECTIVES = frozenset({
    "c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "_dtensor", "symm_mem",
})  # fmt: skip
# C++ asks a fake tensor its device through dispatch (`prim.device`: the fake device is a Python
# attribute), once for every view and new parameter: 1,223 times in `fully_shard` of a 162M Llama.
# Each dispatch entry of torchlazy answers it first, as the fake tensor's own dispatch would.
_PRIM_DEVICE = torch.ops.prim.device.default
_SETS_STORAGE = frozenset(
    id(op) for op in (torch.ops.aten.set_.source_Storage, torch.ops.aten.set_.source_Storage_storage_offset)
)


_PLAIN = (torch.Tensor, nn.Parameter)
# Records that read real memory (their constants), for `_read_by_records`: weakly, a record lives with its model
_READING: weakref.WeakSet[Record] = weakref.WeakSet()


def _read_by_records(written: list[torch.Tensor]) -> bool:
    """Whether a live record reads memory that `written` shares: a write into it, made for real, would change what
    materialize reads, whatever tensor object it goes through (another view over the same storage, a tensor with no
    version counter under inference mode, an alias `set_` to it): such a write is refused instead."""
    spans = []
    for t in written:
        storage = t.untyped_storage()
        spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return any(
        start < end and a < end and start < b
        for record in list(_READING)
        for a, b in record.read_memory
        for start, end in spans
    )


def _real_only(leaves: list[Any]) -> bool:
    """Whether every tensor and storage among an op's arguments is plain real memory (no fake, no meta, no unbuilt
    placeholder, no subclass such as a DTensor wrapping a fake), so that the op can run for real as in eager code."""
    for x in leaves:
        if isinstance(x, torch.Tensor) and (type(x) not in _PLAIN or x.is_meta):
            return False
        if isinstance(x, torch.UntypedStorage) and not _real_storage(x):
            return False
    return True


def _real_storage(x: Any) -> bool:
    """Whether `x` is a storage with memory (not a fake or meta tensor's)."""
    return isinstance(x, torch.UntypedStorage) and x.device.type != "meta"


_LOCAL_SCALAR = tc.local_scalar_op()  # `.item()`, `bool(t)`: a value, which fake tensors lack


def _on_meta(args: Any, kwargs: Any) -> bool:
    """Whether an op draws on the meta device: asked for `device="meta"` (`torch.randn(n, device="meta")`,
    `randn_like(t, device="meta")`), or, asked for no device, its first tensor (a draw's target, a `*_like`'s
    model) is a fake on meta."""
    device = kwargs.get("device")
    if device is not None:
        return torch.device(device).type == "meta"
    first = next((x for x in args if isinstance(x, torch.Tensor)), None)
    return first is not None and tc.is_fake(first) and tc.fake_device(first).type == "meta"


def _device_of(t: Any) -> torch.device:
    """`prim.device` of a fake tensor: meta while a meta kernel runs on it, else the device it reports."""
    return META if tc.fake_mode_of(t).in_kernel_invocation else tc.fake_device(t)


@functools.cache
def _install_trunc_normal_shortcut() -> None:
    """Record torch's `trunc_normal_` as one draw and its law where its bounds are out of its law's reach
    (`std=0.02` in [-2, 2]: every vision transformer's init), instead of the ten ops of its rejection test
    (bounds read back, compares, `any`, `.item()`), 0.4 ms per call. Only where torch's sampler keeps its
    first `normal_` draw there (checked once, here) and only for this thread's recorded tensors: any other
    call runs torch's own body."""
    if not _trunc_normal_keeps_first_draw():
        return

    def shortcut(body: Any) -> Any:
        def trunc_normal(tensor: Any, mean: Any, std: Any, a: Any, b: Any, generator: Any = None) -> Any:
            recorder = current_recorder()
            if (
                recorder is not None
                and not _local.quiet
                and recorder.truncated_normal(tensor, mean, std, a, b, generator)
            ):
                return tensor
            if recorder is None:  # after a block, a deferred tensor's ops go to its record's recorder
                owner = storage_of(tensor) if isinstance(tensor, torch.Tensor) else None
                recorder = owner[0].tail if owner is not None else None
            try:
                return body(tensor, mean, std, a, b, generator=generator)
            finally:  # its law noted now: the recorder keeps no frame of the call (frames hold the tensor)
                if recorder is not None:
                    recorder.flush_law()

        return trunc_normal

    tc.wrap_trunc_normal(shortcut)


def _trunc_normal_keeps_first_draw() -> bool:
    """Whether torch's `trunc_normal_` with bounds far out of its law's reach is one `normal_` draw: the same
    values and the generator left where `normal_` leaves it (torch 2.13's rejection sampler; older
    versions drew `uniform_` and mapped it)."""
    try:
        with tc.disable_current_modes():
            drawn, plain = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
            for n in (5, 40):  # on the CPU whatever the default device
                x = torch.nn.init.trunc_normal_(torch.empty(n, device="cpu"), std=0.02, generator=drawn)
                y = torch.empty(n, device="cpu").normal_(0.0, 0.02, generator=plain)
                if not torch.equal(x, y):
                    return False
            return torch.equal(drawn.get_state(), plain.get_state())
    except TypeError:  # no `generator` argument
        return False


@functools.cache
def _install_value_guard() -> None:
    """Turn value reads that never reach dispatch into clear errors, and deep copies into recorded clones.

    They are methods of the fake tensor class, wrapped once (a torch function mode would
    cost a Python call on every torch call of construction): they act only on this
    thread's recorded tensors while a block records, and run torch's own otherwise.
    """
    fake_type = tc.fake_tensor_type()

    def reader(name: str, what: str) -> Any:
        original = getattr(fake_type, name)

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if _local.recorders and _local.quiet == 0 and storage_of(self) is not None:
                recorder = current_recorder()
                meta = tc.fake_device(self).type == "meta"  # no values in eager code either: printed as eager's
                if recorder is not None and (recorder.concretize or meta) and recorder._owned(self) is not None:
                    if name == "__format__" and (self.dim() != 0 or getattr(self, "_is_param", False)):
                        return object.__format__(self, *args)  # as torch's (not a plain 0-dim): `str(t)`, below
                    values = recorder.values_of(self)  # computed for real, as `.item()` is (a meta tensor's twin)
                    with tc.disable_current_modes():
                        if self.requires_grad:  # printed as eager prints it (`requires_grad=True`)
                            values = values.detach().requires_grad_()
                        out = getattr(values, name)(*args, **kwargs)
                    if name == "numpy":  # eager's array is the tensor's memory; this one a copy: writes refused
                        out.flags.writeable = False
                    elif name == "__repr__" and getattr(self, "_is_param", False):  # a parameter of the block
                        out = "Parameter containing:\n" + out
                    elif name == "__repr__" and self.grad_fn is not None:  # a result of autograd, as eager names it
                        head, _, tail = out.rpartition("requires_grad=True")
                        out = f"{head}grad_fn=<{type(self.grad_fn).__name__}>{tail}"
                    return out
                raise DeferredError(
                    f"{what} during deferred construction of {_paths.constructing_module()}: under "
                    "`tl.deferred()` tensors have shapes but no values. Print `t.shape` instead, look at the "
                    "values after `tl.materialize(model)`, or construct under `tl.deferred(concretize=True)` "
                    "(values computed for real)."
                )
            owner = storage_of(self) if name == "numpy" and not _local.quiet else None
            if owner is not None:  # after its block: torch's own error says only "tensor subclasses"
                label = owner[0].names.get(owner[1])
                raise DeferredError(
                    f"`.numpy()` on {f'`{label}`, ' if label else ''}a deferred tensor after its `tl.deferred()` "
                    "block: it has a shape but no values until `tl.materialize(model)`. Materialize the model first."
                )
            return original(self, *args, **kwargs)

        return method

    original_deepcopy = fake_type.__deepcopy__  # type: ignore[attr-defined]

    def deepcopy(self: torch.Tensor, memo: dict[int, Any]) -> Any:
        if _local.recorders and storage_of(self) is not None:
            return _deepcopy(self, memo)
        return original_deepcopy(self, memo)

    original_tolist = fake_type.tolist  # type: ignore[attr-defined]

    def tolist(self: torch.Tensor) -> Any:
        recorder = current_recorder()
        if recorder is not None and _local.quiet == 0 and recorder._owned(self) is not None:
            values = recorder.values_of(self)
            with tc.disable_current_modes():
                return values.tolist()
        return original_tolist(self)

    methods = {name: reader(name, what) for name, what in _READS_VALUES.items()}
    tc.override_fake_methods({**methods, "__deepcopy__": deepcopy, "tolist": tolist})


def _deepcopy(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """Deep copy of a recorded tensor: a recorded `clone` (as eager would copy the data)."""
    if id(t) in memo:
        return memo[id(t)]
    with torch.no_grad():
        new = t.clone()
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    elif t.requires_grad:
        new.requires_grad_()
    internal = fake_attrs()
    for k, v in t.__dict__.items():
        if k not in internal:
            setattr(new, k, copy.deepcopy(v, memo))
    memo[id(t)] = new
    return new


def current_recorder() -> _Recorder | None:
    return _local.recorders[-1] if _local.recorders else None


@contextlib.contextmanager
def recording(record: Record, prefix: Key = (), concretize: bool = False) -> Iterator[_Recorder]:
    """Record into `record` under `prefix` (the top level, or a lazy layer's reserved place)."""
    _install_value_guard()
    _install_dispatch_shortcut()
    _install_trunc_normal_shortcut()
    recorder = _Recorder(record, prefix, concretize)
    _local.recorders.append(recorder)
    hooks = _track_modules(record)
    try:
        with gc_paused(), fake_mode(), recorder:
            yield recorder
    finally:
        for h in hooks:
            h.remove()
        _local.recorders.pop()


@functools.cache
def _install_real_loads() -> None:
    """`torch.load` and `torch.from_file` in a block give real tensors, as in eager code. Under a fake-tensor mode
    torch loads shapes only (meta storages: no byte is read), and `from_file` has no fake kernel; so they run outside
    the recording, and the block takes the loaded tensors as it takes any real tensor (`load_state_dict(
    torch.load(path))`: read at materialize). Installed when torchlazy is imported, so that references taken
    after that (`from torch import load`) are the wrapped ones."""

    def outside_blocks(original: Any) -> Any:
        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not _local.recorders or _local.quiet:
                return original(*args, **kwargs)
            with suspended():
                return original(*args, **kwargs)

        return call

    torch.load = torch.serialization.load = outside_blocks(torch.serialization.load)  # type: ignore[assignment]
    torch.from_file = outside_blocks(torch.from_file)


@functools.cache
def _install_real_deepcopy() -> None:
    """`copy.deepcopy` of a real tensor in a block gives a real copy, as in eager code (a module holding a constant,
    a generator's state). torch's copy clones the tensor, which in the block would make a deferred stand-in, and
    then refuses a copy of another class than the original's."""
    original = torch.Tensor.__deepcopy__

    @functools.wraps(original)
    def deepcopy(self: torch.Tensor, memo: dict[int, Any]) -> Any:
        if _local.recorders and not _local.quiet and type(self) is torch.Tensor:
            with suspended():
                return original(self, memo)
        return original(self, memo)

    torch.Tensor.__deepcopy__ = deepcopy  # type: ignore[method-assign]


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """The body runs outside this thread's recording, if any (`tl.materialize` inside a `tl.deferred()`
    block): its ops are real, none is recorded; the block records on afterwards."""
    if not _local.recorders:
        yield
        return
    saved, _local.recorders = _local.recorders, []
    try:
        with tc.disable_current_modes():
            yield
    finally:
        _local.recorders = saved


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic cyclic garbage collection inside: recording and replay make many small objects
    that live on (nodes, fake tensors), and each collection would rescan the whole heap (torch's
    and the model's objects) for no garbage; measured up to a quarter of a vision model's deferred
    construction. Reference counting still frees everything acyclic; collections resume after.

    (Promoting the block's objects to the oldest generation without a scan, `gc.freeze()` then
    `gc.unfreeze()`, saved 3-5% more but was withdrawn: it promotes the program's young objects
    too, and Python then almost never runs the full collection that would free their cycles: a
    loop dropping models with a reference cycle kept every one of them alive.)"""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torchlazy's own forward on deferred tensors: no recording, no guard errors."""
    _local.quiet += 1
    try:
        yield
    finally:
        _local.quiet -= 1


@contextlib.contextmanager
def deferred(*, concretize: bool = False) -> Iterator[None]:
    """Construct models inside without allocating their tensors; record how instead.

    Model code runs unchanged and sees the device it would see eagerly. Nothing
    is allocated and no random number is drawn: the generator state at entry is
    kept, and `tl.materialize` later replays exactly what construction did.
    Nested blocks join the outer one; the mode is per thread.

    On exit every generator the block drew from is left exactly where eager
    construction would have left it (a jump over the recorded draws, none of
    them made), so the rest of the program runs as it would have eagerly and
    two blocks in a row give the two models two eager constructions give.

    >>> import torch, torchlazy as tl
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> with tl.deferred():
    ...     layer = torch.nn.Linear(1000, 1000)   # no memory, no random draws
    >>> _ = torch.randn(10)                       # RNG use in between does not matter
    >>> _ = tl.materialize(layer)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> torch.equal(layer.weight, torch.nn.Linear(1000, 1000).weight)
    True
    """
    if not isinstance(concretize, bool):
        raise ArgumentError(f"`tl.deferred(concretize=...)` takes True or False, not {concretize!r}.")
    if _local.recorders and _local.quiet == 0:
        yield
        return
    record = Record()
    tc.forget_storage_conversions(fake_mode())  # a real tensor used by an earlier block is converted anew
    failure: BaseException | None = None
    with recording(record, concretize=concretize) as recorder:
        try:
            yield
        except BaseException as e:  # the generators still end where eager's construction, failing there, left them
            failure = e
    if failure is None:
        _close(recorder, record)
        return
    with contextlib.suppress(Exception):  # the program's own error is the one to see
        _close(recorder, record)
    if isinstance(failure, RuntimeError) and (
        "UninitializedParameter" in str(failure) or "UninitializedBuffer" in str(failure)
    ):
        raise DeferredError(
            f"PyTorch's own lazy modules (`nn.LazyLinear`, ...) cannot be constructed under "
            f"`tl.deferred()` ({failure}). Use the torchlazy layers instead: `tl.nn.Linear(out_features)` "
            "and so on, with the same names without `Lazy`."
        ) from failure
    if isinstance(failure, RuntimeError) and "data is not allocated yet" in str(failure):
        raise DeferredError(
            "a tensor made inside `tl.deferred()` reached code that reads its memory directly (PyTorch said: "
            f"{str(failure).strip().splitlines()[0]}), such as `torch.set_rng_state(state.clone())`, `Generator.set_state` or a C "
            "extension: tensors made in the block have no values. Pass a generator state as `get_rng_state()` "
            "returned it (no `.clone()` or arithmetic), or run that code outside the block."
        ) from failure
    raise failure


def _close(recorder: _Recorder, record: Record) -> None:
    """The block's end: its record stays open to ops after it, its generators where eager left them."""
    recorder.flush_law()
    for stream in record.streams.values():  # the program set a generator after its last draw (a seed)
        if stream.keys:
            recorder._sync(stream)
    recorder.closed = True
    recorder.let_go()
    record.tail = recorder  # ops on its tensors after the block go on being recorded (the record stays open)
    _leave_generators_as_eager(record)


def _leave_generators_as_eager(record: Record) -> None:
    """Every generator the block drew from ends where eager construction would have left it.

    The draws are not made: the generator model jumps over them (`_rng`), so the rest of
    the program (data order, dropout) runs as it would have after eager construction.
    Lazy layers not yet shaped have no draws yet: theirs are added when they are built.
    """
    with GENERATOR_LOCK:
        drawn = [stream for stream in record.streams.values() if stream.keys]
        if drawn:
            park_exactly(*drawn)
        for stream in drawn:
            record.exit_states[id(stream.generator)] = stream.generator.get_state()
        default = id(torch.default_generator)
        if default not in record.exit_states:  # lazy layers may draw from it later, in their slots
            record.exit_states[default] = torch.default_generator.get_state()


def park_exactly(*streams: Stream) -> None:
    """Put the real generators where eager code would have them after each stream's last draw.

    Every state is worked out before any generator is set, and the record's other generators are put back as
    they were: working out one stream may run a draw the model cannot jump over, whose inputs are replayed on
    their own real generators (`rand_like(x)` of an `x = randn(n, generator=g)` sets `g`)."""
    record = streams[0]._record()
    chosen = {id(stream) for stream in streams}
    others = [] if record is None else [s.generator for s in record.streams.values() if id(s) not in chosen]
    kept = [(g, g.get_state()) for g in others]
    states = [stream.finish() for stream in streams]
    for generator, state in kept:
        generator.set_state(state)
    for stream, state in zip(streams, states):
        stream.generator.set_state(state)
        stream.parked, stream.parked_seed = state, None
        if stream.keys:
            stream.tokens[_digest(state)] = stream.keys[-1]


# -- a clear error when a deferred model is called ---------------------------


def _track_modules(record: Record) -> list[Any]:
    """Give modules that receive deferred tensors a forward guard until materialized."""

    def on_tensor(module: nn.Module, name: str, tensor: Any) -> None:
        if not _local.recorders or tensor is None:
            return
        owner = storage_of(tensor)
        if owner is None:
            return
        # the recorded tensor itself, for when a wrapper (FSDP) puts another in its place
        module.__dict__.setdefault(_markers.ORIGIN, {})[name] = tensor
        names = owner[0].names
        if owner[1] not in names:
            names[owner[1]] = f"{type(module).__name__}.{name}"
        add_guard(module)

    return [
        _module_hooks.register_module_parameter_registration_hook(on_tensor),
        _module_hooks.register_module_buffer_registration_hook(on_tensor),
    ]


def _forward_guard(module: nn.Module, args: Any) -> None:
    if _local.quiet or isinstance(module, parametrize.ParametrizationList):
        return  # a parametrization computes a tensor (`conv.weight`): recorded, like any op
    if _paths.frames_include((parametrize.ParametrizationList.forward.__code__, *_REGISTERS)):
        return  # one step of it (`_SpectralNorm`, with its own deferred buffers), or of a stacked one registering
    raise DeferredError(
        f"`{_paths.module_path(module)}` ({type(module).__name__}) was constructed under "
        "`tl.deferred()` and has no values yet. Call `tl.materialize(model)` (or "
        "`tl.build(model, example)` when it has lazy layers) before running it."
    )


# The guard's key among a module's forward pre-hooks: torch numbers its hook handles from 0 up, so a
# negative key is never one of them; no handle object is made per module (a fifth of a vision model's
# hook cost at construction), and a deep copy of the module carries the guard as it carries the marker.
_GUARD_KEY = -0x746C617A79


def add_guard(module: nn.Module) -> None:
    """Refuse a forward of `module` until its deferred tensors are materialized."""
    if _markers.GUARD not in module.__dict__:
        module._forward_pre_hooks[_GUARD_KEY] = _forward_guard
        module.__dict__[_markers.GUARD] = True


def has_guard(module: nn.Module) -> bool:
    return _markers.GUARD in module.__dict__


def drop_guard(module: nn.Module) -> None:
    """`module` is materialized: no guard, no record of its origins."""
    module.__dict__.pop(_markers.ORIGIN, None)
    if module.__dict__.pop(_markers.GUARD, None) is not None:
        module._forward_pre_hooks.pop(_GUARD_KEY, None)


def origin_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """The recorded tensor `module` registered as `name` (a wrapper may have put another in its place)."""
    return module.__dict__.get(_markers.ORIGIN, {}).get(name)


def origins(module: nn.Module) -> list[torch.Tensor]:
    return list(module.__dict__.get(_markers.ORIGIN, {}).values())


_FAKE_ATTRS: set[str] | None = None


def fake_attrs() -> set[str]:
    """Attributes every fake Parameter carries (torch's own), as opposed to the user's."""
    global _FAKE_ATTRS
    if _FAKE_ATTRS is None:
        with fake_mode():
            probe = nn.Parameter(torch.empty(1))
        _FAKE_ATTRS = set(probe.__dict__) | {"_is_param"}
    return _FAKE_ATTRS


_install_real_loads()
_install_real_deepcopy()
