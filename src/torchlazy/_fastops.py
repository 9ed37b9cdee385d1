"""The ops deferred construction is made of, run directly on the meta storage of fake tensors.

The recorder (`_deferred.py`) sees every op of a block. Nearly all of them are a handful of factories, fills,
draws, views and copies; for those, this module gives the fake output at a fraction of the fake-tensor mode's
cost (its cache, checks and Python references), and returns `SLOW` for anything unusual, which the fake-tensor
mode then runs. Also here: what the recorder needs to know of an op, read from its schema once (`op_info`), and
the flattening of op arguments without a pytree walk (`flatten`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import _meta_rules
from . import _torch_compat as tc
from ._errors import DeferredError, DtypeError, ShapeError
from ._record import register_layout

_aten = torch.ops.aten
_OVERWRITES = {
    _aten.normal_, _aten.uniform_, _aten.zero_, _aten.fill_, _aten.bernoulli_, _aten.random_,
    _aten.exponential_, _aten.geometric_, _aten.log_normal_, _aten.cauchy_, _aten.copy_,
}  # fmt: skip


def _training(args: Any, kwargs: Any) -> bool:
    return bool(args[5] if len(args) > 5 else kwargs.get("training"))


# ops that write arguments their schemas do not mark as written, and when: `native_batch_norm` (what `F.batch_norm`
# runs on the CPU) updates the running statistics in training mode (in eval mode it only reads them)
_HIDDEN_WRITES: dict[Any, tuple[tuple[tuple[int, str], ...], Any]] = {
    _aten.native_batch_norm.default: (((3, "running_mean"), (4, "running_var")), _training),
}


# What brings a constant made in the block (`torch.tensor(0)`) into the fake mode: aliased, not a view of a tensor
_LIFT_PACKETS = frozenset({torch.ops.aten.lift, torch.ops.aten.lift_fresh})
# In-place ops that change which memory a tensor shows or how, never the values in it (`set_` points a parameter
# at other memory: `register_parametrization`)
_RESHAPES_IN_PLACE = frozenset(
    getattr(torch.ops.aten, name)
    for name in ("t_", "transpose_", "unsqueeze_", "squeeze_", "as_strided_", "swapdims_", "swapaxes_", "set_")
)


class _OpInfo:
    """What the recorder needs to know of an operator, read from its schema once."""

    __slots__ = ("aliases", "generator", "hidden", "linalg", "overwrites", "quantizes", "random", "reshapes", "written")

    def __init__(self, func: Any) -> None:
        schema = tc.op_schema(func)
        arguments = schema.arguments
        self.written = tuple(
            (i, a.name) for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write
        )
        # a view op (its output aliases an input without writing it: `unbind`, `diagonal`, `select`, ...); a
        # shape-only in-place op (`t_`, `unsqueeze_`, `set_`: its output aliases what it writes, its data unread)
        self.aliases = func.overloadpacket not in _LIFT_PACKETS and any(
            r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
        )
        self.reshapes = func.overloadpacket in _RESHAPES_IN_PLACE
        self.hidden = _HIDDEN_WRITES.get(func)
        self.random = torch.Tag.nondeterministic_seeded in func.tags
        self.generator = next((i for i, a in enumerate(arguments) if a.name == "generator"), None)
        self.overwrites = func.overloadpacket in _OVERWRITES
        name = func.overloadpacket.__name__
        torchs = getattr(func, "namespace", "aten") == "aten"  # torch's own op, not another library's
        # linear algebra kernels that raise on the values they get (`svd` of a matrix with nan), where no separate
        # check op does (`cholesky`, `inv`: `_linalg_check_errors`)
        self.linalg = torchs and name in _RAISING_KERNELS
        # ops that make a quantized tensor (`quantize_per_tensor`, a quantized module's `_empty_affine_quantized`),
        # whose fake kernels report float32; not the float ops of quantization-aware training (`fake_quantize_*`),
        # nor other libraries' (`quantized_decomposed` returns plain integers)
        self.quantizes = torchs and "quantize" in name and "fake_quantize" not in name and "dequantize" not in name

    def written_by(self, args: Any, kwargs: Any) -> tuple[tuple[int, str], ...]:
        """The (index, name) of the arguments this call writes: its schema's, and those it writes unsaid."""
        if self.hidden is None or not self.hidden[1](args, kwargs):
            return self.written
        return self.written + self.hidden[0]


