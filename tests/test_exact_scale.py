"""Exact at any scale: dead draws jumped over, draws split over threads, generators left as eager leaves them."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from exact import assert_models_identical, eager_and_deferred
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchlazy as tl
from torchlazy import _record


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(300, 700), nn.GELU(), nn.Linear(700, 301), nn.LayerNorm(301))


def _hf_style() -> nn.Module:
    """reset_parameters draws, then an `_init_weights` redraws every Linear and Embedding (dead draws)."""
    m = nn.ModuleDict(dict(emb=nn.Embedding(5000, 96, padding_idx=0), a=nn.Linear(96, 384), b=nn.Linear(384, 96)))
    for sub in m.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            sub.weight.data.normal_(0.0, 0.02)
        if isinstance(sub, nn.Embedding):
            sub.weight.data[0].zero_()
    return m


def _truncated() -> nn.Module:
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 17))
    nn.init.trunc_normal_(m[0].weight, std=0.02)  # a rejection sampler: draws depend on values
    nn.init.normal_(m[1].weight[:, :5])  # a non-contiguous draw: the generator model falls back to running it
    return m


def _with_lazy() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 30), tl.nn.Linear(7), tl.nn.LayerNorm(), nn.Linear(7, 3))


def _with_lazy_eager() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 30), nn.Linear(30, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def _seeded_at_the_end() -> nn.Module:
    m = nn.Sequential(nn.Linear(10, 30), nn.Linear(30, 3))
    torch.manual_seed(5)  # after the last draw: the block ends with the program's seed, as eager does
    return m


def _state_restored_at_the_end() -> nn.Module:
    saved = torch.get_rng_state()
    m = nn.Sequential(nn.Linear(10, 30), nn.Linear(30, 3))
    torch.set_rng_state(saved)
    return m


MODELS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("mlp", _mlp),
    ("hf_style", _hf_style),
    ("truncated", _truncated),
    ("transformer", lambda: nn.TransformerEncoderLayer(32, 4, 64)),
    ("seeded at the end", _seeded_at_the_end),
    ("state restored at the end", _state_restored_at_the_end),
]


@pytest.mark.parametrize("name,make", MODELS)
def test_generator_after_block_and_after_materialize_is_eagers(name: str, make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(3)
    with tl.deferred():
        model = make()
    after_block = torch.get_rng_state()
    drawn_after = torch.randn(5)  # the rest of the program sees eager's stream
    tl.materialize(model)
    assert torch.equal(torch.get_rng_state(), torch.default_generator.get_state())
    torch.manual_seed(3)
    eager = make()
    assert torch.equal(after_block, torch.get_rng_state())
    assert torch.equal(drawn_after, torch.randn(5))
    _same(model, eager)


def test_materialize_never_moves_the_generator() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        model = _hf_style()
    before = torch.get_rng_state()
    tl.materialize(model)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("no_ext", ["0", "1"])  # compiled draw kernels, and torch's
def test_materialize_never_moves_an_explicit_generator(monkeypatch: pytest.MonkeyPatch, no_ext: str) -> None:
    monkeypatch.setenv("TORCHLAZY_NO_EXT", no_ext)
    gen = torch.Generator().manual_seed(5)
    with tl.deferred():
        model = nn.Linear(64, 64)
        nn.init.normal_(model.weight, std=0.02, generator=gen)
        nn.init.uniform_(model.bias, -0.1, 0.1, generator=gen)
    after_block = gen.get_state()
    tl.materialize(model)
    assert torch.equal(gen.get_state(), after_block)
    gen_eager = torch.Generator().manual_seed(5)
    eager = nn.Linear(64, 64)
    nn.init.normal_(eager.weight, std=0.02, generator=gen_eager)
    nn.init.uniform_(eager.bias, -0.1, 0.1, generator=gen_eager)
    assert torch.equal(after_block, gen_eager.get_state())
    assert torch.equal(model.weight, eager.weight) and torch.equal(model.bias, eager.bias)


def test_materialize_inside_a_block_is_real_and_the_block_records_on() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        a = _mlp()
    with tl.deferred():
        b = _hf_style()
        tl.materialize(a)  # real ops, none recorded into this block; its generator untouched
        assert not any(tl.is_deferred(p) for p in a.parameters())
        c = _mlp()
    tl.materialize(b)
    tl.materialize(c)
    torch.manual_seed(0)
    ea, eb, ec = _mlp(), _hf_style(), _mlp()
    _same(a, ea)
    _same(b, eb)
    _same(c, ec)


def test_two_blocks_in_a_row_are_two_eager_constructions() -> None:
    torch.manual_seed(1)
    with tl.deferred():
        a = _mlp()
    with tl.deferred():
        b = _hf_style()
    tl.materialize(b)
    tl.materialize(a)
    torch.manual_seed(1)
    ea, eb = _mlp(), _hf_style()
    _same(a, ea)
    _same(b, eb)


def test_lazy_layers_built_after_the_block_leave_the_generator_as_eager() -> None:
    torch.manual_seed(2)
    with tl.deferred():
        model = _with_lazy()
    tl.build(model, tl.Spec(4, 10))
    after = torch.randn(3)
    torch.manual_seed(2)
    eager = _with_lazy_eager()
    assert torch.equal(after, torch.randn(3))
    _same(model, eager)


def test_a_block_left_by_an_error_leaves_the_generators_where_eager_construction_failing_left_them() -> None:
    """A program that catches a bad configuration and carries on draws what eager draws next (the generator was
    left at a parked position, neither eager's nor the entry's state), an explicit generator too."""

    def build(gen: torch.Generator) -> None:
        nn.Linear(30, 30)
        torch.empty(5).normal_(generator=gen)
        raise ValueError("bad config")

    states = []
    for deferred in (False, True):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(3)
        with pytest.raises(ValueError, match="bad config"):
            with tl.deferred() if deferred else contextlib.nullcontext():
                build(gen)
        states.append((torch.get_rng_state(), gen.get_state(), torch.rand(3)))
    for eager, deferred in zip(*states):
        assert torch.equal(eager, deferred)


def test_a_generator_state_copied_in_the_block_and_set_back_is_a_deferred_error() -> None:
    """A copy of a state is a tensor made in the block, without values: `set_rng_state` read its missing memory
    in C++ and PyTorch's raw RuntimeError escaped; the block's generators still end where eager left them."""
    torch.manual_seed(0)
    with pytest.raises(tl.DeferredError, match="reads its memory directly"):
        with tl.deferred():
            saved = torch.get_rng_state().clone()
            nn.Linear(4, 4)
            torch.set_rng_state(saved)
    after = torch.rand(2)
    torch.manual_seed(0)
    nn.Linear(4, 4)
    assert torch.equal(after, torch.rand(2))


def test_an_explicit_generator_advances_as_eager() -> None:
    def make(gen: torch.Generator) -> nn.Module:
        layer = nn.Linear(50, 40)
        nn.init.normal_(layer.weight, generator=gen)
        nn.init.uniform_(layer.bias, generator=gen)
        return layer

    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    with tl.deferred():
        model = make(gen)
    after = gen.get_state()
    tl.materialize(model)
    gen_eager = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    eager = make(gen_eager)
    assert torch.equal(after, gen_eager.get_state())
    _same(model, eager)


def _draws_from_a_copy(copy_state: Callable[[], torch.Generator]) -> nn.Module:
    model = nn.Module()
    model.first = nn.Linear(4, 3)  # draws from the global generator: its state is now a stand-in
    model.w = nn.Parameter(torch.randn(6, generator=copy_state()))
    return model


def _explicit_then_global() -> torch.Generator:
    g = torch.Generator().manual_seed(5)
    torch.randn(3, generator=g)
    torch.set_rng_state(g.get_state())
    return torch.default_generator


@pytest.mark.parametrize(
    "copy_state",
    [
        lambda: torch.Generator().set_state(torch.get_rng_state()),
        lambda: torch.default_generator.clone_state(),
        lambda: copy.deepcopy(torch.default_generator),
        _explicit_then_global,
    ],
    ids=["set_state", "clone_state", "deepcopy", "explicit_into_global"],
)
def test_a_generator_given_a_state_copied_after_a_draw_in_the_block_is_refused(
    copy_state: Callable[[], torch.Generator],
) -> None:
    """Nothing is drawn in a block, so a generator's state there stands for a place in the recorded stream: another
    generator drawing from a copy of it drew other values than eager's, silently."""
    torch.manual_seed(0)
    with pytest.raises(tl.DeferredError, match="state was copied"):
        with tl.deferred():
            _draws_from_a_copy(copy_state)


