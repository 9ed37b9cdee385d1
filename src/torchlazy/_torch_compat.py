"""Every private PyTorch name torchlazy uses, looked up lazily, in one place.

torchlazy leans on PyTorch internals (fake tensors, dispatch modes, pytree,
RNN weight caches, FSDP2 and DTensor internals). Each is reached through a
function here, resolved on first use: a torch release that moves one breaks
this file only, `import torchlazy` keeps working, and the feature that needs
the missing piece raises a `tl.LazyError` naming the torch version and what is
missing. Nothing else in the package names `torch._*` or a private attribute
of a torch object.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ._errors import LazyError

__all__ = [
    "DispatchModeBase",
    "allowed_placeholder_methods",
    "data_dependent_errors",
    "disable_current_modes",
    "disable_torch_function_subclass",
    "dtensor_local",
    "dtensor_type",
    "fake_device",
    "fake_mode_active",
    "fake_mode_of",
    "fake_tensor_mode",
    "fake_tensor_mode_type",
    "fake_tensor_type",
    "forget_fake_conversions",
    "forget_real_conversions",
    "forget_storage_conversions",
    "VALUE_CHECKS",
    "fsdp_sharded",
    "numerics",
    "replay_settings",
    "fsdp_params",
    "no_dispatch",
    "override_fake_methods",
    "wrap_fake",
    "is_fake",
    "local_scalar_op",
    "local_shape_and_offset",
    "make_constant_fake",
    "new_fake_mode",
    "without_dynamo_disable",
    "norm_base_type",
    "op_schema",
    "tensor_version",
    "refresh_rnn_weights",
    "run_fake_kernel",
    "drop_rnn_weights",
    "set_tensor_hooks",
    "tensor_hooks",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_unflatten",
    "trunc_normal_codes",
    "wrap_trunc_normal",
    "unsupported_operator_error",
]


def _missing(what: str, error: BaseException | None) -> LazyError:
    cause = f" ({error})" if error is not None else ""
    return LazyError(
        f"this feature of torchlazy needs `{what}`, which torch {torch.__version__} does not provide{cause}. "
        "Use a torch version torchlazy is tested with (see the README), or report the version."
    )


@functools.cache
def _lookup(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise _missing(f"{module}.{name}", e) from None


# -- dispatch modes and pytree -----------------------------------------------------


def _dispatch_mode_base() -> type:
    """`TorchDispatchMode`, or a stand-in that fails clearly when instantiated."""
    try:
        return _lookup("torch.utils._python_dispatch", "TorchDispatchMode")  # type: ignore[no-any-return]
    except LazyError as e:
        error = e

        class _Unavailable:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise error

        return _Unavailable


# Base class of torchlazy's dispatch modes (resolved once: classes need it at definition).
DispatchModeBase: type = _dispatch_mode_base()


def disable_current_modes() -> Any:
    """A context manager that runs its body with no dispatch mode active."""
    return _lookup("torch.utils._python_dispatch", "_disable_current_modes")()


def disable_torch_function_subclass() -> Any:
    """A context manager in which tensor subclasses' `__torch_function__` is not called."""
    return torch._C.DisableTorchFunctionSubclass()


def tree_leaves(tree: Any) -> list[Any]:
    return _lookup("torch.utils._pytree", "tree_leaves")(tree)  # type: ignore[no-any-return]


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    return _lookup("torch.utils._pytree", "tree_flatten")(tree)  # type: ignore[no-any-return]


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    return _lookup("torch.utils._pytree", "tree_unflatten")(leaves, spec)


