"""The generator model (torchlazy._rng): jumps equal torch's own state, draw counts equal torch's kernels, split
generation equals the full kernel, and the compiled core gives the pure-Python path's bits.

Timing (2-core CI machine, see benchmarks/bench_rng.py): a jump of 10^3..10^10 words takes 0.1-6 ms in the
compiled core (0.5 ms once the distance is cached), 60-250 ms in pure Python (60 ms cached); torch generates
about 5 x 10^8 words/s.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchlazy as tl
from torchlazy import _rng

PATHS = ["c", "python"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test on the compiled core and on the pure-Python path."""
    if request.param == "c":
        if _rng._ext is None:
            pytest.skip("torchlazy._mtcore is not built (`python setup.py build_ext --inplace`)")
        monkeypatch.delenv("TORCHLAZY_NO_EXT", raising=False)
    else:
        monkeypatch.setenv("TORCHLAZY_NO_EXT", "1")
    assert _rng.backend() == request.param
    yield request.param


def seeded(seed: int = 1234, skip: int = 0) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    if skip:
        torch.empty(skip).uniform_(generator=g)
    return g


def run(op: str, dtype: torch.dtype, n: int, g: torch.Generator, **params: object) -> torch.Tensor:
    """The kernel ``words`` models under the name ``op``."""
    if op == "randperm":
        return torch.randperm(n, dtype=dtype, generator=g)
    t = torch.empty(n, dtype=dtype)
    if op == "random_" and "low" in params:
        return t.random_(params["low"], params.get("high"), generator=g)  # type: ignore[call-overload]
    return getattr(t, op)(generator=g, **params)


# --------------------------------------------------------------------------------------------------- the model


def test_phi_annihilates_the_stream() -> None:
    """Every bit of the stream satisfies the recurrence of phi, so phi is MT19937's characteristic polynomial."""
    block = _rng._py_advance(bytes(seeded(7).get_state()[24 : 24 + 4992].tolist()), 1)
    stream: list[int] = []
    for _ in range(_rng._WINDOW_BLOCKS + 1):
        stream += struct.unpack("<624Q", block)
        block = _rng._py_advance(block, 1)
    for k in (0, 1, 311, 623, 624):
        acc = 0
        for t in _rng._PHI_TERMS:
            acc ^= stream[k + t]
        assert acc == 0


N_UNIFORM = [0, 1, 623, 624, 625, 1247, 1248, 10**6, 3 * 10**7]


@pytest.mark.parametrize("skip", [0, 100], ids=["fresh", "mid-block"])
def test_jump_equals_torch_uniform(path: str, skip: int) -> None:
    for n in N_UNIFORM:
        g = seeded(5, skip)
        before = g.get_state()
        torch.empty(n).uniform_(generator=g)
        assert torch.equal(_rng.jump(before, n), g.get_state()), n


def test_a_distance_asked_again_takes_the_polynomial_jump_with_the_same_bits(path: str) -> None:
    """Between the two thresholds a distance asked once refills block after block and asked again jumps by
    its (now cached) polynomial: both equal torch's generator, from two different states."""
    blocks = (_rng._DIRECT_BLOCKS_KNOWN[path] + _rng._DIRECT_BLOCKS[path]) // 2
    n = blocks * 624 + 311
    for seed in (12, 13):  # the first asks the distance, the second finds it asked
        g = seeded(seed, 40)
        before = g.get_state()
        torch.empty(n).uniform_(generator=g)
        assert torch.equal(_rng.jump(before, n), g.get_state()), seed


def test_jump_from_refill_pending(path: str) -> None:
    g = seeded(6, 624)  # next == 624, left == 1: the next draw refills
    assert struct.unpack_from("<iiQ", bytes(g.get_state()[8:24].tolist())) == (1, 1, 624)
    before = g.get_state()
    for n in (1, 624, 625, 5000):
        g.set_state(before)
        torch.empty(n).uniform_(generator=g)
        assert torch.equal(_rng.jump(before, n), g.get_state()), n


