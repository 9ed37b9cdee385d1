"""Deferred construction and exact materialization: bit-for-bit eager, whatever happens in between."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import torch
from alloc import CountAllocations, state_bytes
from exact import assert_models_identical, assert_same_tensors, raw_bytes
from torch import nn

import torchlazy as tl
from torchlazy import _torch_compat as tc


def deferred_then_materialize(make: Callable[[], nn.Module], **kwargs) -> nn.Module:
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    torch.randn(1000)  # RNG use between construction and materialization
    torch.rand(3, generator=None)
    return tl.materialize(model, **kwargs)


def eager(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make()


def assert_exact(make: Callable[[], nn.Module]) -> nn.Module:
    model = deferred_then_materialize(make)
    assert_models_identical(model, eager(make))
    assert tl.deferred_tensors(model) == []
    return model


TORCH_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "Linear": lambda: nn.Linear(37, 19),
    "Bilinear": lambda: nn.Bilinear(5, 6, 7),
    "Conv1d": lambda: nn.Conv1d(3, 8, 5),
    "Conv2d": lambda: nn.Conv2d(3, 8, 3, groups=1, bias=False),
    "Conv3d": lambda: nn.Conv3d(2, 4, 3),
    "ConvTranspose2d": lambda: nn.ConvTranspose2d(4, 6, 3),
    "Embedding-padding": lambda: nn.Embedding(50, 17, padding_idx=3),
    "EmbeddingBag": lambda: nn.EmbeddingBag(30, 8, mode="sum"),
    "BatchNorm2d": lambda: nn.BatchNorm2d(7),
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(5, affine=True, track_running_stats=True),
    "LayerNorm": lambda: nn.LayerNorm((4, 6)),
    "RMSNorm": lambda: nn.RMSNorm(9),
    "GroupNorm": lambda: nn.GroupNorm(2, 8),
    "PReLU": lambda: nn.PReLU(5),
    "RNN": lambda: nn.RNN(6, 10, num_layers=2),
    "LSTM": lambda: nn.LSTM(6, 10, bidirectional=True, proj_size=3),
    "GRU": lambda: nn.GRU(4, 5, batch_first=True),
    "LSTMCell": lambda: nn.LSTMCell(4, 7),
    "MultiheadAttention": lambda: nn.MultiheadAttention(16, 4, kdim=5, vdim=7, add_bias_kv=True),
    "TransformerEncoderLayer": lambda: nn.TransformerEncoderLayer(16, 4, 32),
    "Transformer": lambda: nn.Transformer(16, 2, 2, 2, 32),
    "AdaptiveLogSoftmaxWithLoss": lambda: nn.AdaptiveLogSoftmaxWithLoss(16, 20, [5, 10]),
}


@pytest.mark.parametrize("name", TORCH_LAYERS)
def test_torch_layers_are_exact(name: str) -> None:
    assert_exact(TORCH_LAYERS[name])


class Rotary(nn.Module):
    """Buffers computed in __init__, parameters made from tensors, ties, custom init, slices."""

    def __init__(self) -> None:
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
        self.register_buffer("inv_freq", inv, persistent=False)
        t = torch.arange(32).float()
        self.register_buffer("cos", torch.outer(t, inv).cos())
        self.scale = nn.Parameter(torch.randn(16) * 0.02)
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight
        self.mask = torch.triu(torch.ones(8, 8), diagonal=1).bool()  # plain tensor attribute
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.apply(self._init_weights)
        with torch.no_grad():
            self.blocks[0].weight[:, :4].zero_()  # init on a slice
            self.blocks[1].weight.mul_(1 / math.sqrt(3))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.5)
            m.weight.data[m.padding_idx].zero_()


def test_custom_schemes_buffers_ties_and_slices_are_exact() -> None:
    model = assert_exact(Rotary)
    assert model.head.weight is model.emb.weight
    assert model.mask.dtype == torch.bool  # the plain attribute and the non-persistent buffer were compared above


INITS: dict[str, Callable[[torch.Tensor], object]] = {
    "uniform": lambda w: nn.init.uniform_(w, -2, 3),
    "normal": nn.init.normal_,
    "trunc_normal": lambda w: nn.init.trunc_normal_(w, std=1.0, a=-0.5, b=0.5),
    "trunc_normal_wide": lambda w: nn.init.trunc_normal_(w, std=0.02),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_out"),
    "orthogonal": nn.init.orthogonal_,
    "sparse": lambda w: nn.init.sparse_(w, 0.3),
    "eye": nn.init.eye_,
    "constant": lambda w: nn.init.constant_(w, 0.3),
    "bernoulli": lambda w: w.bernoulli_(0.3),
    "randperm": lambda w: w.copy_(torch.randperm(w.numel()).view_as(w).float()),
}


@pytest.mark.parametrize("init", INITS)
def test_every_init_function_is_exact(init: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.empty(33, 17))
            self.b = nn.Parameter(torch.empty(5, 3))  # small: other kernel paths
            with torch.no_grad():
                INITS[init](self.a)
                INITS[init](self.b)

    assert_exact(Net)


def test_lazy_layers_keep_their_construction_order_place() -> None:
    def make_lazy() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), tl.nn.Linear(16), nn.ReLU(), tl.nn.LayerNorm(), nn.Linear(16, 3))

    def make_eager() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3))

    torch.manual_seed(0)
    with tl.deferred():
        model = make_lazy()
    torch.randn(10)
    tl.build(model, tl.Spec(2, 4))
    assert_models_identical(model, eager(make_eager))


def test_materialize_sub_modules_in_any_order_is_exact() -> None:
    make = lambda: nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))  # noqa: E731
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    for i in (3, 1, 0, 2):
        tl.materialize(model[i])
        assert tl.is_deferred(model) == (i != 2)
    assert_models_identical(model, eager(make))


def test_global_rng_untouched_by_materialize_and_advanced_by_deferred() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        a = nn.Linear(10, 10)
    after_block = torch.random.get_rng_state()
    with tl.deferred():
        b = nn.Linear(10, 10)
    state = torch.random.get_rng_state()
    tl.materialize(a)
    tl.materialize(b)
    assert_same_tensors(state, torch.random.get_rng_state(), "generator state")
    assert raw_bytes(a.weight) != raw_bytes(b.weight)  # two blocks: two different models
    torch.manual_seed(0)
    assert raw_bytes(after_block) != raw_bytes(torch.random.get_rng_state())


def test_dtype_and_device_per_tensor() -> None:
    model = deferred_then_materialize(lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), dtype=torch.bfloat16)
    reference = eager(lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))).to(torch.bfloat16)
    assert_models_identical(model, reference)
    assert model[1].num_batches_tracked.dtype == torch.long


def test_not_exact_is_reproducible_with_same_distributions() -> None:
    make = lambda: nn.Linear(256, 256)  # noqa: E731
    one = deferred_then_materialize(make, exact=False)
    two = deferred_then_materialize(make, exact=False)
    ref = eager(make)
    assert_models_identical(one, two)
    assert raw_bytes(one.weight) != raw_bytes(ref.weight)
    bound = 1 / math.sqrt(256)
    assert one.weight.abs().max() <= bound and abs(one.weight.std().item() - ref.weight.std().item()) < 2e-3


def test_nothing_allocated_and_forward_before_materialize_is_a_clear_error() -> None:
    with CountAllocations() as allocations:
        with tl.deferred():
            model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert allocations.storages == []
    with CountAllocations() as allocations:
        tl.materialize(model)
    assert allocations.nbytes == state_bytes(model) == (16 + 4 + 8 + 2) * 4  # once each, nothing else
    with tl.deferred():
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert all(p.untyped_storage().device.type == "meta" for p in model.parameters())
    assert tl.is_deferred(model) and tl.deferred_tensors(model) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(tl.DeferredError, match=r"`0` \(Linear\).*tl.materialize"):
        model(torch.randn(1, 4))
    tl.materialize(model)
    assert model(torch.randn(1, 4)).shape == (1, 2)


class ReadsValue(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        if how == "item":
            self.scale = self.w.sum().item()
        elif how == "nonzero":
            self.idx = self.w.nonzero()
        elif how == "numpy":
            self.w.detach().numpy()
        elif how == "print":
            print(self.w)
        elif how == "tolist":
            self.w.tolist()


@pytest.mark.parametrize("how", ["item", "nonzero", "numpy", "print", "tolist"])
def test_reading_values_during_construction_is_a_deferred_error(how: str) -> None:
    with pytest.raises(tl.DeferredError, match="ReadsValue") as info:
        with tl.deferred():
            ReadsValue(how)
    assert "tl.deferred" in str(info.value)


def test_numpy_after_the_block_is_a_deferred_error() -> None:
    """After the block torch said only ".numpy() is not supported for tensor subclasses"."""
    with tl.deferred():
        model = nn.Linear(3, 2)
    with pytest.raises(tl.DeferredError, match=r"`\.numpy\(\)` on `Linear\.weight`.*tl\.materialize"):
        model.weight.detach().numpy()


def test_concretize_computes_values_exactly() -> None:
    torch.manual_seed(0)
    with tl.deferred(concretize=True):
        model = ReadsValue("item")
    tl.materialize(model)
    reference = eager(lambda: ReadsValue("item"))
    assert_models_identical(model, reference)
    assert math.copysign(1, model.scale) == math.copysign(1, reference.scale) and model.scale == reference.scale


def test_failed_materialize_leaves_model_deferred_and_retryable() -> None:
    with tl.deferred():
        model = nn.Linear(4, 4)
    with pytest.raises(tl.ArgumentError):
        tl.materialize(model, device="cuda:7" if not torch.cuda.is_available() else "not-a-device")
    assert tl.is_deferred(model)
    tl.materialize(model)
    assert not tl.is_deferred(model)


def test_deferred_nests_and_is_per_thread() -> None:
    seen: dict[str, bool] = {}

    def other() -> None:
        seen["thread"] = tl.is_deferred(nn.Linear(2, 2))

    with tl.deferred():
        outer = nn.Linear(2, 2)
        with tl.deferred():
            inner = nn.Linear(2, 2)
        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
    assert tl.is_deferred(outer) and tl.is_deferred(inner) and seen == {"thread": False}
    model = nn.Sequential(outer, inner)
    tl.materialize(model)
    torch.manual_seed(1234)
    assert_models_identical(model, nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_progress_reports_tensors_and_bytes() -> None:
    calls = []
    with tl.deferred():
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tl.materialize(model, progress=lambda *a: calls.append(a))
    assert calls[-1] == (4, 4, 2 * (64 + 8) * 4, 2 * (64 + 8) * 4)


def test_attributes_on_parameters_survive() -> None:
    class Marked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.lin.weight._is_hf_initialized = True

    with tl.deferred():
        model = Marked()
    weight = model.lin.weight
    tl.materialize(model)
    assert model.lin.weight._is_hf_initialized is True
    assert model.lin.weight is weight  # the same Python object, now real


def test_materialize_in_parallel_threads_is_exact() -> None:
    make = lambda: nn.Sequential(*(nn.Linear(64, 64) for _ in range(6)))  # noqa: E731
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        with tl.deferred():
            models.append(make())
    workers = [threading.Thread(target=tl.materialize, args=(m,)) for m in models]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for seed, model in enumerate(models):
        torch.manual_seed(seed)
        assert_models_identical(model, make())


def test_work_on_a_deferred_model_after_the_block_is_recorded_too() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        model = nn.Linear(4, 4)
    model.weight = nn.Parameter(model.weight.half())  # outside the block: still recorded
    tl.materialize(model)
    torch.manual_seed(0)
    eager = nn.Linear(4, 4)
    eager.weight = nn.Parameter(eager.weight.half())
    assert_models_identical(model, eager)


def test_sharding_ops_after_the_block_are_recorded_exactly() -> None:
    """What `fully_shard` does to each parameter (chunks, a zero-padded copy, views), then a write into
    the copy: recorded through the dispatch shortcut as through the fake mode, materialized as eager."""

    def shard(module: nn.Linear) -> None:
        with torch.no_grad():
            second = torch.chunk(module.weight, 2, dim=0)[1]
            padded = module.weight.new_zeros(torch.chunk(module.weight, 2, dim=0)[0].shape)
            padded.narrow(0, 0, second.size(0)).copy_(second)
            padded.view(-1)[-4:].mul_(2.0)
        module.padded = nn.Parameter(padded.detach())

    torch.manual_seed(0)
    with tl.deferred():
        model = nn.Linear(4, 5)
    shard(model)
    tl.materialize(model)
    torch.manual_seed(0)
    eager = nn.Linear(4, 5)
    shard(eager)
    assert_models_identical(model, eager)


def test_tensors_made_from_a_tensor_are_exact() -> None:
    class Made(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.register_buffer("ones", self.w.new_ones(2, 3, dtype=torch.float64))
            self.register_buffer("full", self.w.new_full((5,), 7.0))
            self.register_buffer("zeros", self.w.new_zeros(4).add_(self.w[0]))
            self.register_buffer("empty", self.w.new_empty(6).uniform_())
            self.register_buffer("strided", self.w.new_empty_strided((2, 3), (1, 2)).normal_())

    model = assert_exact(Made)
    assert model.ones.dtype == torch.float64 and model.strided.stride() == (1, 2)


def test_other_fake_tensors_keep_torchs_own_dispatch() -> None:
    with tl.deferred():
        nn.Linear(2, 2)  # the dispatch shortcut is installed
    with tc.fake_tensor_mode() as mode:
        t = torch.empty(6, 4)
    parts = torch.chunk(t, 2)  # outside the mode: the fake tensor's own dispatch
    padded = t.new_zeros(3, 4)
    padded.copy_(parts[1])
    made = [*parts, padded, padded.view(-1), padded.detach()]
    assert all(tc.is_fake(x) and tc.fake_mode_of(x) is mode for x in made)
    assert [tuple(x.shape) for x in made] == [(3, 4), (3, 4), (3, 4), (12,), (3, 4)]


def test_cloned_layers_keep_their_own_origin_for_wrappers() -> None:
    with tl.deferred():
        layer = nn.TransformerEncoderLayer(8, 2, 16)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)  # deep copies
    for block in encoder.layers:
        origin = block.linear1.__dict__["_torchlazy_origin"]
        assert origin["weight"] is block.linear1.weight  # what FSDP's replacement will be traced to
    tl.materialize(encoder)
    assert "_torchlazy_origin" not in encoder.layers[0].linear1.__dict__  # nothing of torchlazy left


def test_values_of_constant_computations_are_read_for_real() -> None:
    class DropPath(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rates = [x.item() for x in torch.linspace(0, 0.3, 4)]  # timm/HF style
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in self.rates)

    assert_exact(DropPath)
    torch.manual_seed(0)
    with tl.deferred():
        model = DropPath()
    assert model.rates == [x.item() for x in torch.linspace(0, 0.3, 4)]  # the very floats eager code reads


def test_pytorch_lazy_modules_under_deferred_point_to_tl_nn() -> None:
    with pytest.raises(tl.DeferredError, match=r"tl.nn.Linear"):
        with tl.deferred():
            nn.LazyLinear(4)


def _regnet_widths() -> list[int]:
    """Stage widths the way RegNet constructors compute them: tensor arithmetic, then `.tolist()`."""
    w_0, w_a, m, d = 24, 36.0, 2.5, 13
    ws_cont = torch.arange(d) * w_a + w_0
    block_capacity = torch.round(torch.log(ws_cont / w_0) / math.log(m))
    return (torch.round(torch.divide(w_0 * torch.pow(m, block_capacity), 8)) * 8).int().tolist()  # type: ignore[no-any-return]


DRAW_FREE_VALUES: dict[str, Callable[[], object]] = {
    "regnet widths": _regnet_widths,
    "item of a linspace": lambda: torch.linspace(0, 0.1, 5)[2].item(),
    "drop-path rates": lambda: [x.item() for x in torch.linspace(0, 0.1, 4)],
    "int": lambda: int(torch.tensor(7) * 2),
    "float": lambda: float(torch.arange(4).sum()),
    "bool of any": lambda: bool((torch.arange(3) > 1).any()),
    "comparison": lambda: bool(torch.tensor(3) > 2),
    "nonzero then tolist": lambda: torch.nonzero(torch.arange(5) % 2).flatten().tolist(),
    "boolean mask": lambda: torch.arange(6)[torch.arange(6) > 3].tolist(),
    "from a list": lambda: torch.tensor([1.0, 2.0]).tolist(),
    "nested tolist": lambda: torch.arange(6).view(2, 3).t().tolist(),
    "tolist of a 0-dim": lambda: torch.arange(4).sum().tolist(),
    "tolist of bools": lambda: (torch.arange(4) > 1).tolist(),
    "tolist after an in-place op": lambda: torch.linspace(0, 1, 3).mul_(2).tolist(),
}


def test_tolist_computes_a_draw_free_tensor_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tolist()` computes the tensor once, not once per element (each `.item()` replays its closure)."""
    from torchlazy._record import Record

    calls = []
    evaluate = Record.evaluate

    def counting(self: Record, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return evaluate(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Record, "evaluate", counting)
    with tl.deferred():
        rates = torch.linspace(0, 0.1, 12).tolist()
    assert rates == torch.linspace(0, 0.1, 12).tolist()
    assert len(calls) == 1


@pytest.mark.parametrize("name", list(DRAW_FREE_VALUES))
def test_draw_free_values_are_real_during_construction(name: str) -> None:
    compute = DRAW_FREE_VALUES[name]
    expected = compute()
    with tl.deferred():
        got = compute()
    assert got == expected


def test_regnet_style_constructor_is_exact() -> None:
    class RegNetLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = _regnet_widths()[:4]
            self.stages = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in zip([3, *widths], widths))
            self.head = nn.Linear(widths[-1], 10)

    assert_exact(RegNetLike)


