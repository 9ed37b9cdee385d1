"""`_meta_rules` against torch's own meta kernels: every answer it gives is torch's (shape, dtype,
strides), every call torch refuses it leaves to torch, and the usual calls it does answer."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from torchlazy import _meta_rules as R
from torchlazy import _torch_compat as tc

aten = torch.ops.aten
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def layouts(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """`t`, or a transposed, sliced, expanded or permuted view of a tensor of its shape."""
    kind = rng.choice(["plain", "plain", "transposed", "sliced", "permuted", "expanded"])
    shape = tuple(t.shape)
    if kind == "transposed" and t.dim() >= 2:
        return meta(*shape[:-2], shape[-1], shape[-2], dtype=t.dtype).transpose(-1, -2)
    if kind == "sliced" and t.dim() >= 1:
        return meta(*shape[:-1], shape[-1] * 2 + 1, dtype=t.dtype)[..., : shape[-1]]
    if kind == "permuted" and t.dim() >= 2:
        order = list(range(t.dim()))
        rng.shuffle(order)
        base = meta(*(shape[i] for i in order), dtype=t.dtype)
        return base.permute(*sorted(range(t.dim()), key=order.__getitem__))
    if kind == "expanded" and t.dim() >= 1 and shape[0] > 1:
        return meta(1, *shape[1:], dtype=t.dtype).expand(*shape)
    return t


def strides_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dim of size > 1 (a size-1 dim's stride never changes how memory is read)."""
    return all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def compare(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> bool:
    """True when the rule answered (and agreed with torch), False when it left the call to torch."""
    kwargs = kwargs or {}
    ours = R.outputs(func, args, kwargs)
    try:
        theirs = func(*args, **kwargs)
    except Exception:
        theirs = None
    if ours is R.NOT_HANDLED:
        return False
    call = f"{func}({args}, {kwargs})"
    assert theirs is not None, f"{call}: torch refuses, the rule answered"
    ours_flat, theirs_flat = tc.tree_leaves(ours), tc.tree_leaves(theirs)
    assert len(ours_flat) == len(theirs_flat), call
    for o, t in zip(ours_flat, theirs_flat):
        assert o.device == t.device and o.shape == t.shape and o.dtype == t.dtype, (call, o, t)
        assert strides_agree(o, t), (call, o.stride(), t.stride())
    return True


def sweep(make: Callable[[random.Random], Iterator[tuple[Any, tuple[Any, ...], dict[str, Any]]]], n: int) -> int:
    """Calls answered by the rules, over `n` draws of `make` for each of three seeds (then divided by 3)."""
    answered = 0
    for seed in range(3):
        rng = random.Random(seed)
        for _ in range(n):
            for func, args, kwargs in make(rng):
                answered += compare(func, args, kwargs)
    return answered // 3


def shape(rng: random.Random, ndim: int | None = None) -> list[int]:
    return [rng.choice([1, 2, 3, 5]) for _ in range(rng.randint(0, 4) if ndim is None else ndim)]


def test_pointwise_and_broadcasting_agree_with_torch() -> None:
    unary = [aten.relu.default, aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.neg.default,
             aten.rsqrt.default, aten.hardtanh.default, aten.silu.default, aten.tril.default, aten.sigmoid_.default,
             aten.relu_.default, aten.sign.default, aten.log2.default, aten.reciprocal.default]  # fmt: skip
    binary = [aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.maximum.default]

    def make(rng: random.Random) -> Iterator[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
        dtype = rng.choice([*FLOATS, torch.int64])
        s = shape(rng, rng.randint(2, 4)) if rng.random() < 0.3 else shape(rng)
        x = layouts(meta(*s, dtype=dtype), rng)
        func = rng.choice(unary)
        if func in (aten.tril.default,) and x.dim() < 2:
            func = aten.relu.default
        yield func, (x,), {}
        other_shape = [n if rng.random() < 0.7 else rng.choice([1, n, 4]) for n in s[rng.randint(0, len(s)) :]]
        other = layouts(meta(*other_shape, dtype=rng.choice([dtype, *FLOATS])), rng)
        operands = (x, other) if rng.random() < 0.5 else (other, x)
        yield rng.choice(binary), operands, {}
        yield aten.mul.Tensor, (x, rng.choice([2, 0.5, True])), {}
        yield aten.add_.Tensor, (x, other), {}
        yield aten.pow.Tensor_Scalar, (x, 2), {}
        yield aten.where.self, (meta(*s, dtype=torch.bool), x, other), {}
        yield aten.clone.default, (x,), rng.choice([{}, {"memory_format": torch.contiguous_format}])
        yield aten._to_copy.default, (x,), {"dtype": rng.choice([*FLOATS, torch.int64, torch.bool])}

    assert sweep(make, 300) > 900


def test_comparisons_masks_and_bool_reductions_agree_with_torch() -> None:
    """What rejection samplers run between draws (`trunc_normal_`: compare, or the masks, `.any()`), over
    floating, integer and bool tensors of any layout, broadcast, and with numbers."""
    compares = [aten.lt.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.ge.Tensor, aten.eq.Tensor, aten.ne.Tensor,
                aten.logical_or.default, aten.logical_and.default]  # fmt: skip
    scalars = [aten.lt.Scalar, aten.gt.Scalar, aten.le.Scalar, aten.ge.Scalar, aten.eq.Scalar, aten.ne.Scalar]
    kinds = [*FLOATS, torch.int64, torch.uint8, torch.bool, torch.complex64]

    def make(rng: random.Random) -> Iterator[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
        s = shape(rng)
        x = layouts(meta(*s, dtype=rng.choice(kinds)), rng)
        other_shape = [n if rng.random() < 0.7 else rng.choice([1, n, 4]) for n in s[rng.randint(0, len(s)) :]]
        other = layouts(meta(*other_shape, dtype=rng.choice(kinds)), rng)
        operands = (x, other) if rng.random() < 0.5 else (other, x)
        yield rng.choice(compares), operands, {}
        yield rng.choice(scalars), (x, rng.choice([0.5, -2, True])), {}
        yield rng.choice([aten.bitwise_or.Tensor, aten.bitwise_and.Tensor]), operands, {}
        yield aten.logical_not.default, (x,), {}
        yield rng.choice([aten.any.default, aten.all.default]), (x,), {}

    assert sweep(make, 300) > 600


def test_matrix_products_agree_with_torch() -> None:
    def make(rng: random.Random) -> Iterator[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
        n, k, m, b = (rng.choice([1, 2, 3, 7]) for _ in range(4))
        k2 = k if rng.random() < 0.8 else k + 1
        dtype = rng.choice(FLOATS)
        a, w = layouts(meta(n, k, dtype=dtype), rng), layouts(meta(k2, m, dtype=dtype), rng)
        yield aten.mm.default, (a, w), {}
        yield (
            aten.addmm.default,
            (layouts(meta(*rng.choice([[m], [n, m], [1, m], [n, 1]]), dtype=dtype), rng), a, w),
            {},
        )
        yield (
            aten.bmm.default,
            (layouts(meta(b, n, k, dtype=dtype), rng), layouts(meta(b, k2, m, dtype=dtype), rng)),
            {},
        )

    assert sweep(make, 200) > 400


def test_convolutions_and_pooling_agree_with_torch() -> None:
    def make(rng: random.Random) -> Iterator[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
        dims = rng.choice([1, 2, 3])
        groups = rng.choice([1, 1, 2])
        transposed = rng.random() < 0.3
        cin, cout = 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)
        k = [rng.choice([1, 2, 3]) for _ in range(dims)]
        stride = [rng.choice([1, 2]) for _ in range(dims)]
        padding = [rng.choice([0, 1]) for _ in range(dims)]
        dilation = [rng.choice([1, 2]) for _ in range(dims)]
        out_pad = [rng.choice([0, 1]) if transposed else 0 for _ in range(dims)]
        w = meta(cin, cout // groups, *k) if transposed else meta(cout, cin // groups, *k)
        x = meta(rng.choice([1, 2]), cin if rng.random() < 0.9 else cin + 1, *(rng.randint(1, 9) for _ in range(dims)))
        bias = rng.choice([None, meta(cout)])
        yield aten.convolution.default, (x, w, bias, stride, padding, dilation, transposed, out_pad, groups), {}
        img = layouts(meta(*([2] if rng.random() < 0.7 else []), 3, rng.randint(1, 9), rng.randint(1, 9)), rng)
        kernel = [rng.randint(1, 3)] * rng.choice([1, 2])
        ceil = rng.random() < 0.5
        pad = rng.choice([0, 1])
        yield (
            aten.max_pool2d_with_indices.default,
            (img, kernel, rng.choice([[], [1], [2], [2, 1]]), [pad], [rng.choice([1, 2])], ceil),
            {},
        )
        yield aten.avg_pool2d.default, (img, kernel, rng.choice([[], [2]]), [pad], ceil), {}
        yield aten._adaptive_avg_pool2d.default, (img, [rng.randint(1, 4), rng.randint(1, 4)]), {}
        batch = layouts(meta(2, 4 * rng.randint(1, 2), rng.randint(1, 6), rng.randint(1, 6)), rng)
        size = [rng.randint(1, 12), rng.randint(1, 12)]
        yield aten.upsample_nearest2d.default, (batch, size, None, None), {}
        yield aten.upsample_bilinear2d.default, (batch, size, rng.random() < 0.5, None, None), {}
        yield aten.pixel_shuffle.default, (batch, rng.choice([1, 2, 3])), {}

    assert sweep(make, 300) > 450


def test_normalizations_reductions_and_the_rest_agree_with_torch() -> None:
    def make(rng: random.Random) -> Iterator[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
        dtype = rng.choice(FLOATS)
        s = shape(rng, rng.randint(1, 4))
        x = layouts(meta(*s, dtype=dtype), rng)
        k = rng.randint(1, len(s))
        norm_shape = s[len(s) - k :] if rng.random() < 0.9 else [n + 1 for n in s[len(s) - k :]]
        affine = rng.choice([None, meta(*norm_shape, dtype=dtype)])
        yield aten.native_layer_norm.default, (x, norm_shape, affine, affine, 1e-5), {}
        if len(s) >= 2:
            stats = rng.choice([None, meta(s[1], dtype=dtype)])
            yield aten.native_batch_norm.default, (x, stats, stats, stats, stats, rng.random() < 0.5, 0.1, 1e-5), {}
        if len(s) >= 2:
            n, c = s[0], s[1]
            hw = math.prod(s[2:])
            groups = rng.choice([g for g in (1, 2, 3, 5) if c % g == 0] + [2])
            gn_affine = rng.choice([None, meta(c, dtype=dtype)])
            yield aten.native_group_norm.default, (x, gn_affine, gn_affine, n, c, hw, groups, 1e-5), {}
        dims = rng.sample(range(-len(s), len(s)), rng.randint(1, len(s)))
        yield aten.mean.dim, (x, dims, rng.random() < 0.5), {}
        counted = meta(*s, dtype=rng.choice([dtype, torch.int64, torch.int32, torch.uint8, torch.bool]))
        summed = rng.choice([None, torch.float64, torch.int64, torch.bool])
        yield aten.sum.dim_IntList, (counted, rng.choice([dims, None, []]), rng.random() < 0.5), {"dtype": summed}
        yield (
            rng.choice([aten._softmax.default, aten._log_softmax.default]),
            (x, rng.randint(-len(s), len(s) - 1), False),
            {},
        )
        yield aten._safe_softmax.default, (x, -1), {}
        parts = [layouts(meta(*s, dtype=dtype), rng) for _ in range(rng.randint(1, 3))]
        yield aten.cat.default, (parts, rng.randint(-len(s), len(s) - 1)), {}
        yield aten.stack.default, ([layouts(meta(*s, dtype=dtype), rng) for _ in range(2)], rng.randint(0, len(s))), {}
        yield (
            aten.embedding.default,
            (meta(7, 3, dtype=dtype), meta(*s, dtype=rng.choice([torch.int64, torch.int32]))),
            {},
        )
        size = list(s)
        if rng.random() < 0.5:
            size[rng.randrange(len(size))] = -1
        yield aten._unsafe_view.default, (meta(*s, dtype=dtype), size if rng.random() < 0.9 else [*size, 2]), {}
        yield aten.unsafe_split.Tensor, (x, rng.randint(1, 3), rng.randrange(len(s))), {}
        yield aten.empty_like.default, (x,), {"dtype": rng.choice([None, torch.float64])}
        yield aten.uniform_.default, (x, -1.0, 1.0), {}
        yield (
            rng.choice([aten.zeros.default, aten.ones.default]),
            (s,),
            {"dtype": dtype, "device": torch.device("meta")},
        )
        yield aten.full.default, (s, rng.choice([1.5, 2])), {"device": torch.device("meta")}
        bounds = [rng.randint(-9, 9) for _ in range(rng.randint(1, 3))]
        arange = [aten.arange.default, aten.arange.start, aten.arange.start_step][len(bounds) - 1]
        counted = rng.choice([None, torch.int64, torch.int32, torch.float32])
        yield arange, tuple(bounds), {"dtype": counted, "device": torch.device("meta")}
        ends = rng.choice([(0, 1), (-2.5, 3), (1, 1.0)])
        yield aten.linspace.default, (*ends, rng.randint(0, 9)), {"dtype": counted, "device": torch.device("meta")}

    assert sweep(make, 300) > 2700


@pytest.mark.parametrize(
    "func, args",
    [
        (aten.mm.default, (meta(2, 3), meta(4, 5))),
        (aten.add.Tensor, (meta(2, 3), meta(4, 3))),
        (
            aten.convolution.default,
            (meta(1, 3, 8, 8), meta(4, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
        ),
        (aten.native_layer_norm.default, (meta(2, 8), [4], None, None, 1e-5)),
        (aten.cat.default, ([meta(2, 3), meta(2, 4)], 0)),
        (aten._unsafe_view.default, (meta(2, 3), [4, -1])),
        (aten.embedding.default, (meta(7, 3), meta(2, 2))),
    ],
)
def test_what_torch_refuses_is_left_to_torch(func: Any, args: tuple[Any, ...]) -> None:
    assert R.outputs(func, args, {}) is R.NOT_HANDLED
    with pytest.raises((RuntimeError, ValueError, IndexError, TypeError)):
        func(*args)


def test_inputs_both_contiguous_and_channels_last_agree_with_torch() -> None:
    """Size-1 spatial dims make a tensor channels-last contiguous too; torch then lays 4-d outputs out
    channels-last: the rules leave those calls to torch (or agree with it)."""
    x = meta(2, 1, 1, 4).permute(0, 3, 1, 2)  # (2, 4, 1, 1), contiguous and channels-last at once
    assert x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    for func, args in [
        (aten._adaptive_avg_pool2d.default, (x, [2, 3])),
        (aten.upsample_nearest2d.default, (x, [12, 10], None, None)),
        (aten.convolution.default, (x, meta(6, 4, 1, 1), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)),
        (aten.max_pool2d_with_indices.default, (x, [1], [], [0], [1], False)),
        (aten.pixel_shuffle.default, (x, 2)),
    ]:
        compare(func, args)


def test_index_tables_of_views_agree_with_torch() -> None:
    """What constructors build relative-position tables from (expanded grids, broadcast differences, sums)."""
    x, grid = meta(2, 49, dtype=torch.int64), meta(7, dtype=torch.int64)
    cases = [
        (aten.sub.Tensor, (x[:, :, None], x[:, None, :])),
        (aten.sub.Tensor, (x.t()[:, :, None], x.t()[:, None, :])),
        (aten.add.Tensor, (x[:, None, :], x[:, :, None])),
        (aten.mul.Tensor, (meta(5, 3)[:, None, :1], meta(3, 5).t()[None])),
        (aten.stack.default, ([grid[:, None].expand(7, 7), grid[None, :].expand(7, 7)],)),
        (aten.stack.default, ([meta(2, 3, 4).transpose(0, 2)] * 2, 1)),
        (aten.sum.dim_IntList, (meta(49, 49, 2, dtype=torch.int64), [-1])),
    ]
    assert sum(compare(func, args) for func, args in cases) >= 4  # the others are not in row order: left to torch


def odd_layout(shape: list[int], rng: random.Random) -> torch.Tensor:
    """A meta tensor of `shape` in any dim order, its size-1 dims with odd strides, some dims expanded."""
    n = len(shape)
    order = rng.sample(range(n), n)
    base = meta(*(shape[d] for d in order)).permute(*[order.index(i) for i in range(n)])
    strides = list(base.stride())
    for i in range(n):
        if shape[i] == 1 and rng.random() < 0.7:
            strides[i] = rng.choice([0, 1, 2, 3, 7, 12])
        elif rng.random() < 0.15:
            strides[i] = 0
    return torch.empty_strided(shape, strides, device="meta")


def test_broadcasts_of_odd_layouts_agree_with_torch() -> None:
    """torch orders a pointwise output's dims by every operand's strides, size-1 dims' too: a rule that
    answers must give its strides (a recorded view replays with them: wrong strides are wrong values)."""
    rng = random.Random(0)
    answered = 0
    for _ in range(3000):
        out = [rng.choice([1, 1, 2, 3, 4]) for _ in range(rng.randint(1, 4))]
        x = odd_layout([d if rng.random() < 0.7 else 1 for d in out], rng)
        y = odd_layout([d if rng.random() < 0.7 else 1 for d in out][rng.randrange(len(out)) :], rng)
        answered += compare(rng.choice([aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor]), (x, y))
        answered += compare(rng.choice([aten.relu.default, aten.neg.default]), (x,))
    assert answered > 3000


def test_tensors_that_are_not_plain_meta_tensors_are_left_to_torch() -> None:
    assert R.outputs(aten.relu.default, (torch.zeros(2),), {}) is R.NOT_HANDLED  # real values to compute
    assert R.outputs(aten.zeros.default, ([2],), {"dtype": torch.float32}) is R.NOT_HANDLED  # no device: the CPU
    assert R.outputs(aten.div.Tensor, (meta(2, dtype=torch.int64), 2), {}) is R.NOT_HANDLED  # integer division
    bools = meta(2, dtype=torch.bool)
    assert R.outputs(aten.sub.Tensor, (bools, bools), {}) is R.NOT_HANDLED  # torch refuses `-` on bools
