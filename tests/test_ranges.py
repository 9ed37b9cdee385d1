"""Value ranges (`_ranges`): a rejection sampler's test answered from its draws' law, never wrongly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from exact import assert_models_identical, eager_and_deferred
from torch import nn

import torchlazy as tl
from torchlazy._record import Record


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times recorded values were computed for real (one entry per `Record.evaluate`)."""
    calls: list[int] = []
    original = Record.evaluate

    def counted(self: Record, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Record, "evaluate", counted)
    return calls


def _inits(dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(17, 5), torch.nn.Linear(300, 20)).to(dtype)
        torch.nn.init.trunc_normal_(m[0].weight, std=0.02)  # [-2, 2] at 100 std: never rejects
        torch.nn.init.trunc_normal_(m[1].weight, mean=1.0, std=0.1, a=-1.0, b=3.0)
        torch.nn.init.trunc_normal_(m[2].weight, std=1.0, a=-0.5, b=0.5)  # rejects: values decide
        return m

    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_trunc_normal_generates_nothing_when_the_law_decides(dtype: torch.dtype, evaluations: list[int]) -> None:
    eager, model = eager_and_deferred(_inits(dtype))
    assert_models_identical(model, eager)
    # its two bounds are constants, its test follows from the law: nothing is computed; a narrow law's test is
    with tl.deferred():
        torch.nn.init.trunc_normal_(torch.empty(64, 64, dtype=dtype), std=0.02)
    before = len(evaluations)
    with tl.deferred():
        torch.nn.init.trunc_normal_(torch.empty(64, 64, dtype=dtype), std=0.02)
        decided = len(evaluations) - before
        torch.nn.init.trunc_normal_(torch.empty(64, 64, dtype=dtype), std=1.0, a=-0.5, b=0.5)
        undecided = len(evaluations) - before - decided
    # ranges are kept for float32 and float64 only (half types round and overflow early: computed, exactly)
    assert (decided == 0 if dtype in (torch.float32, torch.float64) else decided >= 1) and undecided >= 1


@pytest.mark.parametrize(
    "test",
    [
        lambda: (torch.full((4,), 0.1) < 0.10000000001).any(),  # float32 rounds both sides to one value
        lambda: (torch.full((4,), 0.1) >= 0.1).all(),
        lambda: (torch.randn(100) > 50).any(),
        lambda: (torch.randn(100) < 50).all(),
        lambda: ((torch.rand(10) < 0) | (torch.rand(10) > 1)).any(),
        lambda: (torch.zeros(3) > 0).logical_not().all(),
        lambda: (torch.empty(0).normal_() > 0).all(),  # no element: all() is True
        lambda: (torch.randn(5) > 0).any(),  # the law does not decide: computed
        lambda: torch.tensor([1.0, float("nan")]).lt(2).all(),
        lambda: torch.tensor(0.25),  # a constant's value, as it is
        lambda: torch.tensor([3], dtype=torch.int64),
        # found by review: casts, dtype views, overflow and rounding near zero (none may be answered wrongly)
        lambda: (torch.full((3,), 2.7, dtype=torch.int64) < 2.5).any(),
        lambda: (torch.empty(3, dtype=torch.uint8).fill_(-1) < 0).any(),
        lambda: (torch.full((3,), 2, dtype=torch.bool) > 1.5).any(),
        lambda: (torch.empty(3, dtype=torch.bool).copy_(torch.full((3,), 0.5)) < 0.9).any(),
        lambda: (torch.empty(3, dtype=torch.uint8).copy_(torch.full((3,), 300.0)) > 250).any(),
        lambda: (torch.empty(3, dtype=torch.half).copy_(torch.full((3,), 1e6)) < 2e6).any(),
        lambda: (torch.empty(64).normal_(3.3e38, 1e37) < 1e39).all(),
        lambda: (torch.empty(3, dtype=torch.half).normal_(1e4, 1) < 2e4).all(),
        lambda: (torch.zeros(4, dtype=torch.half) < 1e-8).any(),
        lambda: (torch.zeros(4) < 1e-44).any(),
        lambda: (torch.zeros(4, dtype=torch.half) < torch.tensor(1e-8, dtype=torch.float64)).any(),
        lambda: (torch.ones(4).view(torch.int32) > 2).all(),
        lambda: (torch.logical_not(torch.full((3,), 0.5)) > 0.25).any(),
        lambda: (torch.full((2,), 0.1)[torch.tensor([True, True])] > 0.1).all(),
        lambda: (torch.tensor([2**53 + 1])[torch.tensor([True])] > 2**53).all(),
    ],
)
def test_decided_and_computed_tests_give_eager_values(test: Callable[[], torch.Tensor]) -> None:
    torch.manual_seed(0)
    expected = test().item()
    torch.manual_seed(0)
    with tl.deferred(concretize=True):
        got = test().item()
    assert type(got) is type(expected) and got == expected


