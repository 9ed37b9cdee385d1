"""Output tensors of the common aten ops on the meta device, from shapes alone.

torch implements the meta kernels of most compute ops in Python (its meta registrations and
references), and the first call imports its dynamo compiler and sympy: about a second, more than
`import torch` itself, before the first `tl.build` or `tl.summary` can answer. Shape inference
needs only each output's shape, dtype and strides, so the few ops nearly every forward is made
of (pointwise maths, broadcasting arithmetic, matrix products, convolutions, normalizations,
reductions, embeddings, softmax) get them here: a table of rules, one per kind of op (plus group norm, 2-d upsampling and pixel
shuffle, common in vision models).

A rule answers only calls it is sure of: meta tensors, contiguous and strided, floating
dtypes where the op computes values (and integers for add, sub, mul and sums), valid shapes. Anything else (a mismatch eager would
refuse, channels-last inputs, integer division, an op not in the table) returns
`NOT_HANDLED`, and the caller runs torch's own kernel, which gives torch's own answer or
error. `tests/test_meta_rules.py` compares every rule with torch's kernels.

>>> import torch
>>> a, b = torch.empty(4, 16, device="meta"), torch.empty(16, 3, device="meta")
>>> outputs(torch.ops.aten.mm.default, (a, b), {}).shape
torch.Size([4, 3])
>>> outputs(torch.ops.aten.mm.default, (a, a), {}) is NOT_HANDLED  # eager refuses: torch says why
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["NOT_HANDLED", "outputs", "ops"]

NOT_HANDLED: Any = object()
_aten = torch.ops.aten
_META = torch.device("meta")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)  # their normalization statistics are float32


class _Refuse(Exception):
    """Not sure of this call: torch's kernel decides."""


def _empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=_META)