def test_values_that_depend_on_draws_raise_clearly() -> None:
    with tl.deferred():
        w = torch.empty(3)
        nn.init.uniform_(w)
        with pytest.raises(tl.DeferredError, match="no values yet"):
            w.sum().item()
        with pytest.raises(tl.DeferredError):
            torch.nonzero(w > 0.5).tolist()


def test_a_record_is_freed_with_its_model() -> None:
    """A block's record (every recorded op, the fake storages) goes when its tensors go: after
    materialize and after dropping a model never materialized; nothing torchlazy keeps holds it."""
    import gc
    import weakref

    from torchlazy import _deferred

    def record_of(model: nn.Module) -> weakref.ref[object]:
        owner = _deferred.storage_of(model.weight)
        assert owner is not None
        return weakref.ref(owner[0])

    with tl.deferred():
        materialized = nn.Linear(64, 64)
    with torch.no_grad():
        materialized.weight.mul_(2)  # an op after the block: recorded by the block's recorder
    first = record_of(materialized)
    tl.materialize(materialized)
    with tl.deferred():
        dropped = nn.Linear(64, 64)
    second = record_of(dropped)
    del materialized, dropped
    gc.collect()
    assert first() is None and second() is None


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # torch's own, eager alike
def test_a_real_tensor_read_by_two_blocks() -> None:
    """A real tensor copied in one block and again in the next: each block's copy is its own (the fake mode's
    memo of converted storages once handed the second block the first block's storage: a DeferredError)."""
    outside = torch.tensor([-1.5, 2.0])
    modules = []
    for _ in range(2):
        with tl.deferred():
            m = nn.Module()
            m.register_buffer("copy", torch.empty(3).new_tensor(outside))
        modules.append(m)
    for m in modules:
        tl.materialize(m)
        assert torch.equal(m.copy, outside)


