"""A counter-based, partitionable random stream for ``exact=False`` materialization.

Element ``i`` of the stream named by ``key`` is a pure function of ``(key, i, law, params, dtype)``:
any slice, on any rank, in any thread, gets the same numbers, so values never depend on the layout
(whole tensor, shards, thread count). The generator is Philox-4x32-10 (J. K. Salmon, M. A. Moraes,
R. O. Dror, D. E. Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC11, 2011; the same family
as cuRAND's and JAX's counter-based generators), keyed by the first 64-bit key word, with the block
index in counter words 0-1 and the second key word in counter words 2-3.

Words to values. Dtypes narrower than float64 take one 32-bit word per element (4 lanes per
Philox block); float64 takes 53 bits from two words (2 lanes per block). Blocks come in groups of
512: lane ``l`` of block ``j`` of group ``g`` is element ``g * 512 * lanes + l * 512 + j``, so each
lane is a contiguous run of elements (no interleaving pass in the C core). Uniforms are
``k * 2**-bits`` in [0, 1), ``(k + 1) * 2**-bits`` in (0, 1], or ``(k + 1/2) * 2**-bits`` in (0, 1).
Normals come in Box-Muller pairs (lanes 0 and 1, 2 and 3 of a block):
``r = sqrt(-2 log u1)``, ``(r cos 2 pi u2, r sin 2 pi u2)``. ``log``, ``exp``, ``sin``/``cos`` and
even ``sqrt`` (torch's is not correctly rounded on every build) are written here from IEEE
``+ - * /``, ``floor`` and exponent bits, in the same order as the C core
(``torchlazy._countercore``), so both paths give the same bits. Values are computed in float64,
then rounded to float32 and from there (round to nearest even) to float16/bfloat16, except
``normal`` and ``truncated_normal`` into float32/float16/bfloat16, which run in IEEE float32
arithmetic (about twice the float64 rate in the C core): ``u = (a + 1) 2**-32`` with ``a`` rounded
once to float32 (``1 - u`` taken from the exact integer when ``u > sqrt(1/2)``, so small radii keep
24 bits), the angle ``b / 2**32`` turns reduced to the nearest quarter turn in integers, float32
polynomials for log/sin/cos and Newton's sqrt. Against the float64 formulas on the same words
(1e7 samples of N(0, 1)) the float32 values are within 3.9e-7 relative error, at most 6.2 float32
ulps (median 0.6), with the same tails (largest ``|z|`` from 32-bit words: 6.66).
The truncated normal redraws rejected elements one by one from a per-element sub-counter
(attempt number in bits 16-31 of counter word 1), so it stays counter-based.

>>> import torch
>>> a = fill(torch.empty(10), "normal", {"mean": 0.0, "std": 1.0}, key=(1234, 7))
>>> b = fill(torch.empty(4), "normal", {"mean": 0.0, "std": 1.0}, key=(1234, 7), start=3)
>>> torch.equal(a[3:7], b)
True
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["LAWS", "fill", "fill_jobs", "has_extension"]

try:
    from torchlazy import _countercore as _core  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: the pure path gives the same bits
    _core = None

# codes shared with _csrc/counter.c
LAWS = (
    "uniform",
    "normal",
    "bernoulli",
    "exponential",
    "log_normal",
    "cauchy",
    "geometric",
    "random",
    "truncated_normal",
)
_LAW = {name: code for code, name in enumerate(LAWS)}
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_DTYPE = {dtype: code for code, dtype in enumerate(_DTYPES)}
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_M64 = (1 << 64) - 1
_MAX_ELEMENTS = 1 << 48  # the block index must leave counter word 1's bits 16-31 to the redraw attempt
_MAX_ATTEMPTS = 65536
_MIN_ACCEPT = 1e-3  # the truncated normal's lowest admitted acceptance rate (65535 redraws then never run out)
_GROUP = 512  # blocks per group: lane l of block j of a group is element l * _GROUP + j (as in the C core)
_PURE_CHUNK = 1 << 16  # small enough for the temporaries to stay in cache

_TWO_M32 = 2.0**-32
_TWO_M53 = 2.0**-53
_SQRT2 = 1.4142135623730951
_LN2 = 0.6931471805599453
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082146973659064e-10
_INV_LN2 = 1.4426950408889634
_HALF_PI = 1.5707963267948966
_LOG_C = (
    0.05263157894736842,
    0.058823529411764705,
    0.06666666666666667,
    0.07692307692307693,
    0.09090909090909091,
    0.1111111111111111,
    0.14285714285714285,
    0.2,
    0.3333333333333333,
    1.0,
)
_EXP_C = (
    1.6059043836821613e-10,
    2.08767569878681e-09,
    2.505210838544172e-08,
    2.755731922398589e-07,
    2.7557319223985893e-06,
    2.48015873015873e-05,
    0.0001984126984126984,
    0.001388888888888889,
    0.008333333333333333,
    0.041666666666666664,
    0.16666666666666666,
    0.5,
    1.0,
    1.0,
)
_SIN_C = (
    -7.647163731819816e-13,
    1.6059043836821613e-10,
    -2.505210838544172e-08,
    2.7557319223985893e-06,
    -0.0001984126984126984,
    0.008333333333333333,
    -0.16666666666666666,
)
_COS_C = (
    4.779477332387385e-14,
    -1.1470745597729725e-11,
    2.08767569878681e-09,
    -2.755731922398589e-07,
    2.48015873015873e-05,
    -0.001388888888888889,
    0.041666666666666664,
    -0.5,
)


def _f32(x: float) -> float:
    """x rounded to float32 (as C's `(float)x`), so torch meets the constant exactly."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


# the float32 normal (as the C core's lane_values_f32): constants are the doubles above rounded to float32
_F32_LAWS = ("normal", "truncated_normal")
_F32_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_F_LOG_C = tuple(_f32(c) for c in _LOG_C[-5:])  # s^9/9 last: the next term is < 2e-9 relative
_F_SIN_C = tuple(_f32(c) for c in _SIN_C[-4:])  # a^9/9! last
_F_COS_C = tuple(_f32(c) for c in _COS_C[-4:])  # a^8/8! last
_F_SQRT2 = _f32(_SQRT2)
_F_LN2_HI = 0.693138122558593750  # 0x3f317180: e * _F_LN2_HI is exact for |e| < 128
_F_LN2_LO = _f32(9.058001523953862e-06)
_F_HALF_PI = _f32(_HALF_PI)

_DEFAULTS: dict[str, dict[str, float]] = {
    "uniform": {"from": 0.0, "to": 1.0},
    "normal": {"mean": 0.0, "std": 1.0},
    "bernoulli": {"p": 0.5},
    "exponential": {"lambd": 1.0},
    "log_normal": {"mean": 1.0, "std": 2.0},
    "cauchy": {"median": 0.0, "sigma": 1.0},
    "geometric": {"p": 0.5},
    "random": {"from": 0, "to": 2**24},
    "truncated_normal": {"mean": 0.0, "std": 1.0, "a": -2.0, "b": 2.0},
}


def has_extension() -> bool:
    """Whether the compiled core is importable and not switched off by ``TORCHLAZY_NO_EXT=1``."""
    return _core is not None and os.environ.get("TORCHLAZY_NO_EXT", "") in ("", "0")


class _Plan:
    """A law's parameters reduced to what both paths consume (computed once, in Python)."""

    def __init__(self, out: torch.Tensor, law: str, params: dict[str, Any]) -> None:
        if law not in _LAW:
            raise ValueError(f"unknown law `{law}`; expected one of {', '.join(f'`{name}`' for name in LAWS)}")
        unknown = set(params) - set(_DEFAULTS[law])
        if unknown:
            raise ValueError(f"law `{law}` takes parameters {sorted(_DEFAULTS[law])}, not {sorted(unknown)}")
        q = {**_DEFAULTS[law], **params}
        dtype = out.dtype
        self.law = _LAW[law]
        self.dtype = _DTYPE[dtype]
        self.wide = dtype == torch.float64 and law != "random"
        # normals for dtypes of at most 24 bits run in float32 arithmetic (about 2x the float64 rate)
        self.f32 = law in _F32_LAWS and dtype in _F32_DTYPES
        self.p = [0.0, 0.0, 0.0, 0.0]
        self.ifrom, self.irange = 0, 0
        self.clamp, self.clamp_to, self.clamp_hi = False, 0.0, 0.0
        if law != "random" and law != "bernoulli" and dtype not in _FLOATS:
            raise TypeError(f"law `{law}` fills floating tensors, not {dtype}")
        if law == "uniform":
            lo, hi = float(q["from"]), float(q["to"])
            if not lo <= hi:
                raise ValueError(f"uniform needs `from <= to`, got from={lo}, to={hi}")
            self.p[:2] = [lo, hi - lo]
            below = _below(hi, dtype)
            if lo < hi and below >= lo:  # values round into [from, to): the top rounds down to `below`
                self.clamp, self.clamp_to, self.clamp_hi = True, hi, below
        elif law in ("normal", "log_normal"):
            self.p[:2] = [float(q["mean"]), _positive(q["std"], "std", law, zero_ok=True)]
            if self.f32:
                self.p[:2] = [_f32(self.p[0]), _f32(self.p[1])]
        elif law == "truncated_normal":
            mean, std, a, b = (float(q[name]) for name in ("mean", "std", "a", "b"))
            _positive(std, "std", law)
            if not a <= b:
                raise ValueError(f"truncated_normal needs `a <= b`, got a={a}, b={b}")
            accept = 0.5 * (math.erf((b - mean) / (std * _SQRT2)) - math.erf((a - mean) / (std * _SQRT2)))
            if accept < _MIN_ACCEPT:
                raise ValueError(
                    f"truncated_normal over [{a}, {b}] keeps only {accept:.2g} of N({mean}, {std}**2): too narrow "
                    "for the counter-based rejection sampler; use `exact=True` for this tensor"
                )
            self.p = [mean, std, a, b]
            if self.f32:
                self.p[:2] = [_f32(mean), _f32(std)]
        elif law == "bernoulli":
            p = float(q["p"])
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"bernoulli needs 0 <= p <= 1, got p={p}")
            self.p[0] = p
        elif law == "exponential":
            self.p[0] = -1.0 / _positive(q["lambd"], "lambd", law)
        elif law == "geometric":
            p = float(q["p"])
            if not 0.0 < p <= 1.0:
                raise ValueError(f"geometric needs 0 < p <= 1, got p={p}")
            self.p[0] = 1.0 / math.log1p(-p) if p < 1.0 else -0.0
        elif law == "cauchy":
            self.p[:2] = [float(q["median"]), _positive(q["sigma"], "sigma", law)]
        else:  # random
            lo, hi = int(q["from"]), int(q["to"])
            if not 0 < hi - lo <= 1 << 32:
                raise ValueError(f"random needs 0 < to - from <= 2**32, got from={lo}, to={hi}")
            if dtype not in _FLOATS and dtype != torch.bool:
                info = torch.iinfo(dtype)
                if lo < info.min or hi - 1 > info.max:
                    raise ValueError(f"random range [{lo}, {hi}) does not fit {dtype}")
            self.ifrom, self.irange = lo, hi - lo

    @property
    def per_block(self) -> int:
        return 2 if self.wide else 4