_OP_INFO: dict[int, _OpInfo] = {}


def op_info(func: Any) -> _OpInfo:
    info = _OP_INFO.get(id(func))  # by id: an OpOverload hashes in Python; the info keeps `func` alive
    if info is None:
        info = _OP_INFO[id(func)] = _OpInfo(func)
    return info


LEAF_TYPES = frozenset(
    {int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format}
)
SPECS: dict[Any, Any] = {}


_OTHER_LEAVES = (torch.Tensor, torch.Generator)


def _shallow(values: tuple[Any, ...]) -> tuple[list[Any], tuple[Any, ...]] | None:
    """The leaves of `values` and their layout (None for a leaf, (type, n) for a list or tuple of n
    leaves), when it holds only leaves and flat lists or tuples of them, as nearly all op arguments
    and outputs do; None for anything deeper."""
    leaves: list[Any] = []
    shape: list[Any] = []
    leaf_types, other_leaves = LEAF_TYPES, _OTHER_LEAVES  # the hot path: no call per value
    for x in values:
        kind = type(x)
        if kind is list or kind is tuple:
            for y in x:
                if type(y) not in leaf_types and not isinstance(y, other_leaves):
                    return None
            leaves.extend(x)
            shape.append((kind, len(x)))
        elif kind in leaf_types or isinstance(x, other_leaves):
            leaves.append(x)
            shape.append(None)
        else:
            return None
    return leaves, tuple(shape)


def leaves_of(*values: Any) -> list[Any]:
    """`tree_leaves(values)`, without a pytree walk for the usual shapes of op arguments and outputs."""
    shallow = _shallow(values)
    return shallow[0] if shallow is not None else tc.tree_leaves(values)


def flatten(args: Any, kwargs: Any) -> tuple[list[Any], Any]:
    """`tree_flatten((args, kwargs))` for the usual shapes of op arguments (leaves, flat lists of
    leaves): the spec is cached by shape, so no pytree walk runs on the hot path."""
    shallow = _shallow((*args, *kwargs.values()))
    if shallow is None:
        return tc.tree_flatten((args, kwargs))  # type: ignore[no-any-return]
    leaves, shape = shallow
    key = (len(args), tuple(kwargs), shape)
    spec = SPECS.get(key)
    if spec is None:
        spec = SPECS[key] = tc.tree_flatten((args, kwargs))[1]
        register_layout(spec, len(args), tuple(kwargs), shape)
    return leaves, spec


_RAISING_KERNELS = frozenset({"_linalg_svd", "_linalg_eigh", "linalg_eig"})


def _ids(ops: set[Any]) -> frozenset[int]:
    """Op sets hold ids: an OpOverload hashes in Python (a call per lookup on the hot path), an int in C.
    Overloads are unique objects that compare by identity, and these sets keep them referenced by torch."""
    return frozenset(id(op) for op in ops)


def _by_id(table: dict[Any, Any]) -> dict[int, Any]:
    return {id(op): value for op, value in table.items()}


SLOW = object()
# in-place draws whose fake kernels refuse `generator=` ("generator is not supported in refs")
_DRAWS_WITHOUT_GENERATOR_REFS = _ids({
    _aten.exponential_.default, _aten.cauchy_.default, _aten.geometric_.default, _aten.log_normal_.default,
})  # fmt: skip
FACTORIES = _ids({
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.zeros.default, _aten.ones.default,
    _aten.full.default, _aten.arange.default, _aten.arange.start, _aten.arange.start_step,
    _aten.linspace.default,
})  # fmt: skip
_IN_PLACE = _ids({
    _aten.uniform_.default, _aten.normal_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default,
    _aten.copy_.default, _aten.mul_.Tensor, _aten.mul_.Scalar, _aten.add_.Tensor, _aten.add_.Scalar,
    _aten.sub_.Tensor, _aten.div_.Tensor, _aten.div_.Scalar, _aten.clamp_.default, _aten.erfinv_.default,
    _aten.bernoulli_.float, _aten.exponential_.default,
})  # fmt: skip
# In-place ops that keep shape and dtype: their meta kernels (Python decompositions, the
# draws' ones importing torch.distributed.tensor and sympy) have nothing to compute.
FILLS = _ids({_aten.uniform_.default, _aten.normal_.default, _aten.fill_.Scalar, _aten.zero_.default})
ZERO, FILL_SCALAR, UNIFORM, NORMAL = (
    _aten.zero_.default,
    _aten.fill_.Scalar,
    _aten.uniform_.default,
    _aten.normal_.default,
)


