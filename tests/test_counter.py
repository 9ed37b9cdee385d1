"""The counter-based stream of exact=False: layout independence, C core == pure torch path, honest laws."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch

from torchlazy import _counter
from torchlazy._counter import (
    LAWS,
    _fill_c,
    _fill_pure,
    _log_word,
    _normal_pair_f32,
    _philox,
    _Plan,
    _pure_range,
    fill,
)

needs_core = pytest.mark.skipif(_counter._core is None, reason="torchlazy._countercore is not built")

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
PARAMS: dict[str, dict[str, Any]] = {
    "uniform": {"from": -0.3, "to": 0.7},
    "normal": {"mean": 0.5, "std": 2.0},
    "bernoulli": {"p": 0.3},
    "exponential": {"lambd": 2.0},
    "log_normal": {"mean": 0.1, "std": 0.5},
    "cauchy": {"median": 1.0, "sigma": 0.5},
    "geometric": {"p": 0.2},
    "random": {"from": -5, "to": 100},
    "truncated_normal": {"mean": 0.0, "std": 1.0, "a": -1.0, "b": 0.5},
}
# edge cases of the dtype conversion: half subnormals and overflow, bf16 rounding, uniform's top clamp
EDGES: list[tuple[str, dict[str, Any]]] = [
    ("uniform", {"from": 0.0, "to": 1e-4}),
    ("uniform", {"from": 0.0, "to": 1.0}),
    ("uniform", {"from": -3.0, "to": -1.0}),
    ("normal", {"mean": 0.0, "std": 3e4}),
    ("normal", {"mean": 0.0, "std": 1e-6}),
]
KEY = (0x0123456789ABCDEF, 42)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _pure(n: int, law: str, params: dict[str, Any], dtype: torch.dtype, key: tuple[int, int] = KEY, start: int = 0):
    out = torch.empty(n, dtype=dtype)
    _fill_pure(out, _Plan(out, law, params), key, start)
    return out


def _core(n: int, law: str, params: dict[str, Any], dtype: torch.dtype, start: int = 0, threads: int = 1):
    out = torch.empty(n, dtype=dtype)
    _fill_c(out, _Plan(out, law, params), KEY, start, threads)
    return out


def _sample(n: int, law: str, params: dict[str, Any], key: tuple[int, int] = KEY) -> torch.Tensor:
    return fill(torch.empty(n, dtype=torch.float64), law, params, key)


# ---------------------------------------------------------------- the generator itself


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123's known-answer vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]) -> None:
    if counter[1] < 1 << 31:  # the pure path holds block indices in int64
        block = torch.tensor([counter[0] | counter[1] << 32])
        words = _philox(block, 0, (key[0] | key[1] << 32, counter[2] | counter[3] << 32))
        assert tuple(int(w) for w in words) == expected
    if _counter._core is not None:
        assert _counter._core.philox(*counter, *key) == expected


# ---------------------------------------------------------------- same bits: C core == pure torch path


@needs_core
@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_core_equals_pure(law: str, dtype: torch.dtype) -> None:
    n, start = 4099, 7
    assert torch.equal(
        _bits(_core(n, law, PARAMS[law], dtype, start)), _bits(_pure(n, law, PARAMS[law], dtype, start=start))
    )


@needs_core
@pytest.mark.parametrize(("law", "params"), EDGES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_core_equals_pure_edges(law: str, params: dict[str, Any], dtype: torch.dtype) -> None:
    a, b = _core(20000, law, params, dtype), _pure(20000, law, params, dtype)
    assert torch.equal(_bits(a), _bits(b))


@needs_core
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool], ids=str)
def test_core_equals_pure_integers(dtype: torch.dtype) -> None:
    top = 2 if dtype == torch.bool else 100
    for law, params in (("random", {"from": 0, "to": top}), ("bernoulli", {"p": 0.25})):
        assert torch.equal(_core(3001, law, params, dtype, 3), _pure(3001, law, params, dtype, start=3))


def test_no_ext_switch_gives_the_pure_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHLAZY_NO_EXT", "1")
    assert not _counter.has_extension()
    got = fill(torch.empty(1000), "normal", {}, KEY)
    assert torch.equal(got, _pure(1000, "normal", {}, torch.float32))
    monkeypatch.setenv("TORCHLAZY_NO_EXT", "0")
    assert torch.equal(fill(torch.empty(1000), "normal", {}, KEY), got)


def _isas() -> list[str]:
    if _counter._core is None:
        return []
    initial, found = _counter._core.set_isa(), []
    for name in ("avx512", "avx2", "scalar"):
        try:
            found.append(_counter._core.set_isa(name))
        except ValueError:
            pass
    _counter._core.set_isa(initial)
    return found


@needs_core
@pytest.mark.parametrize("isa", _isas())
def test_every_philox_kernel_gives_the_same_bits(isa: str) -> None:
    assert _counter._core is not None
    initial = _counter._core.set_isa()
    try:
        _counter._core.set_isa(isa)
        for law in ("normal", "truncated_normal", "random"):
            for dtype in (torch.float32, torch.float64):
                a, b = _core(5003, law, PARAMS[law], dtype, 3), _pure(5003, law, PARAMS[law], dtype, start=3)
                assert torch.equal(_bits(a), _bits(b)), (isa, law, dtype)
    finally:
        _counter._core.set_isa(initial)


@needs_core
def test_float32_normal_equals_pure_at_edge_words() -> None:
    """The C core's float32 Box-Muller (some steps in cheaper forms with the same IEEE results) against the
    pure path's literal steps, at the words where those forms could part: u = 1 and the smallest u, the
    mantissa crossing sqrt 2 at every exponent, the reduced exponent reaching 0, quarter-turn boundaries."""
    assert _counter._core is not None
    top = 2**32
    a = [0, 1, 2, 127, 128, 129, 2**24 - 1, 2**24, 2**24 + 1, 2**31 - 1, 2**31, top - 1, top - 2, top - 3]
    a += [top - k for k in (127, 128, 129, 255, 256, 257, 2**20)]
    a += [int(2**e * math.sqrt(2)) + d for e in range(1, 32) for d in (-2, -1, 0, 1, 2)]
    a += [int(top / math.sqrt(2)) + d for d in range(-3, 4)]
    b = [(q * 2**30 + d) % top for q in range(4) for d in (-(2**29) - 1, -(2**29), -(2**29) + 1, -1, 0, 1, 2**29 - 1)]
    rng = random.Random(5)
    a += [rng.randrange(top) for _ in range(1000)]
    b += [rng.randrange(top) for _ in range(len(a) - len(b))]
    for words_b in (b, b[::-1]):  # every a meets two angles; lengths past 32 take the vector loop
        got = torch.frombuffer(
            bytearray(
                _counter._core.normal_f32(
                    torch.tensor(a, dtype=torch.int64).to(torch.int32).numpy().tobytes(),
                    torch.tensor(words_b, dtype=torch.int64).to(torch.int32).numpy().tobytes(),
                )
            ),
            dtype=torch.float32,
        )
        z0, z1 = _normal_pair_f32(torch.tensor(a, dtype=torch.int64), torch.tensor(words_b, dtype=torch.int64))
        assert torch.equal(_bits(got), _bits(torch.cat([z0, z1]) * 1.0 + 0.0))  # as the laws apply std and mean


# ---------------------------------------------------------------- layout independence


def _cuts(n: int, rng: random.Random, pieces: int) -> list[int]:
    return [0, *sorted(rng.sample(range(1, n), pieces - 1)), n]


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_slices_concatenate_to_the_whole(law: str, dtype: torch.dtype) -> None:
    n, rng = 3001, random.Random(hash((law, str(dtype))) & 0xFFFF)
    whole = fill(torch.empty(n, dtype=dtype), law, PARAMS[law], KEY, start=5)
    cuts = _cuts(n, rng, 7)
    parts = [fill(torch.empty(b - a, dtype=dtype), law, PARAMS[law], KEY, start=5 + a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(_bits(whole), _bits(torch.cat(parts)))
    # the pure path over other cut points
    cuts = _cuts(n, rng, 3)
    parts = [_pure(b - a, law, PARAMS[law], dtype, start=5 + a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(_bits(whole), _bits(torch.cat(parts)))


@needs_core
@pytest.mark.parametrize("law", ["uniform", "normal", "truncated_normal", "bernoulli"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_thread_count_does_not_change_values(law: str, dtype: torch.dtype) -> None:
    n = 3 * _counter._MIN_PER_THREAD + 13
    one = _core(n, law, PARAMS[law], dtype, 11, threads=1)
    assert torch.equal(_bits(one), _bits(_core(n, law, PARAMS[law], dtype, 11, threads=2)))
    assert torch.equal(_bits(one), _bits(_core(n, law, PARAMS[law], dtype, 11, threads=3)))


def test_shapes_are_flat_views() -> None:
    a = fill(torch.empty(6, 7), "uniform", {}, KEY)
    assert torch.equal(a.flatten(), fill(torch.empty(42), "uniform", {}, KEY))


def test_parameters_are_filled_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    for no_ext in ("0", "1"):
        monkeypatch.setenv("TORCHLAZY_NO_EXT", no_ext)
        p = torch.nn.Parameter(torch.empty(3, 5))
        assert fill(p, "normal", {}, KEY) is p and p.requires_grad and p.grad_fn is None
        assert torch.equal(p.detach().flatten(), fill(torch.empty(15), "normal", {}, KEY))


def test_keys_select_streams() -> None:
    a = _sample(1000, "normal", {})
    assert torch.equal(a, _sample(1000, "normal", {}))
    for other in [(KEY[0] + 1, KEY[1]), (KEY[0], KEY[1] + 1), (KEY[1], KEY[0])]:
        b = _sample(1000, "normal", {}, key=other)
        assert int((a == b).sum()) == 0


def test_same_values_in_a_fresh_process() -> None:
    code = (
        "import torch; from torchlazy._counter import fill; "
        f"print(fill(torch.empty(8, dtype=torch.float64), 'normal', {{}}, {KEY!r}, start=99).tolist())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert eval(got) == fill(torch.empty(8, dtype=torch.float64), "normal", {}, KEY, start=99).tolist()


# ---------------------------------------------------------------- the laws are honest

N = 1_000_000 if _counter.has_extension() else 200_000  # the pure path is ~100x slower


def _check_moments(x: torch.Tensor, mean: float, std: float, sigmas: float = 6.0) -> None:
    n = x.numel()
    assert abs(float(x.mean()) - mean) < sigmas * std / math.sqrt(n)
    # the sample std's standard error is about std / sqrt(2n) for light tails; be generous
    assert abs(float(x.std()) - std) < sigmas * 2 * std / math.sqrt(2 * n)


def _ks(x: torch.Tensor, cdf) -> float:  # type: ignore[no-untyped-def]
    x, _ = x.sort()
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def test_uniform() -> None:
    x = _sample(N, "uniform", {"from": -2.0, "to": 3.0})
    assert float(x.min()) >= -2.0 and float(x.max()) < 3.0
    _check_moments(x, 0.5, 5 / math.sqrt(12))
    assert _ks(x, lambda t: (t + 2.0) / 5.0) < 1.95 / math.sqrt(N)  # 99.9% quantile of the KS statistic


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_uniform_stays_below_to(dtype: torch.dtype) -> None:
    for lo, hi in [(0.0, 1.0), (-1.0, 0.3), (1.0, 1.01)]:
        x = fill(torch.empty(200_000, dtype=dtype), "uniform", {"from": lo, "to": hi}, KEY).double()
        assert float(x.max()) < hi and float(x.min()) >= lo - abs(lo) * 2**-7


def test_normal() -> None:
    x = _sample(N, "normal", {"mean": 1.0, "std": 3.0})
    _check_moments(x, 1.0, 3.0)
    assert _ks(x, lambda t: 0.5 * (1 + torch.erf((t - 1.0) / (3.0 * math.sqrt(2))))) < 1.95 / math.sqrt(N)
    z = (x - 1.0) / 3.0
    assert abs(float((z**4).mean()) - 3.0) < 5 * math.sqrt(96 / N)  # kurtosis: the tails are Gaussian too
    assert abs(float((z.abs() > 4).double().mean()) - 6.334e-5) < 5 * math.sqrt(6.334e-5 / N)


def test_normal_float32_ks() -> None:
    x = fill(torch.empty(N), "normal", {}, KEY).double()
    assert _ks(x, lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))) < 1.95 / math.sqrt(N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_narrow_normals_run_in_float32_close_to_float64(dtype: torch.dtype) -> None:
    """Normals into <= 24-bit dtypes use float32 arithmetic: within 5e-7 relative of the float64 formulas."""
    n = 200_000
    out = fill(torch.empty(n), "normal", {}, KEY)
    plan = _Plan(torch.empty(0, dtype=dtype), "normal", {})
    assert plan.f32 and not _Plan(torch.empty(0, dtype=torch.float64), "normal", {}).f32
    plan.f32 = False  # the float64 formulas on the same 32-bit words
    ref = _pure_range(plan, KEY, 0, n)
    assert float(((out.double() - ref).abs() / ref.abs()).max()) < 5e-7
    assert torch.equal(fill(torch.empty(n, dtype=dtype), "normal", {}, KEY), out.to(dtype))


def test_float32_log_keeps_small_radii() -> None:
    """-log u near u = 1 (the small Box-Muller radii) keeps float32's relative precision, as near u = 0."""
    words = [0, 1, 2**20, 2**31 - 1, 2**31, 3_037_000_499, 2**32 - 2**20, 2**32 - 3, 2**32 - 2]
    got = _log_word(torch.tensor(words, dtype=torch.int64)).double()
    want = torch.tensor([math.log1p(-(2**32 - 1 - w) / 2**32) for w in words], dtype=torch.float64)
    assert float(((got - want).abs() / want.abs()).max()) < 3e-7
    assert float(_log_word(torch.tensor([2**32 - 1]))) == 0.0  # u = 1 exactly