def _positive(value: Any, name: str, law: str, zero_ok: bool = False) -> float:
    v = float(value)
    if not (v >= 0.0 if zero_ok else v > 0.0):
        raise ValueError(f"law `{law}` needs `{name}` {'>=' if zero_ok else '>'} 0, got {v}")
    return v


def _below(x: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` below `x`, stepping one unit in the last place in the dtype's own bits."""
    t = torch.tensor([x], dtype=torch.float64)
    t = t.to(dtype) if dtype == torch.float64 else t.to(torch.float32).to(dtype)
    if float(t) < x:
        return float(t)
    bits = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    if float(t) > 0:
        bits = bits - 1
    elif float(t) < 0:
        bits = bits + 1
    else:  # below zero: the negative value of smallest magnitude
        bits = (-torch.tensor([0.0], dtype=dtype)).view(bits.dtype) + 1
    return float(bits.view(dtype))


# ---------------------------------------------------------------- pure torch path (same bits as the C core)


def _mulhilo(m: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * a for a constant m < 2**32 and int64 a < 2**32, without int64 overflow."""
    mh, ml = m >> 16, m & 0xFFFF
    ph = a * mh  # < 2**48
    pl = a * ml + ((ph & 0xFFFF) << 16)  # < 2**49
    return (ph >> 16) + (pl >> 32), pl & 0xFFFFFFFF


def _philox(blocks: torch.Tensor, attempt: int, key: tuple[int, int]) -> list[torch.Tensor]:
    k0, k1 = key[0] & 0xFFFFFFFF, key[0] >> 32
    c0 = blocks & 0xFFFFFFFF
    c1 = (blocks >> 32) | (attempt << 16)
    c2 = torch.full_like(blocks, key[1] & 0xFFFFFFFF)
    c3 = torch.full_like(blocks, key[1] >> 32)
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return [c0, c1, c2, c3]


_LOG_DEG = {False: 6, True: 10}  # narrow (32-bit) lanes use the shorter tails, as in the C core
_SIN_DEG = {False: 5, True: 7}
_COS_DEG = {False: 6, True: 8}
_NEWTON_STEPS = {False: 3, True: 4}


def _horner(coeffs: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
    p = torch.full_like(z, coeffs[0])
    for c in coeffs[1:]:
        p = p * z + c
    return p


def _log(u: torch.Tensor, wide: bool) -> torch.Tensor:
    b = u.view(torch.int64)
    e = (b >> 52).double() - 1023.0
    m = ((b & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(torch.float64)
    big = m > _SQRT2
    e = torch.where(big, e + 1.0, e)
    m = torch.where(big, m * 0.5, m)
    s = (m - 1.0) / (m + 1.0)
    t = s * _horner(_LOG_C[-_LOG_DEG[wide] :], s * s)
    return (t + t) + e * _LN2


def _sqrt(t: torch.Tensor, wide: bool) -> torch.Tensor:
    h = 0.5 * t
    y = (0x5FE6EB50C7B537A9 - (t.view(torch.int64) >> 1)).view(torch.float64)
    for _ in range(_NEWTON_STEPS[wide]):
        y = y * (1.5 - (h * y) * y)
    return torch.where(t > 0.0, t * y, 0.0)


def _pow2(j: torch.Tensor) -> torch.Tensor:
    return ((j + 1023.0).long() << 52).view(torch.float64)


def _exp(y: torch.Tensor) -> torch.Tensor:
    y = torch.where(y < -800.0, -800.0, y)
    y = torch.where(y > 800.0, 800.0, y)
    k = torch.floor(y * _INV_LN2 + 0.5)
    r = (y - k * _LN2_HI) - k * _LN2_LO
    p = _horner(_EXP_C, r)
    h = torch.floor(k * 0.5)
    return (p * _pow2(k - h)) * _pow2(h)


def _sincos2pi(v: torch.Tensor, wide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.floor(v * 4.0 + 0.5)
    r = v * 4.0 - q
    a = r * _HALF_PI
    z = a * a
    s = a + (a * z) * _horner(_SIN_C[-_SIN_DEG[wide] :], z)
    c = 1.0 + z * _horner(_COS_C[-_COS_DEG[wide] :], z)
    qm = q - 4.0 * torch.floor(q * 0.25)
    swap = (qm * 0.5 - torch.floor(qm * 0.5)) != 0.0
    c2, s2 = torch.where(swap, s, c), torch.where(swap, c, s)
    return torch.where(qm >= 2.0, -s2, s2), torch.where(torch.abs(qm - 1.5) < 1.0, -c2, c2)


def _normal_pair(a: torch.Tensor, b: torch.Tensor, wide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _TWO_M53 if wide else _TWO_M32
    r = _sqrt(-2.0 * _log((a + 1.0) * scale, wide), wide)
    sn, cs = _sincos2pi(b * scale, wide)
    return r * cs, r * sn


def _log_word(w: torch.Tensor) -> torch.Tensor:
    """log of u = (w + 1) 2**-32 in float32 for int64 words w < 2**32 (as the C core's log_*_ratio)."""
    u = (w.double().float() + 1.0) * 2.0**-32  # one correct rounding to float32, as C's (float)a
    b = u.view(torch.int32).long()
    e = ((b >> 23) - 127).double().float()
    m = ((b & 0x007FFFFF) | 0x3F800000).int().view(torch.float32)
    big = m > _F_SQRT2
    e = torch.where(big, e + 1.0, e)
    m = torch.where(big, m * 0.5, m)
    # near u = 1: m - 1 = -(1 - u) from the exact integer 2**32 - 1 - w
    dm = torch.where(e == 0.0, -((0xFFFFFFFF - w).double().float() * 2.0**-32), m - 1.0)
    s = dm / (m + 1.0)
    t = s * _horner(_F_LOG_C, s * s)
    return e * _F_LN2_HI + ((t + t) + e * _F_LN2_LO)


def _sqrt_f32(t: torch.Tensor) -> torch.Tensor:
    h = 0.5 * t
    y = (0x5F375A86 - (t.view(torch.int32).long() >> 1)).int().view(torch.float32)
    for _ in range(3):
        y = y * (1.5 - (h * y) * y)
    return torch.where(t > 0.0, t * y, 0.0)


def _sincos_word(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos of w / 2**32 turns for int64 words w < 2**32, reduced in integers (as the C core)."""
    q = ((w + 0x20000000) & 0xFFFFFFFF) >> 30
    ri = (w - (q << 30)) & 0xFFFFFFFF
    ri = ri - ((ri >> 31) << 32)  # as a signed int32 in [-2**29, 2**29)
    r = ri.double().float() * 2.0**-30  # one correct rounding to float32, as C's (float)(int32_t)
    a = r * _F_HALF_PI
    z = a * a
    s = a + (a * z) * _horner(_F_SIN_C, z)
    c = 1.0 + z * _horner(_F_COS_C, z)
    swap = (q & 1) == 1
    c2, s2 = torch.where(swap, s, c), torch.where(swap, c, s)
    return torch.where((q & 2) == 2, -s2, s2), torch.where(((q + 1) & 2) == 2, -c2, c2)


def _normal_pair_f32(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller in float32 from int64 words a, b < 2**32: u = (float(a) + 1) 2**-32, angle b / 2**32 turns."""
    r = _sqrt_f32(-2.0 * _log_word(a))
    sn, cs = _sincos_word(b)
    return r * cs, r * sn


def _lane_values(plan: _Plan, ka: torch.Tensor, kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _TWO_M53 if plan.wide else _TWO_M32
    p0, p1 = plan.p[0], plan.p[1]
    law = LAWS[plan.law]
    if law == "uniform":
        return (ka * scale) * p1 + p0, (kb * scale) * p1 + p0
    if law in ("normal", "truncated_normal", "log_normal"):
        z0, z1 = _normal_pair(ka, kb, plan.wide)
        va, vb = z0 * p1 + p0, z1 * p1 + p0
        return (_exp(va), _exp(vb)) if law == "log_normal" else (va, vb)
    if law == "bernoulli":
        return ((ka * scale) < p0).double(), ((kb * scale) < p0).double()
    if law == "exponential":
        return _log((ka + 0.5) * scale, plan.wide) * p0, _log((kb + 0.5) * scale, plan.wide) * p0
    if law == "geometric":
        a, b = (
            torch.ceil(_log((ka + 0.5) * scale, plan.wide) * p0),
            torch.ceil(_log((kb + 0.5) * scale, plan.wide) * p0),
        )
        return torch.where(a < 1.0, 1.0, a), torch.where(b < 1.0, 1.0, b)
    # cauchy
    sa, ca = _sincos2pi(((ka + 0.5) * scale) * 0.5, plan.wide)
    sb, cb = _sincos2pi(((kb + 0.5) * scale) * 0.5, plan.wide)
    return p0 - (ca / sa) * p1, p0 - (cb / sb) * p1


def _block_values(plan: _Plan, blocks: torch.Tensor, attempt: int, key: tuple[int, int]) -> torch.Tensor:
    """Lane values of blocks, shape (lanes, len(blocks)): 4 lanes of 32 bits, or 2 of 53 bits (wide)."""
    x = _philox(blocks, attempt, key)
    if plan.f32:
        lanes = []
        for a, b in ((x[0], x[1]), (x[2], x[3])):
            z0, z1 = _normal_pair_f32(a, b)
            lanes += [z0 * plan.p[1] + plan.p[0], z1 * plan.p[1] + plan.p[0]]
    elif plan.wide:
        k = [(x[1] >> 11).double() * 4294967296.0 + x[0].double(), (x[3] >> 11).double() * 4294967296.0 + x[2].double()]
        lanes = list(_lane_values(plan, k[0], k[1]))
    else:
        k = [w.double() for w in x]
        lanes = [*_lane_values(plan, k[0], k[1]), *_lane_values(plan, k[2], k[3])]
    return torch.stack(lanes)


def _group_order(lanes: torch.Tensor) -> torch.Tensor:
    """(lanes, groups * _GROUP) -> element order: each group's lanes one after the other."""
    return lanes.view(lanes.shape[0], -1, _GROUP).transpose(0, 1).reshape(-1)


def _pure_range(plan: _Plan, key: tuple[int, int], start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) as float64 (float32 for `plan.f32`, int64 for `random`), before the
    dtype conversion."""
    per_group = plan.per_block * _GROUP
    g0, g1 = start // per_group, (start + count - 1) // per_group + 1
    blocks = torch.arange(g0 * _GROUP, g1 * _GROUP, dtype=torch.int64)
    lo = start - g0 * per_group
    if LAWS[plan.law] == "random":
        words = _group_order(torch.stack(_philox(blocks, 0, key)))
        return plan.ifrom + (_mulhilo(plan.irange, words)[0] if plan.irange < 1 << 32 else words)[lo : lo + count]
    vals = _group_order(_block_values(plan, blocks, 0, key))[lo : lo + count]
    if LAWS[plan.law] == "truncated_normal":
        a, b = plan.p[2], plan.p[3]
        index = torch.arange(start, start + count, dtype=torch.int64)
        todo = ~((vals.double() >= a) & (vals.double() <= b))  # exact bounds, as C compares float to double
        for attempt in range(1, _MAX_ATTEMPTS):
            if not bool(todo.any()):
                break
            where = todo.nonzero().squeeze(1)
            r = index[where] % per_group
            block = index[where] // per_group * _GROUP + r % _GROUP
            got = _block_values(plan, block, attempt, key).gather(0, (r // _GROUP).unsqueeze(0)).squeeze(0)
            vals[where] = got
            todo[where] = ~((got.double() >= a) & (got.double() <= b))
        vals[todo] = a  # unreachable for the acceptance rates _Plan admits (as in the C core)
    return vals


def _convert(plan: _Plan, vals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 (or int64) values to `dtype` as the C core stores them: narrow floats through float32."""
    if vals.dtype == torch.int64:
        if dtype not in _FLOATS:
            return vals != 0 if dtype == torch.bool else vals.to(dtype)
        vals = vals.double()
    if dtype in (torch.float16, torch.bfloat16):
        vals = vals.to(torch.float32)
    if plan.clamp:
        r = vals.to(dtype).to(torch.float64)
        vals = torch.where(r >= plan.clamp_to, plan.clamp_hi, r)
    if dtype == torch.bool:
        return vals != 0
    return vals.to(dtype)


def _fill_pure(out: torch.Tensor, plan: _Plan, key: tuple[int, int], start: int) -> None:
    flat = out.view(-1)
    n = flat.numel()
    for lo in range(0, n, _PURE_CHUNK):
        count = min(_PURE_CHUNK, n - lo)
        flat[lo : lo + count] = _convert(plan, _pure_range(plan, key, start + lo, count), out.dtype)


# ---------------------------------------------------------------- compiled path

_POOL: ThreadPoolExecutor | None = None
_POOL_KEY = (0, 0)  # (size, pid): a forked child inherits the pool object but not its threads
_MIN_PER_THREAD = 1 << 16


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_KEY
    if _POOL is None or _POOL_KEY[0] < threads or _POOL_KEY[1] != os.getpid():
        if _POOL is not None and _POOL_KEY[1] == os.getpid():
            _POOL.shutdown(wait=False)
        _POOL, _POOL_KEY = ThreadPoolExecutor(threads, thread_name_prefix="torchlazy-fill"), (threads, os.getpid())
    return _POOL


def _fill_c(out: torch.Tensor, plan: _Plan, key: tuple[int, int], start: int, threads: int) -> None:
    assert _core is not None
    n = out.numel()
    addr, itemsize = out.data_ptr(), out.element_size()

    def run(lo: int, hi: int) -> None:
        _core.fill(
            addr + lo * itemsize,
            start + lo,
            hi - lo,
            plan.dtype,
            plan.law,
            int(plan.wide),
            int(plan.f32),
            key[0],
            key[1],
            *plan.p,
            plan.ifrom,
            plan.irange,
            int(plan.clamp),
            plan.clamp_to,
            plan.clamp_hi,
        )

    threads = max(1, min(threads, n // _MIN_PER_THREAD))
    if threads == 1:
        run(0, n)
        return
    cuts = [n * t // threads for t in range(threads + 1)]
    for f in [_pool(threads).submit(run, cuts[t], cuts[t + 1]) for t in range(threads)]:
        f.result()


# ---------------------------------------------------------------- public entry


def fill(
    out: torch.Tensor,
    law: str,
    params: dict[str, Any],
    key: tuple[int, int],
    start: int = 0,
    *,
    threads: int | None = None,
) -> torch.Tensor:
    """Write elements ``[start, start + out.numel())`` of the stream ``key`` under ``law`` into ``out``.

    ``out`` is a contiguous CPU tensor: float64/32/16 or bfloat16, or an integer/bool dtype for
    ``random`` and ``bernoulli``. ``key`` is two integers taken modulo 2**64 (e.g. the seed captured
    at ``deferred()`` entry and the op's place in the record). Laws and parameters (torch's names and
    defaults): ``uniform`` (from, to), ``normal`` (mean, std), ``bernoulli`` (p), ``exponential``
    (lambd), ``log_normal`` (mean, std), ``cauchy`` (median, sigma), ``geometric`` (p), ``random``
    (integer from, to with 0 < to - from <= 2**32), ``truncated_normal`` (mean, std, a, b).
    ``threads`` defaults to ``torch.get_num_threads()``; the values never depend on it.

    >>> import torch
    >>> x = fill(torch.empty(1000, dtype=torch.bfloat16), "uniform", {"from": -1.0, "to": 1.0}, key=(0, 1))
    >>> bool(x.min() >= -1.0) and bool(x.max() < 1.0)
    True
    """
    plan, k = _check(out, law, params, key, start)
    if out.numel() == 0:
        return out
    _fill_checked(out, plan, k, start, torch.get_num_threads() if threads is None else threads)
    return out


def fill_jobs(
    out: torch.Tensor, law: str, params: dict[str, Any], key: tuple[int, int], parts: int
) -> list[Callable[[], None]]:
    """The fill ``fill(out, law, params, key)`` as at most ``parts`` independent jobs over contiguous
    slices of ``out``, for a caller's own worker threads (the compiled core releases the GIL). The
    arguments are checked here, before any job runs; the values are ``fill``'s, however many jobs.

    >>> import torch
    >>> out = torch.empty(200_000)
    >>> jobs = fill_jobs(out, "normal", {}, key=(5, 6), parts=3)
    >>> for job in reversed(jobs):  # in any order, on any thread
    ...     job()
    >>> len(jobs), torch.equal(out, fill(torch.empty(200_000), "normal", {}, key=(5, 6)))
    (3, True)
    """
    plan, k = _check(out, law, params, key, 0)
    flat = out.view(-1) if out.dim() else out.view(1)
    n = flat.numel()
    parts = max(1, min(parts, n // _MIN_PER_THREAD))
    cuts = [n * t // parts for t in range(parts + 1)]

    return [
        functools.partial(_fill_checked, flat[cuts[t] : cuts[t + 1]], plan, k, cuts[t], 1)
        for t in range(parts)
        if cuts[t] < cuts[t + 1]
    ]


def _fill_checked(out: torch.Tensor, plan: _Plan, key: tuple[int, int], start: int, threads: int) -> None:
    """The fill of checked arguments: the compiled core, or the pure path (same bits)."""
    with torch.no_grad():  # `out` may be a Parameter: the fill is initialization, not autograd history
        if has_extension():
            _fill_c(out, plan, key, start, threads)
        else:
            _fill_pure(out, plan, key, start)


def _check(
    out: torch.Tensor, law: str, params: dict[str, Any], key: tuple[int, int], start: int
) -> tuple[_Plan, tuple[int, int]]:
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(
            f"`fill` writes a contiguous CPU tensor, got device={out.device}, contiguous={out.is_contiguous()}"
        )
    if out.dtype not in _DTYPE:
        raise TypeError(f"`fill` does not support dtype {out.dtype}")
    if start < 0 or start + out.numel() > _MAX_ELEMENTS:
        raise ValueError(f"`fill` covers elements [0, 2**48) of a stream, got [{start}, {start + out.numel()})")
    return _Plan(out, law, params), (int(key[0]) & _M64, int(key[1]) & _M64)