def made_view(mode: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """A plain view (`PLAIN_VIEWS`) of the fake tensor `args[0]` of `mode`, no other tensor among the arguments:
    its meta kernel run on the meta storage, wrapped as a fake tensor on the same device (`detach`: one C++ call)."""
    target = args[0]
    if func is _aten.as_strided.default:
        _check_within_storage(target, args, kwargs)
    device = tc.fake_device(target)
    if func is _aten.detach.default and len(args) == 1 and not kwargs:
        detached = tc.fake_detached(mode, target, device)
        if detached is not None:
            return detached
    out = tc.run_fake_kernel(mode, func, args, kwargs)
    if isinstance(out, torch.Tensor):
        return tc.wrap_fake(mode, out, device)
    return [tc.wrap_fake(mode, t, device) for t in out]  # `split`: a list of views


def _check_within_storage(t: torch.Tensor, args: Any, kwargs: Any) -> None:
    """`as_strided` beyond the end of its storage: eager's check (meta storages are sized, their kernel skips it)."""
    size = args[1] if len(args) > 1 else kwargs.get("size")
    stride = args[2] if len(args) > 2 else kwargs.get("stride")
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset")
    offset = t.storage_offset() if offset is None else offset
    if not all(type(x) is int for x in (*size, *stride, offset)) or len(size) != len(stride) or 0 in size:
        return  # torch's own checks speak (symbolic, mismatched, or empty: nothing to hold)
    last = offset + sum((n - 1) * step for n, step in zip(size, stride))
    need, have = (last + 1) * t.element_size(), t.untyped_storage().nbytes()
    if need > have:
        raise ShapeError(
            f"`as_strided` with sizes {list(size)}, strides {list(stride)} and storage offset {offset} reaches "
            f"byte {need} of a storage of {have} bytes (a deferred tensor of shape {tuple(t.shape)}). Keep the "
            "view within the tensor's storage."
        )


def fill_refused(
    func: Any, target: torch.Tensor, args: Any, contiguous: bool = False
) -> tuple[type[Exception], str] | None:
    """What eager's kernel refuses in a fill or draw that meta kernels let pass, in eager's order: a draw into
    integers or bools, bounds the dtype cannot hold or in the wrong order, a negative or nan `std`, a draw into
    a tensor whose elements share memory (an `expand`ed view), a fill value the dtype cannot hold."""
    dtype = target.dtype
    if func is NORMAL or func is UNIFORM:
        # eager's uniform_ checks the dtype of any tensor; normal_ only of one with elements
        if not (dtype.is_floating_point or dtype.is_complex) and (func is UNIFORM or target.numel() > 0):
            return DtypeError, (
                f"it draws floating-point values, but the tensor is {dtype}. Draw into a floating-point tensor "
                "and convert it (`.to(dtype)`), or use `random_` for integers."
            )
        law = _law_refused(func, dtype, args)
        if law is not None:
            return DeferredError, law
        if not contiguous and _overlaps(target):  # a contiguous tensor's elements never share memory
            return ShapeError, (
                f"the tensor (shape {tuple(target.shape)}, strides {target.stride()}) has elements that share "
                "memory (an `expand`ed view), and a draw writes each one. Draw into `.contiguous()` or `.clone()` "
                "of it, or draw the unexpanded tensor."
            )
    elif func is FILL_SCALAR and len(args) > 1 and type(args[1]) in (int, float, complex):
        value = args[1]
        parts: tuple[Any, ...] = (value,)
        if type(value) is complex:  # a complex dtype takes its parts, a real one a value with no imaginary part
            if dtype == torch.bool:
                return None
            if dtype.is_complex:
                parts = (value.real, value.imag)
            elif value.imag == 0:
                parts = (value.real,)
            else:
                return DtypeError, (
                    f"{value!r} cannot be converted to {dtype} without overflow (it has an imaginary part). "
                    "Fill with a real value, or make the tensor complex."
                )
        if dtype in _UNCHECKED_SINGLE and target.numel() == 1:
            return None  # eager fills one half-precision element unchecked: a value beyond the range is +-inf
        if dtype is torch.complex32 and target.numel() != 1:
            dtype = torch.complex64  # eager checks many complex32 elements against float32's range only (inf)
        low, high, int_low, floating = _limits(dtype)
        for part in parts:
            if floating:  # inf and nan are values of the dtype
                over = part == part and part not in _INF and not low <= part <= high
            else:
                over = part != part or not (int_low if type(part) is int else low) <= part <= high
            if over:
                return DtypeError, (
                    f"{value!r} cannot be converted to {dtype} without overflow. Fill with a value in the dtype's "
                    "range, or make the tensor a wider dtype."
                )
    return None


# dtypes whose `fill_` of a single element converts the value without eager's overflow check (torch's one-element
# path): `torch.zeros((), dtype=torch.float16).fill_(-1e9)` is -inf (float8 saturates or is inf), two elements raise
_UNCHECKED_SINGLE = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
    }
)