class _ViewBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        table = torch.randn(10, 4)
        self.register_buffer("table", table)
        self.register_buffer("head", table[:3])  # a view of the other buffer: it keeps its base alive


def test_a_buffer_that_views_another_materializes() -> None:
    """torch refuses to swap a tensor another one still references (a view's base): the new tensor then
    takes its place in the model, and the two still share storage as eager's do."""
    torch.manual_seed(0)
    eager = _ViewBuffers()
    torch.manual_seed(0)
    with tl.deferred():
        model = _ViewBuffers()
    tl.materialize(model)
    assert_models_identical(model, eager)
    assert model.head.data_ptr() == model.table.data_ptr()


class _FromConstant(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        s = torch.tensor(0.2).add_(0.3)  # a constant made in the block, then written in place
        self.register_buffer("b", s * scale)


def test_a_constant_written_in_place_replays_fresh_each_time() -> None:
    """Each replay works on a copy of a recorded constant: materializing two parts one after the other once
    wrote the in-place add into the constant itself (0.5, 1.6 where eager gives 0.5, 1.0)."""
    with tl.deferred():
        model = nn.ModuleDict({"a": _FromConstant(1.0), "b": _FromConstant(2.0)})
    tl.materialize(model["a"])
    tl.materialize(model["b"])
    assert model["a"].b.item() == 0.5 and model["b"].b.item() == 1.0


def test_a_dropped_deferred_model_is_freed_by_reference_counting() -> None:
    """Records hold no reference cycle (so a block's objects can skip the young collections): dropping a deferred
    model, never materialized, frees its record at once, with the cycle collector off."""
    import gc
    import weakref

    from torchlazy._deferred import storage_of

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
            nn.init.trunc_normal_(self.body[0].weight, std=0.02)

    torch.manual_seed(0)
    with tl.deferred():
        model = Net()
    with torch.no_grad():
        model.body[2].weight.mul_(2)  # recorded after the block: the record's tail recorder took part
    owner = storage_of(model.body[0].weight)
    assert owner is not None
    record = weakref.ref(owner[0])
    del owner
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert record() is None
    finally:
        if enabled:
            gc.enable()


def test_models_with_a_reference_cycle_built_in_blocks_are_collected_as_eager_ones() -> None:
    """A block leaves the collector's generations as they were: models that hold a reference cycle (parent
    links, callbacks) and are dropped after use are found by the usual young collections, not kept until a
    full one (promoting a block's objects to the oldest generation kept every such model alive)."""
    import gc
    import weakref

    alive: list[weakref.ref[nn.Module]] = []
    gc.collect()
    for _ in range(100):
        with tl.deferred():
            model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
        tl.materialize(model)
        model.cycle = [model]  # type: ignore[assignment]
        alive.append(weakref.ref(model))
        del model
    assert sum(ref() is not None for ref in alive) < 50


def test_ops_after_a_block_from_several_threads_record_without_errors() -> None:
    """Threads writing into one deferred model after its block (each its own parameter) all get recorded."""
    import sys

    with tl.deferred():
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(2000):
                with torch.no_grad():
                    model[i].bias.zero_()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    tl.materialize(model)
    assert all(torch.equal(layer.bias, torch.zeros(8)) for layer in model)


def test_trunc_normal_after_the_block_is_exact_and_keeps_no_frame() -> None:
    """torch's `trunc_normal_` run on deferred tensors after their block (its rejection loop recorded, its law
    noted): exact, and nothing of the call is kept once it returns (its frame held the tensors: the record was
    never freed, and materialize's swap refused a parameter still referenced)."""
    import weakref

    from torchlazy._deferred import storage_of

    def build() -> nn.Linear:
        return nn.Linear(16, 4)

    torch.manual_seed(0)
    eager = build()
    nn.init.trunc_normal_(eager.weight[:2], std=2, a=-1, b=1)
    torch.manual_seed(0)
    with tl.deferred():
        model = build()
    nn.init.trunc_normal_(model.weight[:2], std=2, a=-1, b=1)
    tl.materialize(model)
    assert_models_identical(model, eager)

    with tl.deferred():
        dropped = build()
    nn.init.trunc_normal_(dropped.weight, std=0.02)
    owner = storage_of(dropped.weight)
    assert owner is not None
    record = weakref.ref(owner[0])
    del owner, dropped
    assert record() is None


def test_detach_of_a_recorded_tensor_behaves_as_eagers_under_every_mode() -> None:
    """`detach` (every `nn.Parameter`) of a recorded tensor is made without dispatch while only the block's
    modes run: same geometry, version counter and grad flags as eager; under another dispatch mode,
    a torch-function mode or inference mode the op still reaches torch's dispatch (the mode sees it)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    def check(t: torch.Tensor, d: torch.Tensor) -> None:
        assert (d.shape, d.stride(), d.storage_offset(), d.dtype, d.device) == (
            t.shape, t.stride(), t.storage_offset(), t.dtype, t.device,
        )  # fmt: skip
        assert not d.requires_grad and d.grad_fn is None and d._base is None
        before = d._version
        t.zero_()
        assert d._version == before + 1  # shares the version counter, as eager's detach does

    real = torch.empty(2, 3)[:, 1:].requires_grad_()
    with torch.no_grad():
        check(real, real.detach())
    with tl.deferred():
        t = torch.empty(2, 3)[:, 1:].requires_grad_()
        with torch.no_grad():
            check(t, t.detach())
            p = nn.Parameter(t)
            assert isinstance(p, nn.Parameter) and p.requires_grad and tl.is_deferred(p)
            with Watch():
                check(t, t.detach())
            assert "aten.detach.default" in seen
            with Functions():
                check(t, t.detach())
            assert "detach" in seen
        with torch.inference_mode():
            assert t.detach().shape == (2, 2)


def test_writes_and_reads_through_conjugated_and_negated_views_replay_as_eagers() -> None:
    """A view's conjugate and negative bits are part of what an op sees: `t.conj().fill_(v)` stores conj(v),
    `t.conj().imag` negates (found by review: replay dropped the bits and stored v)."""

    def build() -> nn.Module:
        m = nn.Module()
        for name in "abcdefg":
            m.register_buffer(name, torch.zeros(8, dtype=torch.complex64))
        m.a.conj().fill_(1 + 2j)
        m.b.conj().imag.fill_(3.0)  # the negative bit
        m.c.conj().normal_()  # a draw through the conjugate
        m.d.copy_(m.a.conj())  # a read through it
        m.e.conj().copy_(m.a)  # a write through it
        m.f.conj().imag.normal_()  # a draw through the negative view
        m.g.conj().mul_(2).add_(1 + 1j)
        return m

    assert_exact(build)


def test_a_gradient_set_before_materialize_is_kept() -> None:
    """`p.grad = g` on a deferred parameter was dropped by materialize (eager keeps it); cast with the parameter."""
    with tl.deferred():
        model = nn.Linear(3, 2)
    grad = torch.ones(2, 3)
    model.weight.grad = grad
    tl.materialize(model)
    assert model.weight.grad is grad
    with tl.deferred():
        half = nn.Linear(3, 2)
    half.weight.grad = grad
    tl.materialize(half, dtype=torch.bfloat16)
    assert half.weight.grad is not None and half.weight.grad.dtype == torch.bfloat16


def test_build_leaves_a_lazy_layer_its_examples_did_not_reach_unbuilt_drawing_nothing() -> None:
    """As eager code's lazy layer never called draws nothing: the layers after it take the draws. Building it
    afterwards is refused (the draws after its place were given), with a message that says which flows lead there."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.unused = tl.nn.Linear(7)
            self.b = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    torch.manual_seed(0)
    with tl.deferred():
        model = Head()
    tl.build(model, tl.Spec(2, 3))
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(4, 5)
    assert torch.equal(model.a.weight, a.weight) and torch.equal(model.b.weight, b.weight)
    assert not tl.is_built(model.unused)
    with pytest.raises(tl.DeferredError, match="examples that did not reach it"):
        tl.build(model.unused, tl.Spec(2, 3))
    assert not tl.is_built(model.unused)  # and the failed build changed nothing


def test_a_lazy_layer_built_after_what_comes_after_it_was_materialized_is_refused_clearly() -> None:
    """`tl.materialize` before `tl.build`: the lazy layer drew nothing, the layers after it took the draws; the build
    then failed with advice about 'a data-dependent initialization', which the program had not run."""
    torch.manual_seed(0)
    with tl.deferred():
        model = nn.Sequential(nn.Linear(3, 4), tl.nn.Linear(5), nn.Linear(5, 6))
    tl.materialize(model)
    torch.manual_seed(0)
    a, c = nn.Linear(3, 4), nn.Linear(5, 6)  # a lazy layer not built draws nothing
    assert torch.equal(model[0].weight, a.weight) and torch.equal(model[2].weight, c.weight)
    with pytest.raises(tl.DeferredError, match=r"`tl\.materialize` before `tl\.build`.*draws nothing"):
        tl.build(model, tl.Spec(2, 3))
    assert not tl.is_built(model[1])


def test_a_deep_copy_of_a_deferred_model_keeps_the_threads_one_fake_mode() -> None:
    """`copy.deepcopy` copied each deferred tensor's `fake_mode` attribute, the mode with it: the copy's converter
    held the same storage weak references as the original's, each freed at exit (a double free: "corrupted
    double-linked list" or a segfault when the interpreter ended, after an estimate had converted real tensors)."""
    import copy

    with tl.deferred():
        model = nn.Linear(4, 4)
    twin = copy.deepcopy(model)
    assert twin.weight.fake_mode is model.weight.fake_mode
    torch.manual_seed(0)
    tl.materialize(twin)
    assert twin.weight.shape == (4, 4) and tl.is_deferred(model)