def test_truncated_normal() -> None:
    x = _sample(N, "truncated_normal", {"mean": 0.0, "std": 1.0, "a": -1.0, "b": 0.5})
    assert float(x.min()) >= -1.0 and float(x.max()) <= 0.5
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    z = cdf(0.5) - cdf(-1.0)
    mean = (phi(-1.0) - phi(0.5)) / z
    var = 1 + (-1.0 * phi(-1.0) - 0.5 * phi(0.5)) / z - mean**2
    _check_moments(x, mean, math.sqrt(var))
    # typical nn.init.trunc_normal_ use: bounds far out in std units, so the law is the normal
    y = _sample(N, "truncated_normal", {"std": 0.02, "a": -2.0, "b": 2.0})
    _check_moments(y, 0.0, 0.02)


def test_bernoulli() -> None:
    x = _sample(N, "bernoulli", {"p": 0.3})
    assert set(x.unique().tolist()) == {0.0, 1.0}
    _check_moments(x, 0.3, math.sqrt(0.21))


def test_exponential() -> None:
    x = _sample(N, "exponential", {"lambd": 4.0})
    assert float(x.min()) > 0.0
    _check_moments(x, 0.25, 0.25, sigmas=8.0)


def test_log_normal() -> None:
    x = _sample(N, "log_normal", {"mean": 0.2, "std": 0.4})
    assert float(x.min()) > 0.0
    _check_moments(x.log(), 0.2, 0.4)