def draw_refused(func: Any, args: Any, kwargs: Any) -> str | None:
    """What eager's `bernoulli_` and `random_` kernels refuse and their meta kernels let pass (a probability
    outside [0, 1], integer bounds the dtype cannot hold or in the wrong order): the message, or None."""
    packet = func.overloadpacket
    target = args[0] if args else None
    if not isinstance(target, torch.Tensor):
        return None
    if packet is _aten.bernoulli_ and func is not _aten.bernoulli_.Tensor:
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        if type(p) in (int, float) and not 0.0 <= p <= 1.0:
            return f"`p` must be in [0, 1] (eager raises here too), got {p}. Pass a probability."
        return None
    if packet is not _aten.random_ or len(args) < 2:
        return None
    low, high = (0, args[1]) if len(args) == 2 else (args[1], args[2])
    if type(low) is not int or type(high) not in (int, type(None)):
        return None
    if high is not None and low >= high:
        return f"it draws from [from, to) = [{low}, {high}), empty (eager raises here too). Pass from < to."
    dtype = target.dtype
    if dtype.is_complex or (high is None and target.numel() == 0):  # eager checks `from` alone only with elements
        return None
    if dtype.is_floating_point:
        finfo = torch.finfo(dtype)
        least, most = finfo.min, finfo.max
        top = 2 ** (
            round(-math.log2(finfo.eps)) + 1
        )  # `to` left open: the draws end at the last integer the dtype holds exactly
        if high is None and low >= top:
            return (
                f"`from`={low} is not below {top}, the largest integer {dtype} holds exactly, where the draws end "
                "when `to` is left out (eager raises here too). Pass a smaller `from`, or draw into a wider dtype."
            )
    else:
        info = torch.iinfo(dtype) if dtype is not torch.bool else None
        least, most = (0, 1) if info is None else (info.min, info.max)
    if not least <= low <= most or (high is not None and not least <= high - 1 <= most):
        return (
            f"[from, to) = [{low}, {high}) is out of bounds for {dtype}, which holds [{least}, {most}] (eager "
            "raises here too). Pass bounds the dtype can hold."
        )
    return None


def _law_refused(func: Any, dtype: torch.dtype, args: Any) -> str | None:
    """Eager's checks of a draw's numbers (`uniform_`'s bounds within the dtype and in order, `normal_`'s std
    at least 0), for any number of elements; None where they pass or are not plain numbers."""
    first, second = (args[1] if len(args) > 1 else 0.0), (args[2] if len(args) > 2 else 1.0)
    if type(first) not in (int, float) or type(second) not in (int, float):
        return None
    if func is NORMAL:
        if not second >= 0.0:
            return f"`std` must be at least 0 (eager raises here too), got {second}. Pass a std >= 0."
        return None
    if not dtype.is_complex:
        low, high = _limits(dtype)[:2]  # the dtype's finite range (its finfo)
        for name, bound in (("from", first), ("to", second)):
            if not low <= bound <= high:
                return (
                    f"`{name}`={bound} is out of bounds for {dtype} (eager raises here too). Pass finite bounds "
                    "the dtype can hold."
                )
    if first > second:
        return (
            f"it draws from [from, to) = [{first}, {second}), and `from` is above `to` (eager raises here too). "
            "Pass from <= to."
        )
    return None