def _plain(t: Any, floating: bool = True, strides: bool = False) -> torch.Tensor:
    """`t` as a tensor a rule may read: meta, strided, contiguous unless the output's layout does not
    depend on the inputs' (`strides=True`), and floating when values are computed."""
    if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise _Refuse  # a number, or a tensor subclass with its own rules
    if t.device != _META or t.layout != torch.strided or not (strides or t.is_contiguous()):
        raise _Refuse
    if floating and t.dtype not in _FLOATS:
        raise _Refuse
    return t


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """`t` for an op whose output follows the input's suggested memory format: refused when a 4-d or 5-d
    tensor is channels-last contiguous as well (size-1 dims make both hold), where torch picks channels-last."""
    if (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        raise _Refuse
    return t


def _numbers(values: Sequence[Any]) -> None:
    """Extra arguments of pointwise maths: plain numbers, strings and None only (no tensor, no complex)."""
    if any(type(v) not in (int, float, bool, str, type(None)) for v in values):
        raise _Refuse


def _broadcast(*shapes: Sequence[int]) -> list[int]:
    out: list[int] = []
    for dims in zip(*(([1] * (max(map(len, shapes)) - len(s))) + list(s) for s in shapes)):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise _Refuse
        out.append(sizes.pop() if sizes else 1)
    return out


def _dim(d: int, ndim: int) -> int:
    if not -max(ndim, 1) <= d < max(ndim, 1):
        raise _Refuse
    return d % max(ndim, 1)


# -- rules: (args, kwargs) of the aten overload -> output(s) -------------------------------------


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its memory without gaps or overlap, in some order of its dims."""
    dims = sorted((t.stride(i), n) for i, n in enumerate(t.shape) if n != 1)
    step = 1
    for stride, n in dims:
        if stride != step:
            return False
        step *= n
    return True


def _same(x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Pointwise maths of one floating tensor (and numbers): its shape, dtype and layout (a transposed
    input gives a transposed output, as torch's pointwise kernels keep a dense input's order)."""
    x = _plain(x, strides=True)
    _numbers((*args, *kwargs.values()))
    return _like(x, x.dtype)


def _like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output of pointwise maths on `x` alone: `x`'s strides when it is dense, else dense in the order of
    `x`'s strides (contiguous for row-major order), as torch's pointwise kernels lay it out."""
    if x.is_contiguous():
        return _empty(x.shape, dtype)
    if _dense(x):
        return torch.empty_strided(tuple(x.shape), x.stride(), dtype=dtype, device=_META)
    return _dense_in(tuple(x.shape), _order(x), dtype)


def _order(t: torch.Tensor) -> list[int]:
    """`t`'s dims from outermost to innermost, where its strides alone decide it (no size-1 dim, no
    broadcast dim, no two equal strides: the cases where torch breaks ties with other rules)."""
    strides = t.stride()
    if 1 in t.shape or 0 in strides or len(set(strides)) != len(strides):
        raise _Refuse
    return sorted(range(t.dim()), key=lambda i: -strides[i])


def _dense_in(shape: tuple[int, ...], order: list[int], dtype: torch.dtype) -> torch.Tensor:
    strides = [0] * len(shape)
    step = 1
    for i in reversed(order):
        strides[i] = step
        step *= shape[i]
    return torch.empty_strided(shape, strides, dtype=dtype, device=_META)


def _masked(x: Any, diagonal: int = 0) -> torch.Tensor:
    """tril/triu: a contiguous copy (of a contiguous input: torch's layout rules for others differ)."""
    x = _plain(x)
    if x.dim() < 2 or type(diagonal) is not int:
        raise _Refuse
    return _empty(x.shape, x.dtype)


def _in_place(x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """In-place pointwise maths: `self`, when the other operands broadcast to it without promotion."""
    return _in_place_of(_plain(x, strides=True), args, kwargs)


def _in_place_arithmetic(x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`_in_place` for add_, sub_ and mul_, of integer tensors too (index tables): torch refuses to write a float
    result into an integer tensor, and so does the rule."""
    x = _plain(x, floating=False, strides=True)
    if x.dtype not in (*_FLOATS, *_INTEGERS):
        raise _Refuse
    return _in_place_of(x, args, kwargs)


def _in_place_of(x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    _numbers([v for v in (*args, *kwargs.values()) if not isinstance(v, torch.Tensor)])
    for other in (*args, *kwargs.values()):
        if isinstance(other, torch.Tensor):
            _plain(other, floating=False, strides=True)
            if _broadcast(x.shape, other.shape) != list(x.shape):
                raise _Refuse
        if isinstance(other, (torch.Tensor, int, float)) and torch.result_type(x, other) != x.dtype:
            raise _Refuse
    return x


def _fill(x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """In-place fills and draws: `self` (meta tensors have no values to write)."""
    x = _plain(x, floating=False, strides=True)
    _numbers((*args, *kwargs.values()))
    return x


def _binary(a: Any, b: Any, *rest: Any, **kwargs: Any) -> torch.Tensor:
    """Broadcasting arithmetic of floating tensors and numbers, with torch's type promotion."""
    tensors = _operands(a, b, rest, kwargs, floating=True)
    dtype = torch.result_type(a, b)
    if dtype not in _FLOATS:
        raise _Refuse
    return _broadcast_out(tensors, dtype)


_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _arithmetic(a: Any, b: Any, *rest: Any, **kwargs: Any) -> torch.Tensor:
    """`_binary` for the ops whose integer results are integers too (add, sub, mul, maximum, minimum): index
    maths in constructors (relative position tables). Not bools (torch refuses `-` on them), nor a float
    `alpha` with an integer result (torch refuses it)."""
    tensors = _operands(a, b, rest, kwargs, floating=False)
    dtype = torch.result_type(a, b)
    if any(t.dtype not in (*_FLOATS, *_INTEGERS) for t in tensors) or dtype not in (*_FLOATS, *_INTEGERS):
        raise _Refuse
    if dtype in _INTEGERS and any(type(v) is float for v in (*rest, *kwargs.values())):
        raise _Refuse
    return _broadcast_out(tensors, dtype)


def _compare(a: Any, b: Any) -> torch.Tensor:
    """Comparisons and logical and/or of (real) tensors and numbers: a bool tensor laid out as `_binary`'s."""
    tensors = _operands(a, b, (), {}, floating=False)
    if torch.result_type(a, b).is_complex:
        raise _Refuse
    return _broadcast_out(tensors, torch.bool)


def _bitwise(a: Any, b: Any) -> torch.Tensor:
    """Bitwise and/or of integer or bool tensors (a mask's `|`), with torch's type promotion."""
    tensors = _operands(a, b, (), {}, floating=False)
    dtype = torch.result_type(a, b)
    if dtype.is_floating_point or dtype.is_complex:
        raise _Refuse
    return _broadcast_out(tensors, dtype)


def _logical_not(x: Any) -> torch.Tensor:
    x = _plain(x, floating=False, strides=True)
    if x.dtype.is_complex:
        raise _Refuse
    return _like(x, torch.bool)


def _all_of(x: Any) -> torch.Tensor:
    """`any`/`all` over a whole bool tensor: one bool (another dtype's answer is torch's to give)."""
    if _plain(x, floating=False, strides=True).dtype != torch.bool:
        raise _Refuse
    return _empty((), torch.bool)


def _operands(a: Any, b: Any, rest: Any, kwargs: dict[str, Any], floating: bool) -> list[torch.Tensor]:
    tensors = [_plain(t, floating=floating, strides=True) for t in (a, b) if isinstance(t, torch.Tensor)]
    _numbers([*(t for t in (a, b) if not isinstance(t, torch.Tensor)), *rest, *kwargs.values()])
    if not tensors:
        raise _Refuse
    return tensors


def _canonical(t: torch.Tensor) -> bool:
    """Contiguous with the strides `torch.empty` gives, size-1 dims included: torch's pointwise kernels order
    the output's dims by every operand's strides, a size-1 dim's too (`x.t()[:, :1].unsqueeze(1)` is contiguous
    with strides (1, 3, 3), and broadcast with a contiguous tensor gives a column-major output)."""
    step, strides = 1, t.stride()
    for i in range(t.dim() - 1, -1, -1):
        if strides[i] != step:
            return False
        step *= max(t.shape[i], 1)
    return True


def _in_row_order(tensors: list[torch.Tensor], shape: list[int]) -> bool:
    """Whether every operand, broadcast to `shape`, runs its dims in row-major order: along the dims of the
    output that it does not broadcast, its strides strictly decrease (`x[:, None] - x[None, :]`). torch's
    pointwise kernels then put no dim before another: the output is contiguous. Equal strides are not
    modelled (torch breaks such ties by other rules), nor outputs with a size-1 dim (whose strides, odd ones
    included, take part in torch's ordering): the caller asks only without one."""
    for t in tensors:
        pad = len(shape) - t.dim()
        kept = [t.stride(i) for i in range(t.dim()) if t.shape[i] > 1 and shape[pad + i] > 1 and t.stride(i)]
        if any(a <= b for a, b in zip(kept, kept[1:])):
            return False
    return True


def _broadcast_out(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The output of broadcasting pointwise `tensors`: a lone tensor's layout (the other operand a
    number); contiguous when every operand is; the operands' own when they share one dense layout;
    else dense in the order of the first operand's strides, when it has the output's shape and its
    strides alone decide the order."""
    shape = _broadcast(*(t.shape for t in tensors))
    if len(tensors) == 1:
        return _like(tensors[0], dtype)
    if all(_canonical(t) for t in tensors) or (1 not in shape and _in_row_order(tensors, shape)):
        return _empty(shape, dtype)
    first = tensors[0]
    if list(first.shape) != shape:
        raise _Refuse
    if all(t.shape == first.shape and t.stride() == first.stride() for t in tensors) and _dense(first):
        return torch.empty_strided(tuple(shape), first.stride(), dtype=dtype, device=_META)
    return _dense_in(tuple(shape), _order(first), dtype)


def _where(cond: Any, a: Any, b: Any) -> torch.Tensor:
    c = _plain(cond, floating=False)
    if c.dtype != torch.bool:
        raise _Refuse
    tensors = [_plain(t) for t in (a, b)]
    dtype = torch.result_type(a, b)
    return _empty(_broadcast(c.shape, *(t.shape for t in tensors)), dtype)


def _mm(a: Any, b: Any) -> torch.Tensor:
    a, b = _plain(a, strides=True), _plain(b, strides=True)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise _Refuse
    return _empty((a.shape[0], b.shape[1]), a.dtype)


def _bmm(a: Any, b: Any) -> torch.Tensor:
    a, b = _plain(a, strides=True), _plain(b, strides=True)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1] or a.dtype != b.dtype:
        raise _Refuse
    return _empty((a.shape[0], a.shape[1], b.shape[2]), a.dtype)


def _addmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> torch.Tensor:
    out = _mm(a, b)
    bias = _plain(bias, strides=True)
    if bias.dtype != out.dtype or _broadcast(bias.shape, out.shape) != list(out.shape):
        raise _Refuse
    return out


def _convolution(
    x: Any,
    w: Any,
    bias: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    x, w = _row_major(_plain(x)), _row_major(_plain(w))
    n = w.dim() - 2
    if x.dim() != w.dim() or n < 1 or x.dtype != w.dtype or groups < 1 or w.numel() == 0:
        raise _Refuse
    if not (len(stride) == len(padding) == len(dilation) == len(output_padding) == n):
        raise _Refuse
    in_channels = w.shape[0] if transposed else w.shape[1] * groups
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    if x.shape[1] != in_channels or (w.shape[0] % groups):
        raise _Refuse
    if bias is not None and (_plain(bias).shape != (out_channels,) or bias.dtype != x.dtype):
        raise _Refuse
    spatial = []
    for i in range(n):
        size, k, s, p, d = x.shape[2 + i], w.shape[2 + i], stride[i], padding[i], dilation[i]
        if transposed:
            out = (size - 1) * s - 2 * p + d * (k - 1) + output_padding[i] + 1
        else:
            out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1 or s < 1 or d < 1 or p < 0 or (transposed and not 0 <= output_padding[i] < max(s, d)):
            raise _Refuse
        spatial.append(out)
    return _empty((x.shape[0], out_channels, *spatial), x.dtype)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW else dtype


def _batch_norm(
    x: Any, weight: Any, bias: Any, mean: Any, var: Any, training: bool, momentum: float, eps: float
) -> tuple[torch.Tensor, ...]:
    x = _plain(x)
    if x.dim() < 2 or (not training and (mean is None or var is None)):
        raise _Refuse
    if training and x.numel() <= x.shape[1]:  # one value per channel: eager refuses
        raise _Refuse
    for t in (weight, bias, mean, var):
        if t is not None and tuple(_plain(t).shape) != (x.shape[1],):
            raise _Refuse
    stats = _stats_dtype(x.dtype)
    return _empty(x.shape, x.dtype), _empty((x.shape[1],), stats), _empty((x.shape[1],), stats)


def _layer_norm(x: Any, shape: Sequence[int], weight: Any, bias: Any, eps: float) -> tuple[torch.Tensor, ...]:
    x = _plain(x)
    k = len(shape)
    if k == 0 or x.dim() < k or list(x.shape[x.dim() - k :]) != list(shape):
        raise _Refuse
    for t in (weight, bias):
        if t is not None and list(_plain(t).shape) != list(shape):
            raise _Refuse
    stats = (*x.shape[: x.dim() - k], *([1] * k))
    return _empty(x.shape, x.dtype), _empty(stats, _stats_dtype(x.dtype)), _empty(stats, _stats_dtype(x.dtype))


def _group_norm(
    x: Any, weight: Any, bias: Any, n: int, c: int, hw: int, groups: int, eps: float
) -> tuple[torch.Tensor, ...]:
    x = _plain(x)
    if x.dim() < 2 or (n, c) != tuple(x.shape[:2]) or n * c * hw != x.numel() or groups < 1 or c % groups:
        raise _Refuse
    for t in (weight, bias):
        if t is not None and tuple(_plain(t).shape) != (c,):
            raise _Refuse
    return _empty(x.shape, x.dtype), _empty((n, groups), x.dtype), _empty((n, groups), x.dtype)  # stats as x


def _mean(x: Any, dims: Sequence[int] | None, keepdim: bool = False, *, dtype: Any = None) -> torch.Tensor:
    x = _plain(x)
    if dtype is not None:
        raise _Refuse
    return _empty(_reduced(x, dims, keepdim), x.dtype)


def _reduced(x: torch.Tensor, dims: Sequence[int] | None, keepdim: bool) -> list[int]:
    """The shape of a reduction of `x` over `dims` (None: all; an empty list is refused, torch's meaning of it
    has changed over versions)."""
    if dims is not None and len(dims) == 0:
        raise _Refuse
    reduced = {_dim(d, x.dim()) for d in dims} if dims is not None else set(range(x.dim()))
    if dims is not None and len(reduced) != len(dims):
        raise _Refuse
    return [1 if i in reduced else n for i, n in enumerate(x.shape) if keepdim or i not in reduced]


def _sum(x: Any, dims: Sequence[int] | None, keepdim: bool = False, *, dtype: Any = None) -> torch.Tensor:
    """`sum` over dims: `mean`'s shape; integers and bools sum to int64 unless a dtype is asked."""
    x = _plain(x, floating=False)
    if x.dtype not in (*_FLOATS, *_INTEGERS, torch.bool) or (dtype is not None and dtype not in (*_FLOATS, *_INTEGERS)):
        raise _Refuse
    return _empty(_reduced(x, dims, keepdim), dtype or (x.dtype if x.dtype in _FLOATS else torch.int64))


def _softmax(x: Any, dim: int, third: Any = None) -> torch.Tensor:
    x = _plain(x)
    _dim(dim, x.dim())
    if third not in (None, False):  # a dtype, or half_to_float
        raise _Refuse
    return _empty(x.shape, x.dtype)


def _cat(tensors: Sequence[Any], dim: int = 0) -> torch.Tensor:
    # the output is contiguous whatever the inputs' strides, but for 4-d and 5-d inputs, whose
    # channels-last layout it keeps
    ts = [_plain(t, floating=False, strides=True) for t in tensors]
    if any(t.dim() in (4, 5) and not t.is_contiguous() for t in ts):
        raise _Refuse
    if not ts or len({t.dtype for t in ts}) != 1 or len({t.dim() for t in ts}) != 1 or ts[0].dim() == 0:
        raise _Refuse
    d = _dim(dim, ts[0].dim())
    first = list(ts[0].shape)
    for t in ts[1:]:
        if [n for i, n in enumerate(t.shape) if i != d] != [n for i, n in enumerate(first) if i != d]:
            raise _Refuse
    first[d] = sum(t.shape[d] for t in ts)
    return _empty(first, ts[0].dtype)


def _stack(tensors: Sequence[Any], dim: int = 0) -> torch.Tensor:
    # contiguous whatever the inputs' strides (`cat` of them unsqueezed), but where that `cat` is 4-d or 5-d
    ts = [_plain(t, floating=False, strides=True) for t in tensors]
    if any(t.dim() in (3, 4) and not t.is_contiguous() for t in ts):
        raise _Refuse
    if not ts or len({tuple(t.shape) for t in ts}) != 1 or len({t.dtype for t in ts}) != 1:
        raise _Refuse
    d = _dim(dim, ts[0].dim() + 1)
    shape = list(ts[0].shape)
    shape.insert(d, len(ts))
    return _empty(shape, ts[0].dtype)


def _embedding(weight: Any, indices: Any, *rest: Any) -> torch.Tensor:
    weight, indices = _plain(weight), _plain(indices, floating=False)
    if weight.dim() != 2 or indices.dtype not in (torch.int64, torch.int32):
        raise _Refuse
    return _empty((*indices.shape, weight.shape[1]), weight.dtype)


def _empty_like(x: Any, *, dtype: Any = None, memory_format: Any = None, **kwargs: Any) -> torch.Tensor:
    x = _plain(x, floating=False, strides=True)
    if memory_format not in (None, torch.preserve_format, torch.contiguous_format):
        raise _Refuse
    if kwargs.get("device") not in (None, _META) or kwargs.get("layout") not in (None, torch.strided):
        raise _Refuse
    if kwargs.get("pin_memory"):
        raise _Refuse
    dtype = x.dtype if dtype is None else dtype
    return _empty(x.shape, dtype) if memory_format == torch.contiguous_format else _like(x, dtype)


def _clone(x: Any, *, memory_format: Any = None) -> torch.Tensor:
    return _empty_like(x, memory_format=memory_format)


def _to_copy(x: Any, *, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
    """A copy in another dtype (`.to(dtype)`, `.float()`): laid out as `empty_like` lays it out."""
    return _empty_like(x, dtype=dtype, **kwargs)


def _split(x: Any, size: int, dim: int = 0) -> list[torch.Tensor]:
    """`unsafe_split`: the pieces laid out as the input (each a strided window of it)."""
    x = _plain(x, floating=False, strides=True)
    d = _dim(dim, x.dim())
    n = x.shape[d]
    if size < 1 and n > 0 or x.dim() == 0:
        raise _Refuse
    pieces = []
    for start in range(0, n, size) if n else [0]:
        shape = list(x.shape)
        shape[d] = min(size, n - start)
        pieces.append(torch.empty_strided(shape, x.stride(), dtype=x.dtype, device=_META))
    return pieces


def _unsafe_view(x: Any, size: Sequence[int]) -> torch.Tensor:
    x = _plain(x, floating=False)
    shape = list(size)
    if shape.count(-1) > 1 or any(n < -1 for n in shape):
        raise _Refuse
    if -1 in shape:
        known = math.prod(n for n in shape if n != -1)
        if known == 0 or x.numel() % known:
            raise _Refuse
        shape[shape.index(-1)] = x.numel() // known
    if math.prod(shape) != x.numel():
        raise _Refuse
    return _empty(shape, x.dtype)


def _pool_sizes(
    x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int] | int,
    dilation: Sequence[int] | int, ceil_mode: bool,
) -> list[int]:  # fmt: skip
    """Output sizes of 2-d pooling over the last two dims of `x`, with torch's ceil-mode rule."""
    if x.dim() not in (3, 4):
        raise _Refuse

    def two(v: Sequence[int] | int, default: Sequence[int]) -> list[int]:
        v = [v] if isinstance(v, int) else list(v) or list(default)
        return v * 2 if len(v) == 1 else v

    k, p, d = two(kernel, ()), two(padding, (0,)), two(dilation, (1,))
    s = two(stride, k)
    out = []
    for i in range(2):
        size = x.shape[x.dim() - 2 + i]
        if len(k) != 2 or len(s) != 2 or k[i] < 1 or s[i] < 1 or d[i] < 1 or not 0 <= p[i] <= k[i] // 2:
            raise _Refuse
        span = size + 2 * p[i] - d[i] * (k[i] - 1) - 1
        n = (span + (s[i] - 1 if ceil_mode else 0)) // s[i] + 1
        if ceil_mode and (n - 1) * s[i] >= size + p[i]:
            n -= 1
        if n < 1:
            raise _Refuse
        out.append(n)
    return out


def _max_pool2d(
    x: Any, kernel: Sequence[int], stride: Sequence[int] = (), padding: Any = 0, dilation: Any = 1,
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    x = _row_major(_plain(x))
    shape = (*x.shape[:-2], *_pool_sizes(x, kernel, stride, padding, dilation, ceil_mode))
    return _empty(shape, x.dtype), _empty(shape, torch.int64)


def _avg_pool2d(
    x: Any, kernel: Sequence[int], stride: Sequence[int] = (), padding: Any = 0, ceil_mode: bool = False,
    count_include_pad: bool = True, divisor_override: Any = None,
) -> torch.Tensor:  # fmt: skip
    x = _row_major(_plain(x))
    return _empty((*x.shape[:-2], *_pool_sizes(x, kernel, stride, padding, 1, ceil_mode)), x.dtype)


def _adaptive_avg_pool2d(x: Any, size: Sequence[int]) -> torch.Tensor:
    x = _row_major(_plain(x))
    if x.dim() not in (3, 4) or len(size) != 2 or any(n < 1 for n in size) or 0 in x.shape[-2:]:
        raise _Refuse
    return _empty((*x.shape[:-2], *size), x.dtype)


def _upsample2d(x: Any, size: Sequence[int], *rest: Any) -> torch.Tensor:
    """Nearest and bilinear 2-d upsampling to an explicit output size (the scales only say how values are read)."""
    x = _row_major(_plain(x))
    _numbers(rest)
    if x.dim() != 4 or len(size) != 2 or any(n < 1 for n in size) or 0 in x.shape:
        raise _Refuse
    return _empty((*x.shape[:2], *size), x.dtype)


def _pixel_shuffle(x: Any, r: int) -> torch.Tensor:
    x = _row_major(_plain(x))
    if x.dim() < 3 or type(r) is not int or r < 1 or x.shape[-3] % (r * r):
        raise _Refuse
    c, h, w = x.shape[-3:]
    return _empty((*x.shape[:-3], c // (r * r), h * r, w * r), x.dtype)


def _factory(size: Sequence[int], *rest: Any, **kwargs: Any) -> torch.Tensor:
    """zeros/ones/full on the meta device: an empty tensor (the values are not kept anyway)."""
    if kwargs.get("device") != _META or kwargs.get("layout") not in (None, torch.strided):
        raise _Refuse
    if any(n < 0 for n in size) or kwargs.get("pin_memory"):
        raise _Refuse
    dtype = kwargs.get("dtype")
    if dtype is None:
        if rest and not isinstance(rest[0], float):  # full with an integer or bool fill value infers it
            raise _Refuse
        dtype = torch.get_default_dtype()
    return _empty(size, dtype)


def _on_meta(kwargs: dict[str, Any]) -> None:
    """A factory's options: a plain tensor on the meta device."""
    if kwargs.get("device") != _META or kwargs.get("layout") not in (None, torch.strided) or kwargs.get("pin_memory"):
        raise _Refuse


def _arange(*bounds: Any, **kwargs: Any) -> torch.Tensor:
    """arange of Python ints as int64 (index tables): ceil((end - start) / step) elements, computed exactly as
    torch's int64 kernel does. Other dtypes count in their own precision: left to torch."""
    _on_meta(kwargs)
    if (
        not 1 <= len(bounds) <= 3
        or any(type(b) is not int for b in bounds)
        or kwargs.get("dtype") not in (None, torch.int64)
    ):
        raise _Refuse
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
    if step == 0 or (end - start) * step < 0:  # torch refuses bounds that the step cannot join
        raise _Refuse
    return _empty([-(-(end - start) // step)], torch.int64)


def _linspace(start: Any, end: Any, steps: Any, **kwargs: Any) -> torch.Tensor:
    """linspace: `steps` elements, of the default dtype unless one is asked."""
    _on_meta(kwargs)
    _numbers([start, end])
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    if type(steps) is not int or steps < 0 or dtype not in (*_FLOATS, *_INTEGERS):
        raise _Refuse
    return _empty([steps], dtype)


# aten overload -> rule
_RULES: dict[Any, Callable[..., Any]] = {}
for _name in (
    "relu", "gelu", "silu", "sigmoid", "tanh", "neg", "rsqrt", "sqrt", "exp", "log", "sin", "cos", "abs", "erf",
    "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "sign", "log2", "reciprocal",
):  # fmt: skip
    _RULES[getattr(_aten, _name).default] = _same
    if hasattr(_aten, _name + "_"):
        _RULES[getattr(_aten, _name + "_").default] = _in_place
_RULES.update(
    {
        _aten.tril.default: _masked,
        _aten.triu.default: _masked,
        _aten.pow.Tensor_Scalar: _same,
        _aten.mul.Scalar: _same,
        _aten.div.Scalar: _same,
        _aten.add.Scalar: _same,
        _aten.sub.Scalar: _same,
        _aten.clamp.default: _same,
        _aten.add.Tensor: _arithmetic,
        _aten.sub.Tensor: _arithmetic,
        _aten.mul.Tensor: _arithmetic,
        _aten.div.Tensor: _binary,
        _aten.maximum.default: _arithmetic,
        _aten.minimum.default: _arithmetic,
        _aten.where.self: _where,
        **dict.fromkeys((_aten.lt.Tensor, _aten.gt.Tensor, _aten.le.Tensor, _aten.ge.Tensor), _compare),
        **dict.fromkeys((_aten.lt.Scalar, _aten.gt.Scalar, _aten.le.Scalar, _aten.ge.Scalar), _compare),
        **dict.fromkeys((_aten.eq.Tensor, _aten.ne.Tensor, _aten.eq.Scalar, _aten.ne.Scalar), _compare),
        _aten.logical_or.default: _compare,
        _aten.logical_and.default: _compare,
        _aten.logical_not.default: _logical_not,
        _aten.bitwise_or.Tensor: _bitwise,
        _aten.bitwise_and.Tensor: _bitwise,
        _aten.any.default: _all_of,
        _aten.all.default: _all_of,
        _aten.add_.Tensor: _in_place_arithmetic,
        _aten.sub_.Tensor: _in_place_arithmetic,
        _aten.mul_.Tensor: _in_place_arithmetic,
        _aten.div_.Tensor: _in_place,
        _aten.mul_.Scalar: _in_place_arithmetic,
        _aten.div_.Scalar: _in_place,
        _aten.add_.Scalar: _in_place_arithmetic,
        _aten.pow_.Scalar: _in_place,
        _aten.uniform_.default: _fill,
        _aten.normal_.default: _fill,
        _aten.zero_.default: _fill,
        _aten.fill_.Scalar: _fill,
        _aten.bernoulli_.float: _fill,
        _aten.empty_like.default: _empty_like,
        _aten.clone.default: _clone,
        _aten._to_copy.default: _to_copy,
        _aten.unsafe_split.Tensor: _split,
        _aten.mm.default: _mm,
        _aten.bmm.default: _bmm,
        _aten.addmm.default: _addmm,
        _aten.convolution.default: _convolution,
        _aten.native_batch_norm.default: _batch_norm,
        _aten.native_layer_norm.default: _layer_norm,
        _aten.native_group_norm.default: _group_norm,
        _aten.upsample_nearest2d.default: _upsample2d,
        _aten.upsample_bilinear2d.default: _upsample2d,
        _aten.pixel_shuffle.default: _pixel_shuffle,
        _aten.mean.dim: _mean,
        _aten.sum.dim_IntList: _sum,
        _aten._softmax.default: _softmax,
        _aten._log_softmax.default: _softmax,
        _aten._safe_softmax.default: _softmax,
        _aten.cat.default: _cat,
        _aten.stack.default: _stack,
        _aten.embedding.default: _embedding,
        _aten.max_pool2d_with_indices.default: _max_pool2d,
        _aten.avg_pool2d.default: _avg_pool2d,
        _aten._adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
        _aten._unsafe_view.default: _unsafe_view,
        _aten.zeros.default: _factory,
        _aten.ones.default: _factory,
        _aten.full.default: _factory,
        **dict.fromkeys((_aten.arange.default, _aten.arange.start, _aten.arange.start_step), _arange),
        _aten.linspace.default: _linspace,
    }
)


def ops() -> frozenset[Any]:
    """The aten overloads that have a rule."""
    return frozenset(_RULES)


def outputs(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What `func(*args, **kwargs)` returns on meta tensors, or `NOT_HANDLED` (then run `func`)."""
    rule = _RULES.get(func)
    if rule is None:
        return NOT_HANDLED
    try:
        return rule(*args, **kwargs)
    except (_Refuse, TypeError, IndexError, ValueError):
        return NOT_HANDLED