@pytest.mark.parametrize("where", ["copied", "set back"])
def test_a_generator_state_read_in_one_block_and_drawn_from_in_a_later_one_is_refused(where: str) -> None:
    """A stand-in state carried out of its block: drawn from in the next block it gave other values than eager's,
    silently (the refusal knew only the current block's stand-ins)."""
    torch.manual_seed(0)
    with tl.deferred():
        nn.Linear(4, 3)
        saved = torch.get_rng_state()
        copied = torch.Generator().set_state(saved)
    with pytest.raises(tl.DeferredError, match="earlier block"):
        with tl.deferred():
            if where == "set back":
                torch.set_rng_state(saved)
                nn.Linear(4, 3)
            else:
                torch.randn(3, generator=copied)


def test_an_explicit_generator_is_left_as_eager_when_another_streams_draw_reads_its_values() -> None:
    """`x = randn(n, generator=g)` then `rand_like(x)` (the global generator, a draw the model runs): leaving the
    block worked out the global stream after putting `g` back, replaying `x` on the real `g` (found by review)."""

    def make(g: torch.Generator) -> nn.Module:
        model = nn.Module()
        x = torch.randn(40, generator=g)
        model.register_buffer("y", torch.normal(x, 1.0))
        model.register_buffer("z", torch.randn(21, generator=g))
        return model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(99)
    eager = make(g)
    eager_state = g.get_state()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(99)
    with tl.deferred():
        model = make(g)
    assert torch.equal(g.get_state(), eager_state)
    y_after = torch.rand_like(model.y)  # after the block: the global stream is worked out again
    assert torch.equal(g.get_state(), eager_state)
    tl.materialize(model)
    _same(model, eager)
    assert y_after.shape == eager.y.shape