def test_flush_denormal_reads_subnormals_as_zero() -> None:
    """With `set_flush_denormal(True)` the CPU stores and compares subnormals as 0: ranges leave room."""
    tests = [
        lambda: (torch.empty(3).fill_(1e-40) > 0).all(),
        lambda: (torch.empty(4).fill_(0.0) < 1e-40).all(),
        lambda: (torch.empty(40).normal_(1e-40, 1e-46) > 0).all(),
        lambda: (torch.empty(40).uniform_(1e-40, 2e-40) > 0).all(),
    ]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for test in tests:
            torch.manual_seed(0)
            expected = test().item()
            with tl.deferred(concretize=True):
                assert test().item() is expected
    finally:
        torch.set_flush_denormal(False)


def test_refused_laws_and_grown_storages_are_not_answered() -> None:
    with tl.deferred(concretize=True), pytest.raises(RuntimeError, match="from"):
        (torch.empty(10).uniform_(1.0, 0.0) < 0.5).any().item()  # eager refuses from > to
    torch.use_deterministic_algorithms(True)  # memory a resize_ adds is NaN: a test that must see it
    try:

        def grown() -> torch.Tensor:
            y = torch.empty(10).fill_(1.0)
            y.resize_(20)
            y[:10].normal_()
            return (y < 50).all()

        expected = grown().item()
        with tl.deferred(concretize=True):
            assert grown().item() is expected
    finally:
        torch.use_deterministic_algorithms(False)


def _recorded_ops(t: torch.Tensor) -> list[str]:
    """The ops of the record `t` belongs to."""
    from torchlazy._deferred import storage_of

    owner = storage_of(t)
    assert owner is not None
    return [n.func.overloadpacket.__name__ for n in owner[0].nodes if n.func is not None and n.law is None]


@pytest.mark.parametrize("seeded", [False, True])
def test_trunc_normal_out_of_its_laws_reach_is_recorded_as_one_draw(seeded: bool) -> None:
    """Bounds its law never reaches: recorded as the one `normal_` eager keeps, not its rejection test;
    elsewhere (narrow bounds, half precision, infinite bounds) torch's own body runs and is recorded."""

    def make(gen: torch.Generator | None) -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(8, 8).half(), torch.nn.Linear(6, 6))
        torch.nn.init.trunc_normal_(m[0].weight, std=0.02, generator=gen)
        torch.nn.init.trunc_normal_(m[0].weight[:5], mean=0.5, std=0.01, a=0.0, b=1.0, generator=gen)  # a view
        torch.nn.init.trunc_normal_(m[1].weight, std=0.02, generator=gen)  # float16: torch's body
        torch.nn.init.trunc_normal_(m[2].weight, std=1.0, a=-0.5, b=0.5, generator=gen)  # rejects
        torch.nn.init.trunc_normal_(m[2].bias, std=0.02, a=-float("inf"), b=2.0, generator=gen)
        return m

    def gen() -> torch.Generator | None:
        return torch.Generator().manual_seed(7) if seeded else None

    torch.manual_seed(0)
    g = gen()
    eager = make(g)
    after = (torch.get_rng_state(), g.get_state() if g is not None else None)
    torch.manual_seed(0)
    g = gen()
    with tl.deferred():
        model = make(g)
    assert torch.equal(torch.get_rng_state(), after[0])
    assert g is None or torch.equal(g.get_state(), after[1])
    assert _recorded_ops(model[0].weight).count("any") >= 3  # the three other calls ran torch's body
    with tl.deferred():
        only_far = torch.nn.init.trunc_normal_(torch.empty(16, 16), std=0.02)
        torch.nn.init.trunc_normal_(only_far[:3], mean=0.5, std=0.01, a=0.0, b=1.0)
    assert _recorded_ops(only_far) == ["empty", "normal_", "normal_"]
    tl.materialize(model)
    assert_models_identical(model, eager)