def test_jump_composes_at_any_scale(path: str) -> None:
    s = seeded(9, 33).get_state()
    huge = [(2**69, 2**69)] if path == "c" else []  # 2^70 words: past the core's u64, the Python polynomial
    for a, b in [(10**13, 10**12 + 7), (2**40 + 1, 623), (10**9, 10**9), *huge]:
        assert torch.equal(_rng.jump(_rng.jump(s, a), b), _rng.jump(s, a + b))


def test_an_other_bernoulli_kernel_makes_bernoulli_unmodelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's MKL path for `bernoulli_(p)` (Intel CPUs) draws one seed word per tensor: where the process probe
    finds a kernel that draws otherwise than modelled, no count is claimed and the draw runs (still exact)."""
    assert _rng.words("bernoulli_", torch.float32, 10, p=0.3) == (20 if _rng.bernoulli_as_modelled() else None)
    monkeypatch.setattr(_rng, "bernoulli_as_modelled", lambda: False)
    assert _rng.words("bernoulli_", torch.float32, 10, p=0.3) is None
    torch.manual_seed(0)
    eager = torch.empty(1000).bernoulli_(0.3)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    with tl.deferred():
        model = torch.nn.Module()
        model.register_buffer("mask", torch.empty(1000).bernoulli_(0.3))
    assert torch.equal(torch.get_rng_state(), state)
    tl.materialize(model)
    assert torch.equal(model.mask, eager)


def test_a_negative_number_of_refills_is_refused_by_both_paths() -> None:
    """The compiled core read -1 as 2**64 - 1 refills and never returned; the Python path returned the block."""
    block = _rng.state_bytes(seeded(3).get_state())[_rng._BLOCK_AT : _rng._BLOCK_AT + _rng._BLOCK_BYTES]
    cores = [_rng._py_advance] + ([_rng._ext.advance] if _rng._ext is not None else [])
    for advance in cores:
        with pytest.raises(ValueError, match="must be >= 0"):
            advance(block, -1)


def test_c_path_equals_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if _rng._ext is None:
        pytest.skip("torchlazy._mtcore is not built")
    s = seeded(11, 5).get_state()
    for n in (0, 700, 624 * 300 + 5, 10**6 + 1, 12345678901, 10**13 + 3):
        monkeypatch.delenv("TORCHLAZY_NO_EXT", raising=False)
        c = _rng.jump(s, n)
        monkeypatch.setenv("TORCHLAZY_NO_EXT", "1")
        assert torch.equal(c, _rng.jump(s, n)), n
    terms = _rng._PHI_TERMS_BYTES
    for d in (1, 19937, 624 * 10**9):
        assert int.from_bytes(_rng._ext.powmod(d, terms), "little") == _rng._py_powmod(d)


def test_jump_keeps_seed_and_normal_cache() -> None:
    g = seeded(3)
    torch.empty(3).normal_(generator=g)  # the scalar path fills the cached double sample
    s = g.get_state()
    j = _rng.jump(s, 10**6)
    assert torch.equal(j[:8], s[:8]) and torch.equal(j[12:16], s[12:16]) and torch.equal(j[5016:], s[5016:])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="generator state"):
        _rng.jump(torch.zeros(10, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="forward"):
        _rng.jump(seeded().get_state(), -1)


def test_generator_at_and_after() -> None:
    g = seeded(2, 10)
    before = g.get_state()
    want = torch.empty(1000).normal_(generator=g)
    after = _rng.after(before, "normal_", torch.float32, 1000)
    assert after is not None and torch.equal(after, g.get_state())
    assert torch.equal(torch.empty(1000).normal_(generator=_rng.generator_at(before)), want)
    assert _rng.after(before, "normal_", torch.float32, 3) is None


# ------------------------------------------------------------------------------------------------- calibration

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]
SIZES = sorted(
    set(range(1, 101)) | {2**k for k in range(17)} | {10007, 65537} | {16 * k + d for k in (8, 64) for d in (-1, 1)}
)
KERNELS: list[tuple[str, list[torch.dtype], dict[str, object]]] = [
    ("uniform_", FLOATS, {}),
    ("normal_", FLOATS, {}),
    ("random_", FLOATS + INTS, {}),
    ("random_", FLOATS + INTS[:-1], {"low": 0, "high": 10}),
    ("random_", [torch.int32, torch.int64, torch.float64], {"low": -5, "high": 2**28 - 6}),  # just below 2^28
    ("random_", [torch.int32, torch.int64, torch.float64], {"low": -5, "high": 2**28 - 5}),  # 2^28: random64
    ("random_", [torch.int64, torch.float64], {"low": 0, "high": 2**40}),
    ("random_", FLOATS + INTS, {"low": 0, "high": None}),
    ("random_", [torch.int64], {"low": -(2**63), "high": None}),
    ("random_", [torch.float16], {"low": -60000, "high": None}),
    ("random_", [torch.bfloat16, torch.float32], {"low": -(2**24) + 1, "high": None}),
    ("bernoulli_", FLOATS, {"p": 0.3}),
    ("exponential_", FLOATS, {}),
    ("cauchy_", FLOATS, {}),
    ("geometric_", FLOATS + [torch.int32, torch.int64], {"p": 0.3}),
    ("randperm", [torch.int64, torch.int32, torch.float32], {}),
]


@pytest.mark.parametrize("low", [-(2**24), -(2**28 - 2**24) + 1, -(2**28 - 2**24), -(2**28), -(2**31), -(2**40)])
def test_random_from_a_far_low_to_the_float_maximum_is_counted_right_or_run(low: int) -> None:
    """`random_(low, None)` on float32/bfloat16 draws 64-bit words once torch's span (its rounding of `low`
    included) reaches 2**28: counted as one word each, later draws took the wrong words (found by review)."""
    g = seeded(5, 1)
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 7, 100):
            check_count("random_", dtype, n, g, low=low, high=None)


def check_count(op: str, dtype: torch.dtype, n: int, g: torch.Generator, **params: object) -> int | None:
    """``words`` against the real kernel: the state after it equals ``jump`` by ``words`` (all 5,056 bytes)."""
    before = g.get_state()
    count = _rng.words(op, dtype, n, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random_ on floats warns about precision
        run(op, dtype, n, g, **params)
    if count is not None:
        assert torch.equal(_rng.jump(before, count), g.get_state()), (op, dtype, n, params, count)
    return count


@pytest.mark.parametrize(("op", "dtypes", "params"), KERNELS, ids=[f"{k[0]}{k[2] or ''}" for k in KERNELS])
def test_words_calibration(op: str, dtypes: list[torch.dtype], params: dict[str, object]) -> None:
    g = seeded(21, 3)
    for dtype in dtypes:
        for n in SIZES:
            count = check_count(op, dtype, n, g, **params)
            unmodelled = (op == "normal_" and n < 16) or (op == "bernoulli_" and not _rng.bernoulli_as_modelled())
            assert count is not None or unmodelled, (op, dtype, n)


@settings(max_examples=60, deadline=None)
@given(
    kernel=st.sampled_from([(op, d, p) for op, ds, p in KERNELS for d in ds]),
    n=st.integers(0, 5000),
    skip=st.integers(0, 1300),
)
def test_words_property(kernel: tuple[str, torch.dtype, dict[str, object]], n: int, skip: int) -> None:
    op, dtype, params = kernel
    check_count(op, dtype, n, seeded(skip, skip), **params)


def test_unmodelled_kernels_say_none() -> None:
    assert [_rng.words("normal_", d, n) for d in FLOATS for n in (1, 15)] == [None] * 8
    assert _rng.words("log_normal_", torch.float32, 100) is None  # Box-Muller with the cached sample
    assert _rng.words("random_", torch.float32, 10, low=0, high=2**30) is None  # rounded range, not modelled
    assert _rng.words("bernoulli_", torch.float32, 10, p=torch.full((10,), 0.5)) is None
    assert _rng.words("randperm", torch.int64, 2**32) is None  # random64 swaps: not calibrated
    assert _rng.words("multinomial", torch.float32, 10) is None
    assert _rng.words("random_", torch.complex64, 10, low=0, high=None) is None
    assert (
        _rng.chunk("randperm", torch.int64, 100) is None
        and _rng.word_offset("log_normal_", torch.float32, 99, 0) is None
    )


def test_randint_is_random_with_a_range() -> None:
    g = seeded(4)
    for low, high in [(0, 10), (-(2**40), 2**40)]:
        before = g.get_state()
        torch.randint(low, high, (333,), generator=g)
        count = _rng.words("randint", torch.int64, 333, low=low, high=high)
        assert count is not None and torch.equal(_rng.jump(before, count), g.get_state())


# ------------------------------------------------------------------------------------------------ split generation

SPLIT_KERNELS: list[tuple[str, dict[str, object]]] = [
    ("uniform_", {}),
    ("normal_", {}),
    ("random_", {}),
    ("random_", {"low": 0, "high": 2**40}),
    ("bernoulli_", {"p": 0.3}),
    ("exponential_", {}),
    ("cauchy_", {}),
    ("geometric_", {"p": 0.3}),
]


def pieces(n: int, a: int) -> Iterator[list[int]]:
    """Cut lists that obey ``chunk``'s rule: the first, middle and last legal cut, and all of them together."""
    cuts = [c for c in range(a, n, a) if n - c >= a]
    if cuts:
        yield [cuts[0]]
        yield [cuts[len(cuts) // 2]]
        yield [cuts[-1]]
        yield cuts[:: max(1, len(cuts) // 5)]


def split_run(
    op: str, dtype: torch.dtype, n: int, before: torch.Tensor, cuts: list[int], **params: object
) -> torch.Tensor:
    out = []
    for a, b in zip([0, *cuts], [*cuts, n]):
        offset = _rng.word_offset(op, dtype, n, a, **params)
        assert offset is not None
        out.append(run(op, dtype, b - a, _rng.generator_at(_rng.jump(before, offset)), **params))
    return torch.cat(out)


@pytest.mark.parametrize(("op", "params"), SPLIT_KERNELS, ids=[f"{k[0]}{k[1] or ''}" for k in SPLIT_KERNELS])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_split_equals_full(op: str, params: dict[str, object], dtype: torch.dtype) -> None:
    g = seeded(8, 77)
    before = g.get_state()
    if op == "random_" and "low" in params and dtype not in (torch.float64,):
        params = {}
    for n in (16, 17, 31, 32, 33, 100, 1000, 1007, 4099):
        a = _rng.chunk(op, dtype, n, **params)
        assert a == (16 if op == "normal_" else 1)
        full = run(op, dtype, n, _rng.generator_at(before), **params)
        for cuts in pieces(n, a):
            got = split_run(op, dtype, n, before, cuts, **params)
            assert torch.equal(got.view(torch.uint8), full.view(torch.uint8)), (op, dtype, n, cuts)


def test_split_rule_is_enforced() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        _rng.word_offset("normal_", torch.float32, 100, 8)
    with pytest.raises(ValueError, match="at least 16"):
        _rng.word_offset("normal_", torch.float32, 100, 96)  # a last piece of 4 takes the scalar path
    assert _rng.word_offset("normal_", torch.float64, 100, 80) == 160


def test_normal_tail_piece_must_hold_16() -> None:
    """Why the rule: a ragged last piece shorter than 16 is not the full kernel's slice."""
    before = seeded(1).get_state()
    full = torch.empty(100).normal_(generator=_rng.generator_at(before))
    short = torch.empty(4).normal_(generator=_rng.generator_at(_rng.jump(before, 96)))
    assert not torch.equal(short, full[96:])