def test_a_dead_draw_that_reads_its_own_target_replays_with_its_values() -> None:
    """A dead `t.bernoulli_(t)` (its probabilities are `t`) ran on a scratch buffer holding a former draw's values:
    torch refused them as probabilities at the block's end (found by review)."""

    def make() -> nn.Module:
        model = nn.Module()
        a = torch.empty(20, 50)
        a.t().normal_()  # an unmodelled draw on scratch: leaves normals there
        a.zero_()
        t = torch.rand(1000)
        t.bernoulli_(t)
        t.zero_()
        model.register_buffer("a", a)
        model.register_buffer("t", t)
        model.register_buffer("z", torch.randn(20))
        return model

    eager, model = eager_and_deferred(make)
    _same(model, eager)


class _CountDraws(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.elements: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in ("uniform_", "normal_"):
            self.elements[name] = self.elements.get(name, 0) + args[0].numel()
        return func(*args, **(kwargs or {}))


def test_dead_draws_are_jumped_not_generated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_record, "PARALLEL_MIN", 1 << 40)  # all inline, where a dispatch mode sees them
    monkeypatch.setenv("TORCHLAZY_NO_EXT", "1")  # torch's kernels, which the dispatch mode sees (not the compiled ones)
    torch.manual_seed(0)
    with tl.deferred():
        model = _hf_style()  # every kaiming_uniform_ / normal_ of reset_parameters is redrawn
    counter = _CountDraws()
    with counter:
        tl.materialize(model)
    live = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert counter.elements.get("uniform_", 0) < 1000  # only the biases' draws (live), no dead weight draw
    assert counter.elements["normal_"] == live  # the redrawn values, each once
    torch.manual_seed(0)
    _same(model, _hf_style())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_exact_whatever_the_number_of_threads(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_record, "PARALLEL_MIN", 16)  # split even small draws
    monkeypatch.setattr(_record, "SPLIT_MIN", 16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(5)
        with tl.deferred():
            model = nn.Sequential(nn.Linear(333, 77), nn.Embedding(1001, 33), nn.Linear(7, 5))
            nn.init.normal_(model[1].weight, 0.0, 0.5)
            nn.init.uniform_(model[0].weight, -1, 1)
        tl.materialize(model)
    finally:
        torch.set_num_threads(old)
    torch.manual_seed(5)
    eager = nn.Sequential(nn.Linear(333, 77), nn.Embedding(1001, 33), nn.Linear(7, 5))
    nn.init.normal_(eager[1].weight, 0.0, 0.5)
    nn.init.uniform_(eager[0].weight, -1, 1)
    _same(model, eager)


def test_pieces_cover_a_draw_at_its_alignment() -> None:
    draw = _record.Draw("normal_", _record.TRef(0, (1007,), (1,), 0, torch.float32), 1007, {}, 1023, 16)
    parts = _record.pieces(draw, 3)
    assert parts[0][0] == 0 and parts[-1][1] == 1007
    assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
    assert all(a % 16 == 0 and b - a >= 16 for a, b in parts)


@pytest.mark.parametrize("rows", [(0, 7), (7, 20), (13, 33), (32, 33), (0, 33)])
def test_a_shard_alone_is_the_eager_rows(rows: tuple[int, int]) -> None:
    """What an FSDP rank computes for its rows (no full tensor): exactly eager's rows."""
    from torchlazy import _deferred, _distributed

    def make() -> nn.Module:
        m = nn.Sequential(nn.Linear(31, 33), nn.Embedding(33, 17))
        nn.init.normal_(m[0].weight, std=0.02)
        m[1].weight.data.mul_(3.0)
        return m

    torch.manual_seed(4)
    with tl.deferred():
        model = make()
    torch.manual_seed(4)
    eager = make()
    for name in ("0.weight", "0.bias", "1.weight"):
        fake = model.get_parameter(name)
        found = _deferred.storage_of(fake)
        assert found is not None
        record, sid = found
        size = tuple(fake.shape)
        start, stop = rows if len(size) > 1 or rows[1] <= size[0] else (0, size[0])
        shard = _distributed.Shard(name, [], None, {}, record=record, ref=_record.TRef.of(sid, fake))
        shard.__dict__["slices"] = (slice(start, stop), *(slice(0, n) for n in size[1:]))
        local = _distributed._local_exact(record, shard)
        assert local is not None, name  # the slice alone, not a full tensor
        expected = eager.get_parameter(name).detach()[start:stop]
        assert torch.equal(local.view(torch.uint8), expected.contiguous().view(torch.uint8)), name


def test_a_program_around_a_deferred_model_runs_as_eagerly() -> None:
    """Real draws after the block, init after the block, more draws: every value and state as eager."""

    def program(defer: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        if defer:
            with tl.deferred():
                model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 3))
        else:
            model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 3))
        x = torch.randn(3)
        nn.init.normal_(model[0].weight, std=0.1)
        model.apply(lambda m: nn.init.zeros_(m.bias) if isinstance(m, nn.Linear) else None)
        y = torch.rand(2)
        if defer:
            tl.materialize(model)
        return model, x, y, torch.get_rng_state()

    ours, eager = program(True), program(False)
    _same(ours[0], eager[0])
    for a, b in zip(ours[1:], eager[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_seed_set_in_the_block_just_before_a_lazy_layer_steers_its_draws_as_in_eager(seed: int) -> None:
    # the seed was noted at the next draw, after the lazy layer's construction-order slot: its draws came from
    # the generator before the seed (every seed gave the same weights, none eager's), and so did the next layer's
    def make(lazy: bool) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(tl.nn.Linear(4) if lazy else nn.Linear(3, 4), nn.Linear(4, 4))

    torch.manual_seed(0)
    eager = make(lazy=False)
    after_eager = torch.get_rng_state()
    torch.manual_seed(0)
    with tl.deferred():
        model = make(lazy=True)
    tl.build(model, tl.Spec(2, 3))
    assert_models_identical(model, eager)
    assert torch.equal(torch.get_rng_state(), after_eager)


def test_materialize_neither_takes_from_nor_sets_back_another_threads_global_generator() -> None:
    # unmodelled draws (normal_ of fewer than 16 elements) ran on the process-wide generator, set to each draw's
    # state, and the state at entry was put back at the end: a thread drawing meanwhile (a loader thread) changed
    # the model's values and got values it had drawn already
    import threading

    class Many(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.ParameterList([nn.Parameter(torch.empty(8)) for _ in range(200)])
            for p in self.small:
                nn.init.normal_(p, std=0.02)
            # recorded as overloads without `generator=` (aten.randn.default, randperm.default): run through
            # their overloads that take one
            self.tokens = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(100)])
            self.register_buffer("order", torch.randperm(10))
            self.linear = nn.Linear(64, 64)

    torch.manual_seed(0)
    eager = Many()
    torch.manual_seed(0)
    with tl.deferred():
        model = Many()
    start = torch.get_rng_state()
    stop, seen = threading.Event(), []

    def loader() -> None:
        while not stop.is_set():
            seen.append(torch.rand(4))

    thread = threading.Thread(target=loader)
    thread.start()
    try:
        tl.materialize(model)
    finally:
        stop.set()
        thread.join()
    assert_models_identical(model, eager)
    torch.set_rng_state(start)
    assert all(torch.equal(drawn, torch.rand(4)) for drawn in seen)  # the loader's stream, unbroken


def test_a_draw_made_during_materialize_right_after_the_block_is_not_handed_out_again() -> None:
    # with nothing drawn between the block and materialize, the move past (no) late draws made a new state
    # tensor, taken for a move: the generator was set back, and a draw another thread made meanwhile repeated
    import threading

    torch.manual_seed(0)
    with tl.deferred():
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    seen: list[torch.Tensor] = []

    def progress(*_: object) -> None:  # runs inside materialize: another thread draws there, deterministically
        if not seen:
            thread = threading.Thread(target=lambda: seen.append(torch.rand(4)))
            thread.start()
            thread.join()

    tl.materialize(model, progress=progress)
    assert seen and not torch.equal(torch.rand(4), seen[0])


@pytest.mark.parametrize(
    "draw",
    [
        lambda g: torch.poisson(torch.ones(9) * 3, generator=g),
        lambda g: torch.binomial(torch.ones(9) * 5, torch.ones(9) * 0.5, generator=g),
        # the global generator passed by name reaches the recorder as another Python object: it made a stream of
        # its own, and its draws differed from eager's
        lambda g: torch.poisson(torch.ones(9) * 3, generator=torch.default_generator),
        lambda g: torch.empty(40).normal_(generator=torch.default_generator),
    ],
    ids=["poisson", "binomial", "poisson_global_generator", "normal_global_generator"],
)
def test_draws_whose_schema_takes_the_generator_positionally_replay_exactly(draw: Callable[[Any], Any]) -> None:
    # the replay generator was added by name to a call that already passed one in its positional slot: "expected
    # at most 2 argument(s) but received 3"
    def make() -> nn.Module:
        layer = nn.Linear(4, 4)
        layer.register_buffer("counts", draw(torch.Generator().manual_seed(5)))
        layer.register_buffer("more", draw(None))
        return layer

    torch.manual_seed(0)
    eager = make()
    after = torch.get_rng_state()
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    tl.materialize(model)
    assert_models_identical(model, eager)
    assert torch.equal(torch.get_rng_state(), after)