_INF = (math.inf, -math.inf)
# dtype -> what fill_ takes: (low, high, low for Python ints, whether inf and nan are values)
_RANGES: dict[torch.dtype, tuple[float, float, float, bool]] = {}


def _limits(dtype: torch.dtype) -> tuple[float, float, float, bool]:
    limits = _RANGES.get(dtype)
    if limits is None:
        limits = _RANGES[dtype] = _range_of(dtype)
    return limits


def _range_of(dtype: torch.dtype) -> tuple[float, float, float, bool]:
    if dtype.is_floating_point or dtype.is_complex:  # a complex dtype's parts
        high = float(torch.finfo(dtype).max)
        return -high, high, -high, True
    if dtype == torch.bool:
        return -math.inf, math.inf, -math.inf, True
    info = torch.iinfo(dtype)
    # torch lets unsigned types take the integers -max..-1 (they wrap), not negative floats
    return info.min, info.max, (-info.max if info.min == 0 else info.min), False


def uniform_ok(low: float = 0.0, high: float = 1.0, **kwargs: Any) -> bool:
    return type(low) in (int, float) and type(high) in (int, float) and low <= high


def normal_ok(mean: float = 0.0, std: float = 1.0, **kwargs: Any) -> bool:
    return type(mean) in (int, float) and type(std) in (int, float) and std >= 0.0


VIEWS = _ids({
    _aten.detach.default, _aten.view.default, _aten.t.default, _aten.transpose.int, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.select.int, _aten.slice.Tensor, _aten.expand.default, _aten.permute.default,
    _aten.as_strided.default, _aten.alias.default, _aten.split.Tensor, _aten.split_with_sizes.default,
})  # fmt: skip
# Views whose meta kernel is cheap and checks all (`permute`'s imports sympy: it goes as `as_strided`)
PLAIN_VIEWS = VIEWS - _ids({_aten.permute.default})
_RULED_FACTORIES = _ids({_aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.linspace.default})
# A meta tensor has no values: these factories make what `empty` makes with the same arguments.
_FILLED = _ids({_aten.zeros.default, _aten.ones.default})
# Factories from a tensor (`t.new_zeros(size)`: its dtype and device, no read of its values): the
# factory that makes the same meta tensor, and how many arguments after `self` it takes (sizes).
_TENSOR_FACTORIES = _by_id({
    _aten.new_zeros.default: (_aten.empty.memory_format, 1), _aten.new_empty.default: (_aten.empty.memory_format, 1),
    _aten.new_ones.default: (_aten.empty.memory_format, 1), _aten.new_full.default: (_aten.empty.memory_format, 1),
    _aten.new_empty_strided.default: (_aten.empty_strided.default, 2),
})  # fmt: skip


def _makes_new_tensor(func: Any) -> bool:
    """An op of a tensor (its first argument) that writes none of its arguments and returns no view."""
    arguments = tc.op_schema(func).arguments
    return (
        bool(arguments) and str(arguments[0].type) == "Tensor" and not any(a.alias_info is not None for a in arguments)
    )


# Functional ops whose outputs `_meta_rules` makes from the inputs' geometry (its rules are swept against
# torch's kernels): what rejection samplers run between draws (torch's `trunc_normal_` compares its draws
# with its bounds, ors the masks, asks `.any()`, makes redraw buffers) and the float arithmetic of buffers
# computed in constructors. Their meta kernels are Python references that import dynamo and sympy on
# first use (~0.6 s) and cost ~10x more per call through the fake mode.
_BY_RULES = _ids(
    {op for op in _meta_rules.ops() if _makes_new_tensor(op)} - {_aten._unsafe_view.default, _aten.unsafe_split.Tensor}
)  # their outputs are views
_IN_PLACE_BY_RULES = _IN_PLACE & _ids(set(_meta_rules.ops()))  # checked by the rules where they answer
# The ops on fake tensors that `fast_fake` runs (factories and lifts take none).
TENSOR_OPS = frozenset(VIEWS | _TENSOR_FACTORIES.keys() | _IN_PLACE | _BY_RULES)
_LIFTS = _ids({_aten.lift_fresh.default, _aten.lift_fresh_copy.default})
_LIST_OPS = _ids({_aten.cat.default, _aten.stack.default})  # a list of tensors first
CPU = torch.device("cpu")
META = torch.device("meta")