def test_trunc_normal_outside_a_block_is_torchs() -> None:
    with tl.deferred():
        torch.nn.Linear(2, 2)
    torch.manual_seed(0)
    x = torch.nn.init.trunc_normal_(torch.empty(100), std=1.0, a=-0.1, b=0.1)
    assert x.abs().max() <= 0.1 and len(torch.unique(x)) == 100


def test_trunc_normal_refusals_are_torchs() -> None:
    """std=0: torch divides by it; the block raises what eager raises."""
    with pytest.raises(ZeroDivisionError):
        torch.nn.init.trunc_normal_(torch.empty(4), std=0.0)
    with tl.deferred(), pytest.raises(ZeroDivisionError):
        torch.nn.init.trunc_normal_(torch.empty(4), std=0.0)


class _TruncBlock(tl.LazyModule):
    def build(self, x: torch.Tensor) -> None:
        self.w = torch.nn.Parameter(torch.empty(x.shape[-1], 7))
        torch.nn.init.trunc_normal_(self.w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_trunc_normal_in_a_lazy_build_keeps_no_reference() -> None:
    """A lazy layer built by `tl.build` inside a deferred model runs torch's body: the recorder keeps no
    frame of the call (a frame holds the tensor, and the swap into the model refuses extra references)."""
    torch.manual_seed(0)
    with tl.deferred():
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), _TruncBlock())
    tl.build(model, torch.empty(2, 8))
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), _TruncBlock())
    eager(torch.empty(2, 8))
    assert_models_identical(model, eager)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # torch's own, eager alike
def test_trunc_normal_with_tensor_parameters_is_exact() -> None:
    """Tensor-valued mean/std/bounds (0-d tensors, made inside the block or given from outside), as eager takes."""
    outside = torch.tensor(-1.5)

    def make() -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(5, 5))
        torch.nn.init.trunc_normal_(m[0].weight, mean=torch.tensor(0.0), std=torch.tensor(0.5))
        torch.nn.init.trunc_normal_(m[1].weight, std=torch.tensor(1.0), a=outside, b=torch.tensor(1.5))
        return m

    torch.manual_seed(0)
    eager = make()
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    tl.materialize(model)
    assert_models_identical(model, eager)
    with tl.deferred():
        fast = make()
    tl.materialize(fast, exact=False)
    assert fast[0].weight.abs().max() <= 2.0 and fast[1].weight.abs().max() <= 1.5


def test_trunc_normal_after_the_block_on_a_slice_of_a_rejecting_init() -> None:
    """A rejecting `trunc_normal_` leaves a law node on its tensor; a later `trunc_normal_` on a slice of it (FSDP2's
    rank-1 shard, written after `fully_shard`) asked the range rules for that node's op name, which a law node
    has not: AttributeError (and on FSDP, ranks on different paths: a collective mismatch)."""

    class Rejecting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(33, 21))
            nn.init.trunc_normal_(self.w, std=1.0, a=-0.5, b=0.5)  # its rejection loop runs

    torch.manual_seed(0)
    eager = Rejecting()
    with torch.no_grad():
        nn.init.trunc_normal_(eager.w[17:], std=0.02)
    torch.manual_seed(0)
    with tl.deferred():
        model = Rejecting()
    with torch.no_grad():
        nn.init.trunc_normal_(model.w[17:], std=0.02)
    tl.materialize(model)
    assert_models_identical(model, eager)
