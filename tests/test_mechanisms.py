"""Pin the mechanisms behind exactness, so that breaking one of them fails a test, not just slows things down.

- dead-write elimination in replay: a weight redrawn after `reset_parameters` replays only its last writer;
- ties on every path that swaps real tensors into the model (in place, and by replacing references when
  something holds a weak reference to the deferred tensor);
- draw order, from several angles: sub-modules in every order, RNG use in between, two models in one block,
  draws interleaved with buffers and lazy layers.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from collections.abc import Callable

import pytest
import torch
from alloc import CountAllocations, state_bytes
from exact import assert_models_identical
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import torchlazy as tl
from torchlazy import _deferred, _record


class WritesInto(TorchDispatchMode):
    """(op, storage address) of every op run on a real tensor as its first argument."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and not isinstance(first, FakeTensor) and first.device.type != "meta":
            self.ops.append((func.__name__.split(".")[0], first.untyped_storage().data_ptr()))
        return func(*args, **(kwargs or {}))

    def into(self, t: torch.Tensor, names: set[str]) -> list[str]:
        """The ops among `names` that ran on `t`'s final memory, in order."""
        ptr = t.untyped_storage().data_ptr()
        return [name for name, p in self.ops if p == ptr and name in names]


class Redrawn(nn.Module):
    """`b.weight`: reset_parameters draws it (uniform_), then a copy of `a.weight`, then a redraw: two dead writes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight * 2)
        nn.init.normal_(self.b.weight, std=0.02)


def deferred(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with tl.deferred():
        return make()


def eager(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make()


# -- dead-write elimination ---------------------------------------------------------------------------


def _replayed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...]]]:
    """(op name, storages written) of every node replay runs, in order."""
    ran: list[tuple[str, tuple[int, ...]]] = []
    original = _record.Record._run

    def spy(self: _record.Record, node: _record.Node, *args: object, **kwargs: object) -> None:
        ran.append((node.name, node.writes))
        original(self, node, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_record.Record, "_run", spy)
    return ran


@pytest.mark.parametrize("exact", [True, False])
def test_replay_runs_only_the_last_full_overwrite(exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = deferred(Redrawn)
    found = _deferred.storage_of(model.b.weight)
    assert found is not None
    sid = found[1]
    ran = _replayed(monkeypatch)
    tl.materialize(model, exact=exact)
    into_b = [name for name, writes in ran if sid in writes]
    assert into_b == ["aten.normal_.default"], into_b  # neither the dead uniform_ nor the dead copy_ ran
    if exact:
        assert_models_identical(model, eager(Redrawn))


def test_exact_replay_of_a_redrawn_weight_needs_nothing_its_dead_writes_read() -> None:
    model = deferred(Redrawn)
    with CountAllocations() as allocations:
        tl.materialize(model.b)  # b.weight's dead copy of `a.weight * 2` would need a.weight and a temporary
    # b's two tensors and nothing else: a.weight's draw, which the generator must move past, is jumped over
    assert allocations.nbytes == state_bytes(model.b), allocations.storages
    assert tl.is_deferred(model.a)
    with WritesInto() as seen:
        tl.materialize(model)
    assert seen.ops  # the counter sees replay
    assert_models_identical(model, eager(Redrawn))


# -- ties on every swap path --------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.blocks[1].weight = self.blocks[0].weight  # a second tie, deeper in the tree


def test_ties_survive_the_in_place_swap_and_keep_the_objects() -> None:
    model = deferred(Tied)
    held = model.emb.weight, model.blocks[0].weight  # strong references only: swapped in place
    tl.materialize(model)
    assert model.emb.weight is held[0] and model.head.weight is held[0]
    assert model.blocks[0].weight is held[1] and model.blocks[1].weight is held[1]
    assert not isinstance(held[0], FakeTensor) and tl.deferred_tensors(model) == []
    assert_models_identical(model, eager(Tied))


@pytest.mark.parametrize("which", ["emb", "blocks"])
def test_ties_survive_when_a_weak_reference_forces_replacement(which: str) -> None:
    model = deferred(Tied)
    fake = model.emb.weight if which == "emb" else model.blocks[0].weight
    ref = weakref.ref(fake)  # swap_tensors cannot swap a tensor with weak references: references are replaced
    del fake
    tl.materialize(model)
    assert model.head.weight is model.emb.weight
    assert model.blocks[1].weight is model.blocks[0].weight
    assert type(model.emb.weight) is nn.Parameter and type(model.blocks[0].weight) is nn.Parameter
    assert tl.deferred_tensors(model) == []
    assert_models_identical(model, eager(Tied))
    gc.collect()
    assert ref() is None or not any(ref() is t for t in model.parameters())  # the fake is held nowhere


def test_a_tied_parameter_kept_in_a_plain_list_is_replaced_too() -> None:
    class Listed(Tied):
        def __init__(self) -> None:
            super().__init__()
            self.extra = [self.emb.weight]  # a plain Python list holding a parameter

    model = deferred(Listed)
    ref = weakref.ref(model.emb.weight)
    tl.materialize(model)
    assert model.extra[0] is model.emb.weight is model.head.weight
    assert ref is not None and tl.deferred_tensors(model) == []


# -- draw order ---------------------------------------------------------------------------------------


def stack() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4), nn.Embedding(5, 4))


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=str)
def test_sub_modules_in_every_order_with_draws_in_between_are_exact(order: tuple[int, ...]) -> None:
    model = deferred(stack)
    for i in order:
        torch.randn(int(17 + i))  # the global generator moves between sub-modules
        tl.materialize(model[i])
    assert_models_identical(model, eager(stack))


def test_two_models_in_one_block_match_eager_built_one_after_the_other() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        first = stack()
        second = stack()
    tl.materialize(second[2])  # second model, partly, first
    torch.rand(5)
    tl.materialize(first)
    tl.materialize(second)
    torch.manual_seed(0)
    eager_first, eager_second = stack(), stack()
    assert_models_identical(first, eager_first)
    assert_models_identical(second, eager_second)
    with pytest.raises(AssertionError):
        assert_models_identical(first, second)  # the second drew after the first


class Interleaved(nn.Module):
    """Random data drawn into buffers and attributes between layers, lazy layers in between."""

    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.register_buffer("noise", torch.randn(5))
        self.b = tl.nn.Linear(4) if lazy else nn.Linear(5, 4)
        self.perm = torch.randperm(7)
        self.c = nn.Linear(4, 3)
        self.register_buffer("mask", torch.rand(3) > 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x) + self.noise))


def test_draws_interleaved_with_buffers_and_lazy_layers_keep_construction_order() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        model = Interleaved(lazy=True)
    torch.randn(3)
    tl.materialize(model.a)  # before the lazy layer in construction order: may come first
    torch.randn(3)
    tl.build(model, tl.Spec(2, 6))
    assert_models_identical(model, eager(lambda: Interleaved(lazy=False)))