def _plain_options(kwargs: dict[str, Any], device: torch.device) -> bool:
    """A factory's options ask for a strided, unpinned tensor on `device` (or leave it implied)."""
    asked = kwargs.get("device")
    return (
        (asked is None or asked == device)
        and kwargs.get("layout") in (None, torch.strided)
        and not kwargs.get("pin_memory")
    )


def _made_on_meta(mode: Any, factory: Any, args: Any, kwargs: Any, device: torch.device) -> Any:
    """A factory's tensor, made on the meta device: a fake tensor of `mode` on `device`."""
    if id(factory) in _FILLED:  # their meta kernels fill nothing, at twice `empty`'s cost
        factory = _aten.empty.memory_format
    with tc.no_dispatch():  # no tensor argument: no fake tensor to unwrap
        meta = _meta_rules.NOT_HANDLED
        if id(factory) in _RULED_FACTORIES:  # their meta kernels are Python references (sympy on first use)
            meta = _meta_rules.outputs(factory, args, {**kwargs, "device": META})
        if meta is _meta_rules.NOT_HANDLED:
            meta = factory(*args, **{**kwargs, "device": META})
    return tc.wrap_fake(mode, meta, device)


def fast_fake(mode: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """The op run directly on the meta storage of this thread's fake tensors, for the few ops
    nearly all construction is made of (factories, in-place fills and draws, views), and those
    `fully_shard` makes of each parameter (chunks, a zero-padded copy, views).

    The fake-tensor mode would give the same tensor through its cache and checks, at several
    times the cost (and its first miss imports sympy). Anything unusual (another device, a real
    tensor argument, a fake constant) returns `SLOW`: the fake-tensor mode runs it.
    """
    if id(func) in FACTORIES:
        if not _plain_options(kwargs, CPU):
            return SLOW
        for a in args:
            if isinstance(a, torch.Tensor):
                return SLOW
        return _made_on_meta(mode, func, args, kwargs, CPU)
    if id(func) in _LIFTS:  # `torch.tensor(...)`: a real tensor becomes a recorded constant
        real = args[0]
        if tc.is_fake(real) or real.device != CPU or real.layout != torch.strided:
            return SLOW
        with tc.no_dispatch():
            meta = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=META)
        return tc.wrap_fake(mode, meta, CPU)
    if id(func) in TENSOR_OPS:
        return fast_on_fakes(mode, func, args, kwargs)
    if id(func) in _LIST_OPS:
        return _fast_on_list(mode, func, args, kwargs)
    return SLOW


def _fast_on_list(mode: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """`cat` and `stack` of this mode's fake tensors (index tables built in constructors), from `_meta_rules`."""
    tensors = args[0] if args else None
    if type(tensors) not in (list, tuple) or not tensors or kwargs:
        return SLOW
    for x in tensors:
        if not (tc.is_fake(x) and tc.fake_mode_of(x) is mode and tc.fake_constant(x) is None):
            return SLOW
    device = tc.fake_device(tensors[0])
    if any(tc.fake_device(x) != device for x in tensors):
        return SLOW
    with tc.no_dispatch():
        out = _meta_rules.outputs(func, ([_stand_in(x) for x in tensors], *args[1:]), kwargs)
    return tc.wrap_fake(mode, out, device) if isinstance(out, torch.Tensor) else SLOW


def _stand_in(x: Any) -> Any:
    """A plain meta tensor of a fake tensor's geometry (run under `tc.no_dispatch()`); anything else as it is."""
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=META)
    return x


