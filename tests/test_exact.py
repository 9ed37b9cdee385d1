"""The comparison helper fails loudly on every kind of difference `torch.equal` or a state dict would miss."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from exact import assert_models_identical, assert_same_tensors, eager_and_deferred
from torch import nn

import torchlazy as tl


def test_identical_tensors_and_nans_with_the_same_bits_pass() -> None:
    a = torch.tensor([1.0, float("nan"), -0.0])
    assert_same_tensors(a, a.clone())  # torch.equal says False here (NaN != NaN)
    assert not torch.equal(a, a.clone())
    assert_same_tensors(torch.zeros(0, 3), torch.zeros(0, 3))
    assert_same_tensors(torch.tensor(3), torch.tensor(3))


TENSOR_DIFFERENCES: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], str]] = {
    # name: (first, second, what the message must say); torch.equal is True for the first two
    "float32-vs-bfloat16": (lambda: torch.ones(3), lambda: torch.ones(3, dtype=torch.bfloat16), "dtype"),
    "minus-zero": (lambda: torch.tensor([0.0, 1.0]), lambda: torch.tensor([-0.0, 1.0]), "flat index 0"),
    "nan-payload": (
        lambda: torch.tensor([0x7FC00000], dtype=torch.int32).view(torch.float32),
        lambda: torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32),
        "values differ",
    ),
    "one-ulp": (lambda: torch.tensor([1.0]), lambda: torch.tensor([1.0]).nextafter(torch.tensor(2.0)), "values"),
    "shape": (lambda: torch.zeros(2, 3), lambda: torch.zeros(3, 2), "shape"),
    "device": (lambda: torch.zeros(2), lambda: torch.zeros(2, device="meta"), "device"),
    "strides": (lambda: torch.zeros(2, 3), lambda: torch.zeros(3, 2).t(), "strides"),
    "requires-grad": (lambda: torch.zeros(2), lambda: torch.zeros(2).requires_grad_(), "requires_grad"),
    "parameter-vs-tensor": (lambda: nn.Parameter(torch.zeros(2)), lambda: torch.zeros(2).requires_grad_(), "type"),
    "int64-vs-int32": (lambda: torch.arange(3), lambda: torch.arange(3, dtype=torch.int32), "dtype"),
}


@pytest.mark.parametrize("kind", TENSOR_DIFFERENCES)
def test_each_kind_of_tensor_difference_is_caught(kind: str) -> None:
    first, second, says = TENSOR_DIFFERENCES[kind]
    with pytest.raises(AssertionError, match=says):
        assert_same_tensors(first(), second(), "w")
    with pytest.raises(AssertionError, match="`w`"):
        assert_same_tensors({"w": first()}, {"w": second()})


def test_torch_equal_is_too_loose_for_the_first_two() -> None:
    assert torch.equal(torch.ones(3), torch.ones(3, dtype=torch.bfloat16))
    assert torch.equal(torch.tensor([0.0]), torch.tensor([-0.0]))


def test_mappings_with_other_keys_are_caught() -> None:
    with pytest.raises(AssertionError, match=r"only in the first \['b'\]"):
        assert_same_tensors({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)})
    with pytest.raises(AssertionError, match="another order"):
        assert_same_tensors({"a": torch.zeros(1), "b": torch.zeros(1)}, {"b": torch.zeros(1), "a": torch.zeros(1)})


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("stats", torch.zeros(3))
        self.register_buffer("inv_freq", torch.arange(3.0), persistent=False)
        self.mask = torch.ones(2, 2).bool()


MODEL_CHANGES: dict[str, tuple[Callable[[Holder], None], str]] = {
    "parameter-bit": (
        lambda m: m.emb.weight.data.view(-1)[5].copy_(m.emb.weight.data.view(-1)[5].nextafter(torch.tensor(9.0))),
        "`emb.weight`",
    ),
    "persistent-buffer": (lambda m: m.stats.fill_(-0.0), "`stats`"),
    "non-persistent-buffer": (lambda m: m.inv_freq.add_(1), "`inv_freq`"),
    "non-persistent-buffer-dtype": (lambda m: setattr(m, "inv_freq", m.inv_freq.double()), "`inv_freq`: dtype"),
    "plain-attribute": (lambda m: m.mask.fill_(False), "`mask`"),
    "extra-buffer": (lambda m: m.register_buffer("extra", torch.zeros(1), persistent=False), "extra"),
    "missing-buffer": (lambda m: delattr(m, "inv_freq"), "inv_freq"),
    "tie-broken": (lambda m: setattr(m.head, "weight", nn.Parameter(m.emb.weight.detach().clone())), "ties differ"),
    "requires-grad": (lambda m: m.emb.weight.requires_grad_(False), "requires_grad"),
    "parameter-made-buffer": (
        lambda m: (delattr(m.head, "weight"), m.head.register_buffer("weight", m.emb.weight.detach())),
        "head.weight",
    ),
}


@pytest.mark.parametrize("change", MODEL_CHANGES)
def test_each_kind_of_model_difference_is_caught(change: str) -> None:
    torch.manual_seed(0)
    model = Holder()
    twin = copy.deepcopy(model)
    assert_models_identical(model, twin)
    alter, says = MODEL_CHANGES[change]
    with torch.no_grad():
        alter(twin)
    with pytest.raises(AssertionError, match=says):
        assert_models_identical(model, twin)


def _built_under_float64() -> nn.Module:
    """A factory that sets the default dtype for its own tensors and restores it (Dinov2 built under float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Module()
        model.p = nn.Parameter(torch.randn(20))  # a random factory without `dtype=`: 2 words per element
        model.q = nn.Parameter(torch.arange(4) * 0.5)  # an integer tensor times a float: the default dtype
        model.register_buffer("b", torch.ones(3) * 2)
    finally:
        torch.set_default_dtype(previous)
    model.r = nn.Parameter(torch.rand(5))  # float32 again
    return model


def test_default_dtype_set_inside_the_block_or_before_materialize() -> None:
    """Tensors made without `dtype=` follow the default dtype of when they were made, not of materialize: a
    factory setting float64 inside the block read float32 bytes back as float64 (garbage), and placed the
    generator as for float32 draws."""
    torch.manual_seed(0)
    eager = _built_under_float64()
    eager_after = torch.rand(3)
    torch.manual_seed(0)
    with tl.deferred():
        model = _built_under_float64()
    after = torch.rand(3)
    torch.set_default_dtype(torch.float64)  # another default when materializing: no effect either
    try:
        tl.materialize(model)
    finally:
        torch.set_default_dtype(torch.float32)
    assert_models_identical(model, eager)
    assert_same_tensors(after, eager_after, "draw after the block")


def test_legacy_weight_norm() -> None:
    """`nn.utils.weight_norm` (the legacy one) keeps `weight`, computed from `weight_g` and `weight_v` with autograd,
    as a plain attribute: its graph held the parameters, and materialize failed (torch refused to swap them)."""
    import warnings

    def make() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
            return nn.utils.weight_norm(nn.Linear(4, 3))

    eager, model = eager_and_deferred(make)
    assert_models_identical(model, eager)
    x = torch.randn(2, 4)
    assert_same_tensors(model(x), eager(x), "forward")


def _draws_from_a_drawn_input() -> nn.Module:
    model = nn.Module()
    p = torch.rand(5)
    for i in range(3):  # tensor-p bernoulli: a kernel the generator model runs for real
        model.register_buffer(f"b{i}", torch.bernoulli(p))
    model.register_buffer("m", torch.multinomial(p, 2))
    model.register_buffer("after", torch.randn(4))
    return model


def test_unmodelled_draws_whose_input_is_drawn() -> None:
    """Unmodelled draws are run on scratch memory to move the generator past them; their random input was made
    after the generator had been set for them, so from the second on they drew from the wrong state (the state
    after the block wrong from two such draws, the values from three)."""
    eager, model = eager_and_deferred(_draws_from_a_drawn_input)
    assert_models_identical(model, eager)


def _draws_from(g: torch.Generator) -> nn.Module:
    model = nn.Module()
    model.register_buffer("a", torch.randn(16, generator=g))
    model.register_buffer("b", torch.empty(1).uniform_(generator=g))
    model.register_buffer("c", torch.randn(1, generator=g))
    model.register_buffer("d", torch.empty(4, 4).normal_(generator=g))
    model.register_buffer("e", torch.empty(40).exponential_(2.0, generator=g))
    model.register_buffer("f", torch.empty(40).cauchy_(generator=g))
    model.register_buffer("h", torch.empty(40).geometric_(0.3, generator=g))
    model.register_buffer("i", torch.empty(40).log_normal_(generator=g))
    model.t = nn.Parameter(nn.init.trunc_normal_(torch.empty(300, 300), a=-0.1, b=0.1, generator=g))  # rejects
    return model


def test_an_explicit_generator_ends_where_eager_leaves_it_and_materialize_never_moves_it() -> None:
    """Draws from a `torch.Generator` object: `exponential_`, `cauchy_`, `geometric_`, `log_normal_` with it raised
    in the block (their fake kernels refuse a generator); a `trunc_normal_` that reads its values (rejection)
    replayed the earlier draws on the object and left it moved (its own values and the object's state then wrong);
    materialize moved it (the program's next draws from it one word off)."""
    g = torch.Generator().manual_seed(4321)
    eager = _draws_from(g)
    eager_state = g.get_state()
    g = torch.Generator().manual_seed(4321)
    with tl.deferred():
        model = _draws_from(g)
    assert_same_tensors(g.get_state(), eager_state, "the generator after the block")
    tl.materialize(model)
    assert_same_tensors(g.get_state(), eager_state, "the generator after materialize")
    assert_models_identical(model, eager)


def _thread_sensitive() -> nn.Module:
    model = nn.Module()
    w = torch.randn(4_000_003)
    model.w = nn.Parameter(w / w.sum())  # a large reduction: its bits depend on the thread count
    model.q = nn.Parameter(torch.empty(64, 64))
    nn.init.orthogonal_(model.q)  # a QR: so do these
    return model


def test_recorded_compute_replays_on_the_blocks_thread_count() -> None:
    """Materialize on another thread count than the block's: recorded reductions and linear algebra gave other
    bits than eager construction (on the block's count); draws never depended on it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.manual_seed(0)
        eager = _thread_sensitive()
        torch.manual_seed(0)
        with tl.deferred():
            model = _thread_sensitive()
        torch.set_num_threads(1)
        tl.materialize(model)
        assert torch.get_num_threads() == 1  # the caller's count, as it was
    finally:
        torch.set_num_threads(before)
    assert_models_identical(model, eager)


class _Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


class _Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s[:, None]


def _stacked() -> nn.Module:
    from torch.nn.utils import parametrizations, parametrize

    first = nn.Linear(4, 6)
    parametrizations.weight_norm(first)
    parametrizations.spectral_norm(first)
    second = nn.Linear(4, 4)
    parametrize.register_parametrization(second, "weight", _Symmetric())
    parametrize.register_parametrization(second, "weight", _Scale(4))  # with a parameter of its own
    return nn.Sequential(first, second)


def test_stacked_parametrizations() -> None:
    """A parametrization registered on top of another is run by `register_parametrization` itself (not through
    the list's forward): the guard against running deferred modules refused it during construction."""
    eager, model = eager_and_deferred(_stacked)
    assert_models_identical(model, eager)