def tree_map(fn: Callable[[Any], Any], tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    return _lookup("torch.utils._pytree", "tree_map")(fn, tree, is_leaf=is_leaf)


def op_schema(func: Any) -> Any:
    """The schema (`torch._C.FunctionSchema`) of an ATen operator overload."""
    return func._schema


def arguments_by_name(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument given to the operator overload `func`, by its schema name."""
    return {a.name: v for a, v in zip(op_schema(func).arguments, args)} | kwargs


def local_scalar_op() -> Any:
    """The operator behind `.item()`/`.tolist()`."""
    return torch.ops.aten._local_scalar_dense.default


@contextlib.contextmanager
def quiet_fake_kernel_errors() -> Iterator[None]:
    """The fake-tensor mode logs a traceback for every meta kernel that raises, before the error reaches the
    caller: torchlazy turns that error into its own message, so the log is silenced meanwhile."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = disabled


def grouped_mm_op() -> Any:
    """The operator of mixture-of-experts layers' grouped matrix products (`F.grouped_mm`), or None before it."""
    packet = getattr(torch.ops.aten, "_grouped_mm", None)
    return None if packet is None else packet.default


# -- fake tensors --------------------------------------------------------------------


def fake_tensor_type() -> type:
    return _lookup("torch._subclasses.fake_tensor", "FakeTensor")  # type: ignore[no-any-return]


def fake_tensor_mode(**kwargs: Any) -> Any:
    return _lookup("torch._subclasses.fake_tensor", "FakeTensorMode")(**kwargs)


def is_fake(t: Any) -> bool:
    """Whether `t` is a fake tensor (shape, dtype, device; no storage)."""
    cls = _FAKE_TYPE or _fake_type_now()
    return isinstance(t, cls)


_FAKE_TYPE: type | None = None


def _fake_type_now() -> type:
    global _FAKE_TYPE
    _FAKE_TYPE = fake_tensor_type()
    return _FAKE_TYPE


def is_fake_or_fake_shard(t: Any) -> bool:
    """Whether `t` is a fake tensor, or a DTensor (FSDP2's sharded parameter) whose local tensor is one."""
    DTensor = dtensor_type()
    if DTensor is not None and isinstance(t, DTensor):
        return is_fake(dtensor_local(t))
    return is_fake(t)


def fake_mode_of(t: Any) -> Any:
    return t.fake_mode


def fake_mode_active() -> bool:
    """Whether a fake-tensor mode is on the dispatch mode stack (fake tensors' own dispatch then defers to it)."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def neg_view(t: torch.Tensor) -> torch.Tensor:
    """A view of `t` with the negative bit set (what `t.conj().imag` carries)."""
    return torch._neg_view(t)


def only_the_block_dispatches() -> bool:
    """Whether the dispatch mode stack holds only a block's two modes (its fake mode and its recorder), no
    torch-function mode is on and autograd runs as usual (no inference mode): an op a recorder makes directly
    is then the op torch would dispatch to it."""
    return (
        torch._C._len_torch_dispatch_stack() == 2
        and not torch._C._is_torch_function_mode_enabled()
        and not torch.is_inference_mode_enabled()
    )


def fake_device(t: Any) -> torch.device:
    """The device a fake tensor reports (its storage is on meta)."""
    return t.fake_device  # type: ignore[no-any-return]


def _argument_names(func: Any) -> tuple[str, ...]:
    schema = getattr(func, "_schema", None)
    return tuple(a.name for a in schema.arguments) if schema is not None else ()


def pass_generator(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], generator: Any) -> tuple[Any, Any]:
    """`(args, kwargs)` of a call of `func` with its `generator` argument set to `generator`: in its positional
    slot where the call passes it there (`aten.poisson(x, g)`), else by name."""
    schema = getattr(func, "_schema", None)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.name == "generator" and not a.kwarg_only and i < len(args):
                return (*args[:i], generator, *args[i + 1 :]), kwargs
    return args, {**kwargs, "generator": generator}


@functools.cache
def with_generator(func: Any) -> Any:
    """`func` if its schema takes `generator=`, else its sibling overload that does with the same other arguments
    (`aten.randn.default` -> `aten.randn.generator`, `randint.low` -> `randint.low_generator`); None if neither."""
    names = _argument_names(func)
    if "generator" in names:
        return func
    packet = getattr(func, "overloadpacket", None)
    for name in packet.overloads() if packet is not None else ():
        other = getattr(packet, name)
        theirs = _argument_names(other)
        if "generator" in theirs and tuple(n for n in theirs if n != "generator") == names:
            return other
    return None


def run_fake_kernel(mode: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """`func` run with the fake tensors of `mode` seen as plain meta tensors (their meta kernel).

    What the fake mode's `in_kernel_invocation_manager` sets up (no Python dispatch, meta in the
    dispatch keys, the mode told it runs a kernel), as two C guards instead of a generator-based
    context manager: a fifth of the cost of a view made in a block.
    """
    previous = mode.in_kernel_invocation
    with torch._C._DisableTorchDispatch(), torch._C._PreserveDispatchKeyGuard():
        mode.in_kernel_invocation = True
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            return func(*args, **kwargs)
        finally:
            mode.in_kernel_invocation = previous


def tensors_in_place(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Any:
    """A context in which `module`'s parameters and buffers (by name, tied ones together) are `tensors`:
    what `torch.func.functional_call` does around one call, here around a whole training step, whose backward
    may run the module again (reentrant activation checkpointing recomputes its forward then)."""
    from torch.nn.utils.stateless import _reparametrize_module

    return _reparametrize_module(module, tensors, tie_weights=True, strict=False)


def swap_refused(t: torch.Tensor) -> bool:
    """Whether `torch.utils.swap_tensors` would refuse `t`: its tensor has owners besides its Python object and
    its gradient accumulator (a view of it alive, a graph). Asked as the swap asks, with no dispatch (a fake
    tensor's `view_as` would reach its fake mode, which another thread may be using)."""
    count = t._use_count()  # type: ignore[attr-defined]
    if count <= 1:
        return False
    if count > 2 or not (t.requires_grad and t.is_leaf):
        return True
    # one more owner: the swap accepts it if that is the gradient accumulator. Asked as the swap asks, with
    # the accumulator held; rare (its `get_gradient_edge` imports torch.distributed.tensor, ~0.8 s)
    with torch._C._DisableTorchDispatch():
        node = torch.autograd.graph.get_gradient_edge(t).node
        refused = t._use_count() > 2  # type: ignore[attr-defined]
        del node
    return bool(refused)


def is_view(t: torch.Tensor) -> bool:
    return bool(t._is_view())


def detach_in_place(t: torch.Tensor) -> None:
    """`t.detach_()` with no dispatch mode or subclass seeing it (a fake tensor's autograd graph let go)."""
    with torch._C._DisableTorchDispatch():
        t.detach_()


def no_dispatch() -> Any:
    """A context in which no dispatch mode runs: a factory asked for `device="meta"` makes a plain
    meta tensor (what `run_fake_kernel` gives, without its Python context manager)."""
    return torch._C._DisableTorchDispatch()


def override_fake_methods(methods: dict[str, Any]) -> None:
    """Put `methods` on the fake tensor class (each wraps the one it replaces)."""
    for name, method in methods.items():
        setattr(fake_tensor_type(), name, method)


def wrap_fake(mode: Any, meta: torch.Tensor, device: torch.device) -> Any:
    """A fake tensor of `mode` over the meta tensor `meta`, reporting `device`.

    On the CPU, `FakeTensor.__new__` (argument checks, device normalization, five memo
    descriptors of three attributes each) is replaced by its result: the subclass made
    over `meta` with the attributes a constructed probe of this mode carries.
    """
    _, template, cls = _fake_known(mode)
    if template is None or device.type != "cpu" or device.index is not None:
        return cls(mode, meta, device)
    out = torch.Tensor._make_subclass(
        cls, meta, meta.requires_grad, dispatch_device=True, device_for_backend_keys=device
    )
    return _finish_fake(mode, out, template)


def fake_detached(mode: Any, t: Any, device: torch.device) -> Any:
    """`t.detach()` of a fake CPU tensor `t` of `mode`, made in one C++ call (`_make_subclass` detaches
    its argument itself, here with Python dispatch off): half the cost of running the meta kernel and
    wrapping its output (`nn.Parameter(t)` detaches every new parameter). None where `wrap_fake` would
    construct the fake tensor instead."""
    _, template, cls = _fake_known(mode)
    if template is None or device.type != "cpu" or device.index is not None:
        return None
    with torch._C._DisableTorchDispatch():
        out = torch.Tensor._make_subclass(cls, t, False, dispatch_device=True, device_for_backend_keys=device)
    return _finish_fake(mode, out, template)


def _fake_known(mode: Any) -> tuple[Any, dict[str, Any] | None, type]:
    known = _FAKE_TEMPLATES.get(id(mode))
    if known is None or known[0] is not mode:
        cls = fake_tensor_type()
        known = _FAKE_TEMPLATES[id(mode)] = (mode, _fake_template(cls, mode), cls)
    return known


def _finish_fake(mode: Any, out: Any, template: dict[str, Any]) -> Any:
    if mode._allow_unsafe_data_ptr_access:
        torch._C._set_warn_deprecated_on_mutable_data_ptr(out)
    else:
        torch._C._set_throw_on_mutable_data_ptr(out)
    out.__dict__.update(template)
    return out


# id(fake mode) -> (the mode, the attributes of a fake CPU tensor of it, or None: construct each, the fake class)
_FAKE_TEMPLATES: dict[int, tuple[Any, dict[str, Any] | None, type]] = {}
_FAKE_PROBE_ATTRS = {"_fake_device", "fake_mode", "constant", "pytype", "dispatch_keys", "real_tensor"}


def _fake_template(cls: type, mode: Any) -> dict[str, Any] | None:
    with disable_current_modes():
        probe = cls(mode, torch.empty(0, device="meta"), torch.device("cpu"))
    attrs = dict(probe.__dict__)
    plain = {k: v for k, v in attrs.items() if k not in ("_fake_device", "fake_mode")}
    if (
        not _FAKE_PROBE_ATTRS <= attrs.keys()
        or attrs["_fake_device"] != torch.device("cpu")
        or attrs["fake_mode"] is not mode
        or any(v is not None for v in plain.values())  # a debug trace, a constant: construct each
    ):
        return None
    return attrs


def data_dependent_errors() -> tuple[type[BaseException], ...]:
    """What fake tensors raise when an op's result depends on values they do not have."""
    return (
        _lookup("torch._subclasses.fake_tensor", "DataDependentOutputException"),
        _lookup("torch._subclasses.fake_tensor", "DynamicOutputShapeException"),
    )


def unsupported_operator_error() -> type[BaseException]:
    """What fake tensors raise for an op with no fake (meta) kernel."""
    return _lookup("torch._subclasses.fake_tensor", "UnsupportedOperatorException")  # type: ignore[no-any-return]


def uncompiled(module: Any) -> Any:
    """The module `torch.compile(module)` wraps (its `OptimizedModule`'s original), or `module` itself: estimates run
    the original's forward on fake tensors (through the wrapper, dynamo traced the estimate's own hooks, slowly)."""
    original = getattr(module, "_orig_mod", None)
    return original if isinstance(original, nn.Module) and type(module).__name__ == "OptimizedModule" else module


def storage_shared(storage: torch.UntypedStorage) -> bool:
    """Whether memory besides this storage object holds it (a tensor viewing it): `t.set_(r.untyped_storage())`
    of a real `r`, against a storage a loader made for the tensor it returns."""
    return bool(torch._C._storage_Use_Count(storage._cdata) > 1)


def tensor_version(t: torch.Tensor) -> int | None:
    """The in-place version counter of a tensor (bumped by every write into it); None if untracked."""
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no counter
        return None


def fake_tensor_mode_type() -> type:
    return _lookup("torch._subclasses.fake_tensor", "FakeTensorMode")  # type: ignore[no-any-return]


def without_dynamo_disable(fn: Any) -> Any:
    """`fn` without the `torch._disable_dynamo` wrapper torch puts on dispatch modes' `__torch_dispatch__`.

    That wrapper imports `torch._dynamo` on its first call (~0.8 s) only to keep dynamo from
    tracing into the mode; a mode that dynamo never traces can call the function it wraps.
    """
    code = getattr(fn, "__code__", None)
    wrapped = getattr(fn, "__wrapped__", None)
    if code is not None and wrapped is not None and code.co_filename.endswith(os.path.join("torch", "_compile.py")):
        return wrapped
    return fn


def new_fake_mode(cls: Any) -> Any:
    """An instance of `cls` (a FakeTensorMode subclass) accepting real inputs, made without `torch._dynamo`.

    `FakeTensorMode.__init__` imports `torch._dynamo.config` for two flags, and importing it
    imports all of dynamo (and sympy): ~0.8 s, most of the first `tl.deferred()` block. Until
    something else has imported dynamo, the same attributes are set here with the flags read
    from the environment variables dynamo reads; `tests/test_deferred.py` checks the attribute
    set against torch's own `__init__`. Any surprise falls back to that `__init__`.
    """
    if "torch._dynamo" in sys.modules:
        return cls(allow_non_fake_inputs=True)
    try:
        import torch._functorch.config as functorch_config
        import torch.nested._internal.nested_tensor as nested
        from torch._subclasses.fake_tensor import FakeTensorConverter

        mode = cls.__new__(cls)
        DispatchModeBase.__init__(mode)  # type: ignore[misc]
        propagate = bool(functorch_config.fake_tensor_propagate_real_tensors)
        attrs = {
            "allow_fallback_kernels": True,
            "propagate_real_tensors": propagate,
            "fake_tensor_converter": FakeTensorConverter(copy_data=propagate, export=False),
            "static_shapes": True,
            "allow_scalar_outputs": False,
            "_allow_unsafe_data_ptr_access": functorch_config.fake_tensor_allow_unsafe_data_ptr_access,
            "allow_meta": functorch_config.fake_tensor_allow_meta,
            "cache_enabled": os.environ.get("TORCH_FAKE_TENSOR_DISPATCH_CACHE", "1") == "1" and not propagate,
            "cache_crosscheck_enabled": os.environ.get("TORCH_FAKE_TENSOR_DISPATCH_CACHE_CROSSCHECK", "0") == "1",
            "allow_non_fake_inputs": True,
            "in_kernel_invocation": False,
            "enter_stack": [],
            "shape_env": None,
            "_stack_trace": traceback.extract_stack(),
            "_stack": None,
            "_mode_key": torch._C._TorchDispatchModeKey.FAKE,
            "nt_tensor_id_initial_count": nested._tensor_id_counter,
            "nt_tensor_id_counter": nested._tensor_id_counter,
        }
        for name, value in attrs.items():
            setattr(mode, name, value)
        return mode
    except (ImportError, AttributeError, TypeError):
        return cls(allow_non_fake_inputs=True)


def make_constant_fake(mode: Any, t: torch.Tensor) -> Any:
    """A fake tensor that remembers the real values of `t` (small constants)."""
    return mode.fake_tensor_converter.from_real_tensor(mode, t, make_constant=True)


def fake_constant(t: Any) -> torch.Tensor | None:
    """The real values a fake constant carries, if any."""
    return getattr(t, "constant", None)


def forget_fake_conversions(mode: Any, tree: Any) -> None:
    """Drop a fake mode's cached conversions that hold weak references to the tensors in `tree` (a pytree).

    The cache is empty unless real tensors were converted (rare after construction): then nothing is walked.
    """
    memo = mode.fake_tensor_converter.meta_converter.tensor_memo
    if not memo:
        return
    ids = {id(t) for t in tree_leaves(tree)}
    for key in [k for k, v in list(memo.items()) if id(v) in ids]:
        del memo[key]


def forget_real_conversions(mode: Any, tensors: list[torch.Tensor], *, stale_only: bool = False) -> None:
    """Drop a fake mode's cached stand-ins of these real tensors (after a shape change of them made for real: the
    stand-in kept the old shape, and later ops on the tensor would reuse it); with `stale_only`, only those whose
    tensor's shape, strides or offset changed since (`r.data = other`, a shape change made on another thread)."""
    converter = mode.fake_tensor_converter.meta_converter
    memo = converter.tensor_memo
    if not memo:
        return
    for t in tensors:
        tid = converter.describer.lookup_tensor.get(t)
        fake = memo.get(tid) if tid is not None else None
        if fake is not None and (
            not stale_only
            or fake.shape != t.shape
            or fake.stride() != t.stride()
            or fake.storage_offset() != t.storage_offset()
        ):
            del memo[tid]


def forget_storage_conversions(mode: Any) -> None:
    """Forget which meta storage stands for which real storage converted by `mode`: a record marks the meta
    storages it makes, so a real tensor converted again in a later block must get a storage of its own."""
    mode.fake_tensor_converter.meta_converter.storage_memo.clear()


# torch's own body of `nn.init.trunc_normal_`, taken before torchlazy may wrap it (`wrap_trunc_normal`)
_TRUNC_NORMAL: Callable[..., Any] | None = getattr(torch.nn.init, "_no_grad_trunc_normal_", None)


def trunc_normal_codes() -> tuple[Any, ...]:
    """Code objects of initializers whose control flow reads random values (rejection loops)."""
    return (_TRUNC_NORMAL.__code__,) if _TRUNC_NORMAL is not None else ()


def wrap_trunc_normal(make: Callable[[Any], Any]) -> Any:
    """Let `make(torch's body of trunc_normal_)` run in its place (`nn.init.trunc_normal_` calls it by its
    module-level name) and return torch's body; None, changing nothing, where that body is not torch's
    (absent, or already replaced by someone else)."""
    body = _TRUNC_NORMAL
    if getattr(torch.nn.init, "_no_grad_trunc_normal_", None) is not body:
        return None
    if body is None:
        return None
    torch.nn.init._no_grad_trunc_normal_ = functools.wraps(body)(make(body))
    return body


# -- torch.nn internals -----------------------------------------------------------------


def allowed_placeholder_methods() -> Any:
    """What PyTorch lets an `UninitializedParameter` do before it has a shape."""
    return getattr(nn.parameter.UninitializedParameter, "_allowed_methods", ())


_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def tensor_hooks(t: torch.Tensor) -> dict[str, Any]:
    """The hooks registered on a tensor itself (`register_hook`, `register_post_accumulate_grad_hook`).

    They are kept in dicts on the Python object but registered on the tensor's autograd state,
    which `torch.utils.swap_tensors` moves to the other object: `set_tensor_hooks` re-registers them.
    """
    with disable_torch_function_subclass():
        return {name: getattr(t, name) for name in _TENSOR_HOOKS if getattr(t, name, None) is not None}


def set_tensor_hooks(t: torch.Tensor, hooks: dict[str, Any]) -> None:
    """Register `hooks` (from `tensor_hooks`) on `t`: the same dicts, so their handles still remove them."""
    with disable_torch_function_subclass():
        for name, value in hooks.items():
            setattr(t, name, value)


def norm_base_type() -> type:
    """The base class of BatchNorm/InstanceNorm (their output has their input's shape)."""
    return _lookup("torch.nn.modules.batchnorm", "_NormBase")  # type: ignore[no-any-return]


def drop_rnn_weights(rnn: nn.RNNBase) -> None:
    """Forget an RNN's cached references to its parameters (before they are swapped)."""
    rnn._flat_weights = []
    rnn._flat_weight_refs = []  # type: ignore[attr-defined]


def refresh_rnn_weights(rnn: nn.RNNBase) -> None:
    """Make an RNN re-read its parameters into its cache."""
    rnn._init_flat_weights()


# -- DTensor and FSDP2 -------------------------------------------------------------------


def dtensor_type() -> type | None:
    """`DTensor`, or None where torch.distributed is not built or not in use.

    No DTensor exists before `torch.distributed.tensor` is imported, and importing it costs
    ~0.8 s (sympy): a process that has not imported it has none to find.
    """
    if not torch.distributed.is_available() or "torch.distributed.tensor" not in sys.modules:
        return None
    return _lookup("torch.distributed.tensor", "DTensor")  # type: ignore[no-any-return]


def dtensor_local(p: Any) -> torch.Tensor:
    """The local tensor a DTensor wraps (fake or meta until materialized)."""
    return p._local_tensor  # type: ignore[no-any-return]


def take_local(p: Any, values: torch.Tensor) -> bool:
    """Give the DTensor `p` the local tensor `values` in place, where it stands for what `p` holds now (same
    shape, strides, dtype and device, no grad): what FSDP's `reset_sharded_param` itself does when it re-pads
    a shard. False, changing nothing, where `p` needs a new DTensor."""
    old = p._local_tensor
    if (
        values.shape != old.shape
        or values.stride() != old.stride()
        or values.dtype != old.dtype
        or values.device != p.device
        or values.requires_grad
        or old.requires_grad
    ):
        return False
    p._local_tensor = values
    return True


def local_shape_and_offset(shape: Any, mesh: Any, placements: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's slice of a DTensor: local shape and offset in the global tensor."""
    compute = _lookup("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset")
    local, offset = compute(shape, mesh, placements)
    return tuple(local), tuple(offset)


def fsdp_unsharded(module: nn.Module, deferred: bool) -> list[tuple[nn.Module, str]]:
    """(owner, name) of FSDP parameters whose unsharded tensors FSDP has registered in their place. `deferred`:
    those whose sharded local tensors are still fake (or meta): a forward began before materialize (FSDP's
    pre-forward hook all-gathered into fresh, uninitialized tensors before torchlazy's guard refused it, and
    FSDP's state stayed mid-forward). Else the materialized ones (a forward with `reshard_after_forward=False`)."""
    found = []
    for owner, name, fsdp_param in fsdp_params(module):
        local = dtensor_local(fsdp_param.sharded_param)
        waiting = is_fake(local) or local.is_meta
        registered = owner._parameters.get(name) is fsdp_param.sharded_param
        if waiting == deferred and (
            not registered or fsdp_param.sharded_state != type(fsdp_param.sharded_state).SHARDED
        ):
            found.append((owner, name))
    return found


# (backend, op) of the float32 precisions a matmul, convolution or RNN computes under (`torch.backends.*.fp32_precision`;
# `torch.set_float32_matmul_precision` sets them too)
_PRECISIONS = (("generic", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"), ("cuda", "matmul"))
_AUTOCAST_DEVICES = ("cpu", "cuda")
_PRECISION_OF = getattr(torch._C, "_get_fp32_precision_getter", None)  # torch < 2.9: the legacy matmul setting only


def numerics() -> tuple[Any, ...]:
    """The process-wide settings that change the values compute gives (draws do not depend on them): the thread
    count (reductions, `orthogonal_`'s QR), deterministic mode (it fills `torch.empty`'s memory), the float32 matmul
    and convolution precisions, whether oneDNN runs. Recorded with each op, replayed under."""
    if _PRECISION_OF is not None:
        precisions: Any = tuple(_PRECISION_OF(*p) for p in _PRECISIONS)
    else:
        precisions = torch.get_float32_matmul_precision()
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,  # type: ignore[attr-defined]
        precisions,
        torch.backends.mkldnn.enabled,  # oneDNN's matmuls and convolutions, or torch's own kernels
    )


def _set_numerics(values: tuple[Any, ...], current: tuple[Any, ...]) -> None:
    threads, deterministic, warn_only, fill, precisions, mkldnn = values
    if mkldnn != current[5]:
        torch.backends.mkldnn.enabled = mkldnn
    if threads != current[0]:
        torch.set_num_threads(threads)
    if (deterministic, warn_only) != current[1:3]:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    if fill != current[3]:
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
    if precisions != current[4]:
        if isinstance(precisions, str):
            torch.set_float32_matmul_precision(precisions)
        else:
            for (backend, op), value in zip(_PRECISIONS, precisions):
                torch._C._set_fp32_precision_setter(backend, op, value)


@contextlib.contextmanager
def replay_settings(wanted: tuple[Any, ...]) -> Iterator[None]:
    """Run under the settings `wanted` (`numerics()` when an op was recorded) and with autocast off (the recorded
    ops are what autocast made of the program's, if it was on then; a replay under the caller's autocast gave
    other dtypes), then put the process's back."""
    current = numerics()
    autocast = [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
    if current == wanted and not autocast:
        yield
        return
    for device in autocast:
        torch.set_autocast_enabled(device, False)
    try:
        _set_numerics(wanted, current)
        yield
    finally:
        _set_numerics(current, wanted)
        for device in autocast:
            torch.set_autocast_enabled(device, True)


# ops that check computed values and raise when they fail, writing nothing (`torch.linalg.cholesky`'s error check,
# `torch._assert_async`): the recorder keeps them as checks, run on the values at materialize
VALUE_CHECKS = frozenset(
    id(op)
    for op in (
        torch.ops.aten._linalg_check_errors.default,
        torch.ops.aten._assert_async.default,
        torch.ops.aten._assert_async.msg,
    )
)


def _fsdp_modules(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """(path, module) of every module under `module` that FSDP2's `fully_shard` manages (by class: a module of
    the user's may have an attribute of FSDP's names)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded (importing it costs sympy)
    FSDPModule = getattr(fsdp, "FSDPModule", None)
    if FSDPModule is None:
        return
    for path, sub in module.named_modules():
        if isinstance(sub, FSDPModule):
            yield path, sub


def fsdp_sharded(module: nn.Module) -> str | None:
    """The path of the first module under `module` that FSDP2's `fully_shard` manages, or None."""
    return next((path for path, _ in _fsdp_modules(module)), None)


def fsdp_params(module: nn.Module) -> Iterator[tuple[nn.Module, str, Any]]:
    """(owner module, parameter name, FSDP's manager of it) for every FSDP2 module under `module`."""
    for _, sub in _fsdp_modules(module):
        state = sub._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12; older: one group or None
        if groups is None:
            single = getattr(state, "_fsdp_param_group", None)
            groups = [single] if single is not None else []
        for group in groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                yield info.module, info.param_name, fsdp_param
