"""Exact random draws: torch's CPU kernels, or a compiled copy of them proven to give the same bits.

Exact materialization makes each random op's values by running it from the generator state eager
had before it (`_record` knows that state from the generator model, `_rng`). ``run_draw`` does that
one step. For the two kernels that make nearly all initial weights, float32 ``uniform_`` and
``normal_``, the optional compiled core ``torchlazy._drawcore`` computes torch's values 2-10x faster
than torch's own serial kernels (vectorized MT19937 tempering and Box-Muller, same operations and
roundings as torch's AVX2 kernel). It is used only after a calibration in this process has compared
it with torch's kernel bit for bit (sizes with and without a ragged end, a refill crossing, shifted
and scaled laws): another torch build, CPU or ``ATEN_CPU_CAPABILITY`` that changes torch's kernel
makes the calibration fail and torch's kernel runs, as it does with ``TORCHLAZY_NO_EXT=1`` or
without a compiler.

>>> g = torch.Generator().manual_seed(0)
>>> before = g.get_state()
>>> eager = torch.empty(1000).normal_(0.0, 0.02, generator=g)
>>> mine = torch.empty(1000)
>>> after = run_draw(torch.ops.aten.normal_.default, (mine, 0.0, 0.02), {}, before)
>>> torch.equal(mine, eager), torch.equal(after, g.get_state())
(True, True)
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any

import torch

from . import _rng
from . import _torch_compat as tc

__all__ = ["compiled", "run_draw"]

try:
    from . import _drawcore as _ext  # type: ignore[attr-defined]
except ImportError:  # built without a compiler, or a source checkout that never ran build_ext
    _ext = None

# op name -> (compiled function name, schema names of its two parameters, their defaults, smallest numel)
_KERNELS: dict[str, tuple[str, tuple[str, str], tuple[float, float], int]] = {
    "normal_": ("normal_f32", ("mean", "std"), (0.0, 1.0), 16),  # below 16 torch takes a scalar path
    "uniform_": ("uniform_f32", ("from", "to"), (0.0, 1.0), 0),
}

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_PROVEN: dict[str, bool] = {}  # op -> the compiled kernel matched torch's in this process


def _core() -> ModuleType | None:
    if os.environ.get("TORCHLAZY_NO_EXT", "") not in ("", "0") or _ext is None or not _ext.available():
        return None
    return _ext


def _calibrated(op: str, core: ModuleType) -> bool:
    """Whether the compiled `op` gives torch's bits and end state here (computed once per process)."""
    known = _PROVEN.get(op)
    if known is None:
        known = _PROVEN[op] = _compare(op, core)
    return known


def _compare(op: str, core: ModuleType) -> bool:
    name, _, _, smallest = _KERNELS[op]
    # uniform: a law so narrow that values round up to `to` (torch maps those to `from`); laws far from 0
    # next to their width, where a kernel computing `u * (to - from) + from` another way (in double, or
    # without the fused multiply-add: torch 2.11 on an AVX-512 Xeon) rounds ~1% of values otherwise
    laws = (
        ((0.0, 1.0), (-0.1, 0.1), (1.0, 1.0000001), (0.2520917, 0.2534051), (1000.0, 1001.5))
        if op == "uniform_"
        else ((0.0, 1.0), (0.25, 0.02), (-1.0, 3.0), (1000.0, 0.5), (-0.001, 3e-5))
    )
    g = torch.Generator().manual_seed(20261130)
    # one size above torch's parallel grain (32768): a torch whose large draws ran another path would fail here
    sizes = (max(smallest, 1), 4096, 5 * 624 + 29, 4096 + 7, (1 << 18) + 7)
    # every law at two sizes (the laws far from zero at the largest too)
    for n, (a, b) in (*zip(sizes, laws), *zip(reversed(sizes), laws)):
        torch.empty(n % 97, dtype=torch.float32).uniform_(generator=g)  # start mid-block, at varied places
        before = g.get_state()
        eager = getattr(torch.empty(n, dtype=torch.float32), op)(a, b, generator=g)
        mine = torch.empty(n, dtype=torch.float32)
        after = getattr(core, name)(_rng.state_bytes(before), mine.data_ptr(), n, a, b)
        if not torch.equal(mine.view(torch.int32), eager.view(torch.int32)) or after != _rng.state_bytes(g.get_state()):
            return False
    return True


def compiled(op: str) -> bool:
    """Whether exact draws of `op` (float32, contiguous, on the CPU) use the compiled kernel here.

    >>> compiled("bernoulli_")  # only uniform_ and normal_ have one
    False
    """
    core = _core()
    return op in _KERNELS and core is not None and _calibrated(op, core)


def run_draw(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], state: torch.Tensor) -> torch.Tensor:
    """Run the random op ``func(*args, **kwargs)`` (in place on ``args[0]``) from generator ``state``,
    exactly as torch's kernel would; returns the generator state after it. Any ``generator`` argument is
    replaced by one at ``state``."""
    target = args[0]
    op = func.overloadpacket.__name__
    spec = _KERNELS.get(op)
    if (
        spec is not None
        and target.dtype == torch.float32
        and target.device.type == "cpu"
        and target.is_contiguous()
        and target.numel() >= spec[3]
        and compiled(op)
    ):
        given = tc.arguments_by_name(func, args, kwargs)
        a, b = (float(given.get(name, default)) for name, default in zip(spec[1], spec[2]))
        if _valid(op, a, b):
            assert _ext is not None
            after = getattr(_ext, spec[0])(_rng.state_bytes(state), target.data_ptr(), target.numel(), a, b)
            return torch.frombuffer(bytearray(after), dtype=torch.uint8)
    generator = _rng.generator_at(state)
    with torch.no_grad():
        func(*args, **{**kwargs, "generator": generator})
    return generator.get_state()


def _valid(op: str, a: float, b: float) -> bool:
    """Laws torch's kernel accepts and the compiled one computes the same way; anything else goes to
    torch (which raises its own error where the law is invalid)."""
    limit = _FLOAT32_MAX
    if not (math.isfinite(a) and math.isfinite(b) and abs(a) <= limit and abs(b) <= limit):
        return False
    return b >= 0.0 if op == "normal_" else a <= b and b - a < limit / 2