def test_cauchy() -> None:
    x = _sample(N, "cauchy", {"median": 1.0, "sigma": 2.0})
    assert abs(float(x.median()) - 1.0) < 0.02
    q1, q3 = torch.quantile(x[:100_000], torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    assert abs(q1 + 1.0) < 0.05 and abs(q3 - 3.0) < 0.05  # quartiles: median -/+ sigma


def test_geometric() -> None:
    x = _sample(N, "geometric", {"p": 0.2})
    assert float(x.min()) == 1.0 and torch.equal(x, x.round())
    _check_moments(x, 5.0, math.sqrt(0.8) / 0.2, sigmas=8.0)


def test_random() -> None:
    x = fill(torch.empty(N, dtype=torch.int64), "random", {"from": -3, "to": 7}, KEY)
    counts = torch.bincount(x + 3, minlength=10).double()
    assert int(x.min()) == -3 and int(x.max()) == 6
    assert float(((counts - N / 10) ** 2 / (N / 10)).sum()) < 35.0  # chi-square, 9 dof, p ~ 1e-4


def test_kaiming_and_xavier_reduce_to_uniform_bounds() -> None:
    w = torch.empty(256, 512)
    bound = 1 / math.sqrt(512)  # kaiming_uniform_(a=sqrt(5)) of nn.Linear
    fill(w, "uniform", {"from": -bound, "to": bound}, KEY)
    assert float(w.abs().max()) < bound
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.01 * bound


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("law", "params", "match"),
    [
        ("gamma", {}, "unknown law `gamma`"),
        ("normal", {"sd": 1.0}, "takes parameters"),
        ("normal", {"std": -1.0}, "`std` >= 0"),
        ("uniform", {"from": 1.0, "to": 0.0}, "from <= to"),
        ("bernoulli", {"p": 1.5}, "0 <= p <= 1"),
        ("random", {"from": 0, "to": 2**33}, "2\\*\\*32"),
        ("truncated_normal", {"a": 5.0, "b": 6.0}, "exact=True"),
    ],
)
def test_bad_parameters_say_what_to_do(law: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fill(torch.empty(4), law, params, KEY)


def test_bad_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        fill(torch.empty(4, 4).t(), "normal", {}, KEY)
    with pytest.raises(TypeError, match="floating"):
        fill(torch.empty(4, dtype=torch.int32), "normal", {}, KEY)


@needs_core
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threads_work_in_a_forked_child() -> None:
    n = 4 * _counter._MIN_PER_THREAD
    want = _core(n, "normal", {}, torch.float32, threads=2)  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        signal.alarm(60)  # a hang becomes a failure, not a stuck suite
        torch.set_num_threads(1)  # torch's own OpenMP pool is not fork-safe; ours must be
        ok = torch.equal(_core(n, "normal", {}, torch.float32, threads=2), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