def fast_on_fakes(mode: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """`fast_fake` for the ops on tensors: new tensors and views wrap a meta tensor, in-place ops
    return `self` once the kernel has checked their arguments."""
    self = args[0]
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor) and not (
            tc.is_fake(x) and tc.fake_mode_of(x) is mode and tc.fake_constant(x) is None
        ):
            return SLOW
        if x is not self and isinstance(x, torch.Tensor) and tc.fake_device(x) != tc.fake_device(self):
            return SLOW  # the meta kernel sees meta alone: the fake mode checks devices
    made = _TENSOR_FACTORIES.get(id(func))
    if made is not None:  # as a plain factory: no meta kernel of the new_* op (a Python decomposition)
        device = tc.fake_device(self)
        if not _plain_options(kwargs, device):
            return SLOW
        factory, sizes = made
        dtype = kwargs.get("dtype") or self.dtype
        return _made_on_meta(mode, factory, args[1 : 1 + sizes], {**kwargs, "dtype": dtype}, device)
    if id(func) in FILLS:  # they keep shape and dtype: nothing to check but their arguments
        if func is _aten.uniform_.default and not uniform_ok(*args[1:3], **kwargs):
            return SLOW
        if func is _aten.normal_.default and not normal_ok(*args[1:3], **kwargs):
            return SLOW
        return self
    if func is _aten.copy_.default and _copies_into(self, args[1]):
        return self  # nothing to check but the shapes (copy_ casts); its meta kernel imports sympy on first use
    device = tc.fake_device(self)
    if id(func) in _BY_RULES:
        return _by_rules(mode, func, args, kwargs, device)
    if id(func) in _IN_PLACE_BY_RULES:  # their meta kernels are Python references (sympy on first use)
        with tc.no_dispatch():
            checked = _meta_rules.outputs(func, tuple(_stand_in(x) for x in args), kwargs)
        if checked is not _meta_rules.NOT_HANDLED:
            return self
    if func is _aten.as_strided.default:
        _check_within_storage(self, args, kwargs)
    if func is _aten.permute.default:
        strided = _permuted(self, args[1:], kwargs)
        if strided is None:
            return SLOW  # the fake mode gives torch's error
        func, args, kwargs = _aten.as_strided.default, strided, {}
    out = tc.run_fake_kernel(mode, func, args, for_fake_kernel(func, kwargs))
    if id(func) in _IN_PLACE:
        return self
    if isinstance(out, torch.Tensor):
        return tc.wrap_fake(mode, out, device)
    return [tc.wrap_fake(mode, t, device) for t in out]  # `split`: a list of views


def for_fake_kernel(func: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for `func`'s fake kernel: draws whose kernels (Python references) refuse `generator=`, which
    changes no shape, run without it for shapes and argument checks (the record keeps the call as made)."""
    if kwargs.get("generator") is not None and id(func) in _DRAWS_WITHOUT_GENERATOR_REFS:
        return {k: v for k, v in kwargs.items() if k != "generator"}
    return kwargs


def _copies_into(self: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether `self.copy_(src)` is valid: `src` broadcasts to `self`, and no element of `self` shares its memory
    with another along an expanded dim (torch's one overlap refusal; `x[:, 0] = ...` writes a strided view)."""
    if src.dim() > self.dim() or _overlaps(self):
        return False
    return all(m in (1, n) for m, n in zip(reversed(src.shape), reversed(self.shape)))


def _overlaps(t: torch.Tensor) -> bool:
    """Whether elements of `t` share memory along an expanded dim (stride 0): torch refuses writes into it."""
    return any(n > 1 and stride == 0 for n, stride in zip(t.shape, t.stride()))


def _permuted(self: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """`permute`'s view as `as_strided` arguments (its meta kernel imports torch.distributed.tensor and sympy
    on first use, ~0.5 s); None for anything but a valid permutation."""
    n = self.dim()
    if len(rest) != 1 or kwargs or type(rest[0]) not in (list, tuple) or any(type(d) is not int for d in rest[0]):
        return None
    dims = [d + n if d < 0 else d for d in rest[0]]
    if sorted(dims) != list(range(n)):
        return None
    return self, [self.shape[d] for d in dims], [self.stride(d) for d in dims], self.storage_offset()


def _by_rules(mode: Any, func: Any, args: Any, kwargs: Any, device: torch.device) -> Any:
    """`func`'s output from `_meta_rules`, given meta stand-ins of its fake tensors (their geometry);
    `SLOW` where the rules leave the call to torch (then the fake mode runs it, errors included)."""
    if kwargs.get("device") not in (None, device):
        return SLOW
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    with tc.no_dispatch():  # plain meta tensors, whatever modes run
        out = _meta_rules.outputs(func, tuple(_stand_in(x) for x in args), kwargs)
    return tc.wrap_fake(mode, out, device) if isinstance(out, torch.Tensor) else SLOW
