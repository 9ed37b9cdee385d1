"""The compiled copies of torch's float32 uniform_/normal_ kernels give torch's bits and end states,
and `run_draw` falls back to torch's kernels wherever they are not proven."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from torchlazy import _drawkernels, _rng

needs_core = pytest.mark.skipif(
    _drawkernels._ext is None or not _drawkernels._ext.available(), reason="compiled draw kernels not built here"
)

NORMAL = torch.ops.aten.normal_.default
UNIFORM = torch.ops.aten.uniform_.default


def _state_at(seed: int, words: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if words:
        torch.empty(words, dtype=torch.float32).uniform_(generator=g)
    return g.get_state()


def _eager(op: str, n: int, a: float, b: float, state: torch.Tensor, dtype: torch.dtype = torch.float32):
    g = _rng.generator_at(state)
    values = getattr(torch.empty(n, dtype=dtype), op)(a, b, generator=g)
    return values, g.get_state()


def _sizes(rng: random.Random) -> list[int]:
    edges = [16, 17, 31, 32, 33, 623, 624, 625, 1247, 1248, 1249, 4095, 4096, 4097, 4111, 8192 + 15]
    return edges + [rng.randrange(16, 40_000) for _ in range(20)]


@needs_core
@pytest.mark.parametrize("op", ["normal_", "uniform_"])
def test_compiled_kernel_equals_torch(op: str) -> None:
    rng = random.Random(op)
    core = _drawkernels._ext
    name = "normal_f32" if op == "normal_" else "uniform_f32"
    for n in _sizes(rng):
        # fresh seeds (refill pending), mid-block, and exactly at a block end
        for words in (0, rng.randrange(1, 624), 624, 624 * 3 + rng.randrange(624)):
            if op == "normal_":
                a, b = rng.uniform(-2, 2), rng.uniform(0.0, 3.0)
            else:
                a, b = sorted((rng.uniform(-3, 3), rng.uniform(-3, 3)))
            state = _state_at(rng.randrange(1 << 31), words)
            eager, after = _eager(op, n, a, b, state)
            mine = torch.empty(n)
            got = getattr(core, name)(_rng.state_bytes(state), mine.data_ptr(), n, a, b)
            same = torch.equal(mine.view(torch.int32), eager.view(torch.int32)) and got == _rng.state_bytes(after)
            if not same:  # another torch's kernel: the calibration must have refused the compiled one
                assert not _drawkernels._compare(op, core), ("a difference the calibration misses", op, n, words, a, b)
                return


@needs_core
def test_compiled_normal_over_millions_of_values() -> None:
    """Every 24-bit uniform feeds log or sincos many times over: a wrong fusion or constant shows."""
    state = _state_at(2026, 5)
    n = (1 << 23) + 9
    eager, after = _eager("normal_", n, 0.0, 1.0, state)
    mine = torch.empty(n)
    got = _drawkernels._ext.normal_f32(_rng.state_bytes(state), mine.data_ptr(), n, 0.0, 1.0)
    assert torch.equal(mine.view(torch.int32), eager.view(torch.int32))
    assert got == _rng.state_bytes(after)


@pytest.mark.parametrize(
    ("func", "dtype", "n", "law"),
    [
        (NORMAL, torch.float32, 4099, (0.1, 0.02)),
        (NORMAL, torch.float32, 7, (0.0, 1.0)),  # torch's scalar path: torch's kernel runs
        (NORMAL, torch.float64, 100, (0.0, 1.0)),
        (NORMAL, torch.bfloat16, 100, (0.0, 1.0)),
        (UNIFORM, torch.float32, 1001, (-0.05, 0.05)),
        (UNIFORM, torch.float32, 1001, (1.0, 1.0000001)),  # values that round up to `to` become `from`
        (UNIFORM, torch.float16, 1001, (-0.05, 0.05)),
    ],
)
def test_run_draw_is_eager(func: object, dtype: torch.dtype, n: int, law: tuple[float, float]) -> None:
    state = _state_at(11, 100)
    op = "normal_" if func is NORMAL else "uniform_"
    eager, after = _eager(op, n, *law, state, dtype)
    mine = torch.empty(n, dtype=dtype)
    got = _drawkernels.run_draw(func, (mine, *law), {}, state)
    assert torch.equal(mine, eager) and torch.equal(got, after)
    # keyword parameters and a recorded generator (replaced by one at `state`) give the same
    mine2 = torch.empty(n, dtype=dtype)
    names = ("mean", "std") if op == "normal_" else ("from", "to")
    got2 = _drawkernels.run_draw(func, (mine2,), dict(zip(names, law), generator=torch.Generator()), state)
    assert torch.equal(mine2, eager) and torch.equal(got2, after)


def test_a_kernel_that_disagrees_with_torch_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another torch build or CPU capability may change torch's kernel: the calibration notices and
    torch's own kernel runs, so the values stay eager's."""

    def wrong(state: bytes, address: int, n: int, a: float, b: float) -> bytes:
        return state  # writes nothing and does not move the generator

    fake = SimpleNamespace(available=lambda: True, normal_f32=wrong, uniform_f32=wrong)
    monkeypatch.setattr(_drawkernels, "_ext", fake)
    monkeypatch.setattr(_drawkernels, "_PROVEN", {})
    monkeypatch.delenv("TORCHLAZY_NO_EXT", raising=False)
    assert not _drawkernels.compiled("normal_") and not _drawkernels.compiled("uniform_")
    state = _state_at(3, 0)
    eager, after = _eager("normal_", 512, 0.0, 1.0, state)
    mine = torch.empty(512)
    assert torch.equal(_drawkernels.run_draw(NORMAL, (mine,), {}, state), after)
    assert torch.equal(mine, eager)


def test_no_ext_runs_torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHLAZY_NO_EXT", "1")
    assert not _drawkernels.compiled("normal_")


def test_invalid_laws_reach_torch_and_its_error() -> None:
    state = _state_at(5, 0)
    with pytest.raises(RuntimeError, match="std"):
        _drawkernels.run_draw(NORMAL, (torch.empty(64), 0.0, -1.0), {}, state)
    with pytest.raises(RuntimeError, match="from"):
        _drawkernels.run_draw(UNIFORM, (torch.empty(64), 2.0, 1.0), {}, state)


@needs_core
@pytest.mark.skipif(not torch.__version__.startswith("2.13."), reason="proven against torch 2.13's kernels only")
def test_calibration_proves_the_kernels_on_the_pinned_torch() -> None:
    """On the torch CI pins the compiled kernels are torch's: the calibration must let them run (a
    calibration that refused them would leave exact draws correct but 2-10x slower, silently)."""
    assert _drawkernels.compiled("normal_") and _drawkernels.compiled("uniform_")
