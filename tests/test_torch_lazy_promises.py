"""What PyTorch's own lazy layers (`nn.LazyLinear` and kin) promise, checked against `tl.nn`.

A user switching from `nn.Lazy*` to `tl.nn` may rely on every one of these:

1. Before the first call, parameters and buffers are uninitialized placeholders
   (`UninitializedParameter` / `UninitializedBuffer`) and the module says it is not built.
2. The first call gives them their sizes, and the module becomes the plain class.
3. `state_dict()` works before the first call: it holds placeholders, which survive
   `copy.deepcopy`, `torch.save`/`torch.load`, and load into an unbuilt layer (which
   stays unbuilt, all keys matched) or into PyTorch's own lazy layer.
4. Loading a real state dict into an unbuilt layer gives it the state dict's sizes and values.
5. Loading an unbuilt state dict into a built layer is refused.
6. An unbuilt module can be pickled and deep-copied; each copy builds on its own.
7. An optimizer created before the first call trains the real parameters (same objects,
   param groups and their options kept).
8. What is set on a parameter or buffer object before the first call stays on it:
   `requires_grad` (also through `module.requires_grad_`), attributes, `.grad = None`, and,
   beyond PyTorch (which refuses them), hooks registered on the tensor. This holds even
   where the placeholder object itself cannot become the parameter. Where a placeholder
   held before the first call does not become the parameter (MultiheadAttention whose
   key/value sizes make three projections of one, `tl.build`), asking it for its gradient
   (an optimizer's step) is an error, not a silent skip.
9. Module hooks registered before the first call run at that call and after.
10. Lazy layers chain: each takes its sizes from the previous one's output.
11. `share_memory()` is refused before the first call and works after.
12. The built module scripts, traces and compiles as the plain class does.
13. Parameters are built in the layer's dtype (`.double()`/`.to(dtype)` before the first
    call are honoured, and so is the default dtype at construction); an input in another
    dtype is an error, reported as a dtype error (PyTorch reports the kernel's error and
    leaves the layer built; here it stays unbuilt).
14. The first call under `torch.no_grad()` still makes parameters that require grad.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import pytest
import torch
from layer_cases import CASES, Case, call
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

import torchlazy as tl

# MultiheadAttention with distinct kdim/vdim holds in_proj_weight until its sizes say q/k/v_proj_weight
_SAME_LAYOUT = [c for c in CASES if c.name != "MultiheadAttention-kvdim"]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _backward(out: torch.Tensor) -> None:
    if out.requires_grad:
        out.float().sum().backward()


# 1, 2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_placeholders_before_and_the_plain_class_after(case: Case) -> None:
    lazy = case.lazy()
    assert not tl.is_built(lazy)
    assert all(isinstance(p, UninitializedParameter) for p in lazy.parameters())
    assert all(isinstance(b, UninitializedBuffer) for b in lazy.buffers())
    call(lazy, case.inputs())
    assert tl.is_built(lazy) and type(lazy) is type(case.eager())
    assert not any(is_lazy(t) for t in _tensors(lazy).values())


# 3, 4, 5 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_state_dict_before_the_first_call_round_trips(case: Case) -> None:
    lazy = case.lazy()
    state = lazy.state_dict()
    if case in _SAME_LAYOUT:
        assert state.keys() == case.eager().state_dict().keys()
    assert all(is_lazy(v) for v in state.values())
    assert not any(v is t for v in state.values() for t in _tensors(lazy).values())  # detached, as for tensors
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    for loaded in (copy.deepcopy(state), torch.load(buffer, weights_only=False)):
        assert loaded.keys() == state.keys()
        assert all(is_lazy(v) and v.dtype == state[k].dtype for k, v in loaded.items())
        other = case.lazy()
        result = other.load_state_dict(loaded)
        assert not result.missing_keys and not result.unexpected_keys
        assert not tl.is_built(other)
        call(other, case.inputs())  # and it still builds
        assert type(other) is type(case.eager())
    assert lazy.state_dict(keep_vars=True).keys() == state.keys()


@pytest.mark.parametrize("case", [c for c in _SAME_LAYOUT if c.eager().state_dict()], ids=repr)
def test_unbuilt_state_does_not_load_into_a_built_layer(case: Case) -> None:
    unbuilt = case.lazy().state_dict()
    built = case.eager()
    with pytest.raises(ValueError):  # PyTorch: "Can't access the shape of an uninitialized parameter"
        built.load_state_dict(unbuilt)


def test_state_dicts_cross_between_torch_and_torchlazy_lazy_layers() -> None:
    ours, theirs = tl.nn.Linear(3), nn.LazyLinear(3)
    assert not theirs.load_state_dict(ours.state_dict()).missing_keys
    assert not ours.load_state_dict(theirs.state_dict()).missing_keys
    assert theirs.has_uninitialized_params() and not tl.is_built(ours)
    conv, bn = tl.nn.Conv2d(4, 3), tl.nn.BatchNorm2d()
    assert not conv.load_state_dict(nn.LazyConv2d(4, 3).state_dict()).missing_keys
    assert not bn.load_state_dict(nn.LazyBatchNorm2d().state_dict()).missing_keys
    assert not tl.is_built(conv) and not tl.is_built(bn)
    step0 = copy.deepcopy(nn.Sequential(tl.nn.Linear(4), nn.ReLU(), tl.nn.BatchNorm1d()).state_dict())
    assert set(step0) == {"0.weight", "0.bias", *(f"2.{k}" for k in nn.BatchNorm1d(1).state_dict())}


def test_loading_a_real_state_dict_into_an_unbuilt_layer_takes_its_sizes_and_values() -> None:
    eager = nn.Conv1d(5, 4, 3)
    lazy = tl.nn.Conv1d(4, 3)
    assert not lazy.load_state_dict(eager.state_dict()).missing_keys
    assert lazy.in_channels == 5 and torch.equal(lazy.weight, eager.weight)


def test_a_state_dict_in_a_checkpoint_loads_with_weights_only_when_allowed() -> None:
    buffer = io.BytesIO()
    torch.save(tl.nn.Linear(3, dtype=torch.float64).state_dict(), buffer)
    buffer.seek(0)
    classes = [type(v) for v in tl.nn.Linear(3).state_dict().values()]
    with torch.serialization.safe_globals(classes):
        loaded = torch.load(buffer)
    assert loaded["weight"].dtype == torch.float64 and is_lazy(loaded["weight"])


# 6 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_copies_of_an_unbuilt_layer_build_on_their_own(case: Case) -> None:
    lazy = case.lazy()
    for clone in (copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):
        call(clone, case.inputs())
        assert tl.is_built(clone) and not tl.is_built(lazy)
        assert not any(t is u for t in _tensors(clone).values() for u in _tensors(lazy).values())


# 7, 8 --------------------------------------------------------------------------------------


def test_optimizer_groups_made_before_the_first_call_keep_their_parameters_and_options() -> None:
    net = nn.Sequential(tl.nn.Linear(6), nn.ReLU(), tl.nn.Linear(2))
    opt = torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.5}, {"params": net[2].parameters(), "lr": 0.0}], lr=0.1
    )
    for p in net.parameters():
        p.grad = None
    net(torch.randn(4, 3)).pow(2).sum().backward()
    frozen = [p.detach().clone() for p in net[2].parameters()]
    before = net[0].weight.detach().clone()
    opt.step()
    assert [list(g["params"]) for g in opt.param_groups] == [list(net[0].parameters()), list(net[2].parameters())]
    assert not torch.equal(net[0].weight, before)
    assert all(torch.equal(a, b) for a, b in zip(net[2].parameters(), frozen))


@pytest.mark.parametrize("case", _SAME_LAYOUT, ids=repr)
def test_what_is_set_on_tensors_before_the_first_call_stays_on_them(case: Case) -> None:
    lazy = case.lazy()
    held = _tensors(lazy)
    params = [n for n, t in held.items() if isinstance(t, nn.Parameter)]
    fired: list[str] = []
    for name, t in held.items():
        t.tag = name  # type: ignore[attr-defined]
    if params:
        held[params[0]].requires_grad_(False)
    for name in params[1:]:
        p = held[name]
        p.grad = None
        p.register_hook(lambda g, name=name: fired.append(name) or g)
        p.register_post_accumulate_grad_hook(lambda _, name=name: fired.append(f"{name} accumulated"))
    lazy.train()
    _backward(call(lazy, case.inputs()))
    after = _tensors(lazy)
    assert after.keys() == held.keys()
    for name, t in after.items():
        assert t is held[name], f"{case.name}: `{name}` is another object after the first call"
        assert t.tag == name  # type: ignore[attr-defined]
    if params:
        assert not after[params[0]].requires_grad and after[params[0]].grad is None
        assert all(after[n].requires_grad for n in params[1:])
    used = {n for n in params[1:] if after[n].grad is not None}
    assert set(fired) == used | {f"{n} accumulated" for n in used}


@pytest.mark.parametrize("case", _SAME_LAYOUT, ids=repr)
def test_freezing_the_module_before_the_first_call_holds(case: Case) -> None:
    lazy = case.lazy().requires_grad_(False)
    call(lazy, case.inputs())
    assert not any(p.requires_grad for p in lazy.parameters())


def test_state_carries_over_where_the_placeholder_cannot_be_reused() -> None:
    layer = tl.nn.Linear(3)
    refs = [weakref.ref(p) for p in layer.parameters()]  # weak references forbid swapping the object
    layer.weight.requires_grad_(False)
    layer.weight.tag = "w"  # type: ignore[attr-defined]
    fired: list[str] = []
    layer.bias.register_hook(lambda g: fired.append("bias") or g)
    layer(torch.randn(2, 5)).sum().backward()
    assert refs[0]() is not layer.weight  # a new object took its place ...
    assert not layer.weight.requires_grad and layer.weight.tag == "w"  # ... with what was set on it
    assert fired == ["bias"]


def test_state_carries_over_through_tl_build() -> None:
    layer = tl.nn.Linear(3)
    layer.weight.requires_grad_(False)
    layer.weight.tag = "w"  # type: ignore[attr-defined]
    fired: list[str] = []
    layer.bias.register_post_accumulate_grad_hook(lambda _: fired.append("bias"))
    tl.build(layer, tl.Spec(2, 5))
    layer(torch.randn(2, 5)).sum().backward()
    assert not layer.weight.requires_grad and layer.weight.tag == "w" and fired == ["bias"]


def test_an_optimizer_holding_left_behind_placeholders_fails_loudly() -> None:
    mha = tl.nn.MultiheadAttention(2, batch_first=True)
    opt = torch.optim.SGD(mha.parameters(), lr=0.1)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    mha(q, kv, kv)[0].sum().backward()
    with pytest.raises(tl.LazyError, match=r"in_proj_weight.*holds no parameter.*after the first call"):
        opt.step()
    linear = tl.nn.Linear(3)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1)
    tl.build(linear, tl.Spec(2, 5))  # a deferred build makes new objects
    with pytest.raises(tl.LazyError, match=r"`Linear.weight`.*another parameter"):
        opt.zero_grad()
    torch.optim.SGD(linear.parameters(), lr=0.1).zero_grad()  # made after: fine


def test_hook_handles_made_before_the_first_call_still_remove_their_hooks() -> None:
    layer = tl.nn.Linear(3)
    fired: list[int] = []
    handle = layer.weight.register_hook(lambda g: fired.append(1) or g)
    layer(torch.randn(2, 5))
    handle.remove()
    layer(torch.randn(2, 5)).sum().backward()
    assert fired == []


# 9, 10, 11, 12 -----------------------------------------------------------------------------


def test_module_hooks_registered_before_the_first_call_run() -> None:
    layer = tl.nn.Conv2d(4, 3)
    seen: list[str] = []
    layer.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    layer.register_forward_hook(lambda m, i, o: seen.append(f"post {tuple(o.shape)}"))
    layer.register_full_backward_hook(lambda m, gi, go: seen.append("backward"))
    layer(torch.randn(1, 2, 5, 5, requires_grad=True)).sum().backward()
    layer(torch.randn(1, 2, 5, 5))
    assert seen == ["pre", "post (1, 4, 3, 3)", "backward", "pre", "post (1, 4, 3, 3)"]


def test_lazy_layers_chain() -> None:
    net = nn.Sequential(
        tl.nn.Conv1d(6, 3),
        tl.nn.BatchNorm1d(),
        tl.nn.ConvTranspose1d(2, 3),
        nn.Flatten(),
        tl.nn.Linear(4),
        tl.nn.Linear(1),
    )
    assert net(torch.randn(2, 5, 9)).shape == (2, 1)
    assert [net[0].in_channels, net[1].num_features, net[2].in_channels, net[4].in_features, net[5].in_features] == [
        5, 6, 6, 18, 4,
    ]  # fmt: skip


def test_share_memory_is_refused_before_the_first_call_and_works_after() -> None:
    layer = tl.nn.Linear(3)
    with pytest.raises(tl.NotBuiltError, match="share_memory"):
        layer.share_memory()
    with pytest.raises(RuntimeError):  # what PyTorch raises for its own
        layer.share_memory()
    layer(torch.randn(2, 5))
    layer.share_memory()
    assert layer.weight.is_shared()


def test_the_built_layer_scripts_traces_and_compiles() -> None:
    layer = tl.nn.Linear(3)
    x = torch.randn(2, 5)
    expected = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in recent torch
        scripted = torch.jit.script(layer)
        traced = torch.jit.trace(layer, x)
    compiled = torch.compile(layer, backend="eager")
    for run in (scripted, traced, compiled):
        torch.testing.assert_close(run(x), expected)


# 13, 14 ----------------------------------------------------------------------------------


def test_dtype_set_before_the_first_call_is_honoured() -> None:
    layer = tl.nn.Linear(3).double()
    layer(torch.randn(2, 5, dtype=torch.float64))
    assert layer.weight.dtype == torch.float64
    norm = tl.nn.BatchNorm1d().to(torch.float64)
    norm(torch.randn(4, 3, dtype=torch.float64))
    assert norm.running_mean.dtype == torch.float64 and norm.num_batches_tracked.dtype == torch.long


def test_a_first_input_in_another_dtype_is_a_dtype_error_and_leaves_the_layer_unbuilt() -> None:
    layer = tl.nn.Linear(3)
    with pytest.raises(tl.DtypeError, match=r"`Linear`.*torch.float32.*torch.float64.*still unbuilt") as info:
        layer(torch.randn(2, 5, dtype=torch.float64))
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, tl.ShapeError)
    assert not tl.is_built(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        assert layer(torch.randn(2, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32


def test_the_default_dtype_at_construction_decides_the_placeholders() -> None:
    outer = torch.get_default_dtype()
    try:
        for dtype in (torch.float64, torch.float32, torch.float64):
            torch.set_default_dtype(dtype)
            layer = tl.nn.LayerNorm()
            assert layer.weight.dtype == dtype
            layer(torch.randn(2, 4, dtype=dtype))
            assert layer.weight.dtype == dtype
    finally:
        torch.set_default_dtype(outer)


class _Heads:
    """An argument whose repr does not tell two values apart."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def __repr__(self) -> str:
        return "_Heads(...)"


class _MultiHead(nn.Module):
    def __init__(self, in_features: int, heads: _Heads) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({n: nn.Linear(in_features, 1) for n in heads.names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(x) for h in self.heads.values()], -1)


def test_the_layout_cache_tells_apart_arguments_with_the_same_repr() -> None:
    lazy_heads = tl.lazy(_MultiHead, in_features=lambda x: x.shape[-1])
    two, three = lazy_heads(heads=_Heads(("a", "b"))), lazy_heads(heads=_Heads(("a", "b", "c")))
    assert len(list(two.parameters())) == 4 and len(list(three.parameters())) == 6
    held = list(three.parameters())
    assert three(torch.randn(2, 5)).shape == (2, 3)
    assert all(a is b for a, b in zip(held, three.parameters()))


def test_the_first_call_under_no_grad_makes_trainable_parameters() -> None:
    layer = tl.nn.Conv2d(2, 1)
    with torch.no_grad():
        layer(torch.randn(1, 3, 4, 4))
    assert all(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_options_that_do_not_depend_on_the_input_are_known_before_the_first_call(case: Case) -> None:
    """What the real class sets from its constructor's options (`eps`, `padding_mode`, `dilation`, `norm_first`,
    a sub-module's `batch_first`) is known before the first call, as PyTorch's own lazy layers know it, and equal
    to what the built layer holds (a NotBuiltError before: `nn.TransformerEncoder` could not take a tl.nn layer)."""
    lazy = case.lazy()
    built = case.lazy()
    call(built, case.inputs())
    for prefix, sub in built.named_modules():
        for name, value in vars(sub).items():
            if name.startswith("_") or isinstance(value, (torch.Tensor, nn.Module)) or not _simple(value):
                continue
            try:
                seen = getattr(lazy.get_submodule(prefix) if prefix else lazy, name)
            except (tl.NotBuiltError, AttributeError):
                continue  # it depends on the input (`in_features`), or the sub-module has no stand-in
            assert seen == value, (prefix, name, seen, value)
    if isinstance(built, (nn.Conv2d, nn.BatchNorm2d, nn.TransformerEncoderLayer)):
        known = {"padding_mode", "dilation", "groups"} | {"eps", "affine", "momentum"} | {"norm_first"}
        assert any(hasattr(lazy, k) and getattr(lazy, k) == getattr(built, k) for k in known)


def _simple(value: object) -> bool:
    return isinstance(value, (int, float, bool, str, type(None), tuple))


@pytest.mark.parametrize("heads", [2, 12])  # 12: only the largest probe size divides it
@pytest.mark.parametrize("container", ["encoder", "decoder"])
def test_torchs_transformer_stacks_of_a_lazy_layer_equal_eager_ones(container: str, heads: int) -> None:
    """`nn.TransformerEncoder(tl.nn.TransformerEncoderLayer(...), N)` deep-copies the unbuilt layer N times: each
    copy holds, once built, what eager's copies of the built layer hold (independent draws before; and before
    that, the stack could not be constructed at all)."""
    width = 4 * heads
    x, memory = torch.randn(3, 2, width), torch.randn(4, 2, width)

    def stack(lazy: bool) -> nn.Module:
        if container == "encoder":
            encoder = tl.nn.TransformerEncoderLayer if lazy else functools.partial(nn.TransformerEncoderLayer, width)
            return nn.TransformerEncoder(encoder(heads, dim_feedforward=16), 3, enable_nested_tensor=False)
        decoder = tl.nn.TransformerDecoderLayer if lazy else functools.partial(nn.TransformerDecoderLayer, width)
        return nn.TransformerDecoder(decoder(heads, dim_feedforward=16), 3)

    args = (x,) if container == "encoder" else (x, memory)
    torch.manual_seed(0)
    eager = stack(lazy=False).eval()
    state = torch.get_rng_state()
    torch.manual_seed(0)
    model = stack(lazy=True).eval()
    out = model(*args)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    assert list(model.state_dict()) == list(eager.state_dict())
    assert torch.allclose(out, eager(*args))


def test_a_stack_of_a_lazy_layer_is_constructed_and_built_inside_a_block() -> None:
    """Deep copies of an unbuilt layer inside `tl.deferred()` (`nn.TransformerEncoder` makes them) raised a raw
    RuntimeError about the placeholders' class."""
    with tl.deferred():
        model = nn.TransformerEncoder(tl.nn.TransformerEncoderLayer(2, dim_feedforward=16), 2)
        copied = copy.deepcopy(tl.nn.Linear(3))
    tl.build(model, torch.randn(3, 2, 8))
    tl.materialize(model)
    assert tl.is_built(model) and not tl.is_deferred(model) and not tl.is_built(copied)
    assert model(torch.randn(3, 2, 8)).shape == (3, 2, 8)


def test_a_frozen_layer_whose_parameters_change_with_the_input_stays_frozen() -> None:
    """`requires_grad_(False)` before the first call, then key/value sizes that make q/k/v_proj_weight where the
    placeholders held in_proj_weight: those three trained, silently."""
    layer = tl.nn.MultiheadAttention(2, batch_first=True).requires_grad_(False)
    layer(torch.randn(2, 3, 8), torch.randn(2, 4, 5), torch.randn(2, 4, 3))
    assert "q_proj_weight" in dict(layer.named_parameters())
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("cls", [tl.nn.LayerNorm, tl.nn.RMSNorm])
def test_normalized_ndim_decides_a_state_dicts_shape_as_it_decides_a_first_inputs(cls: type) -> None:
    """A state dict of another rank than `normalized_ndim` built the layer to its rank, silently (a first input
    of the same shape is refused)."""
    eager = nn.LayerNorm if cls is tl.nn.LayerNorm else nn.RMSNorm
    with pytest.raises(tl.ShapeError, match="normalized_ndim=2"):
        cls(normalized_ndim=2).load_state_dict(eager(12).state_dict())
    layer = cls(normalized_ndim=2)
    layer.load_state_dict(eager((3, 4)).state_dict())
    assert tuple(layer.normalized_shape) == (3, 4)
    with pytest.raises(tl.ArgumentError, match="must be an int >= 1"):
        cls(normalized_ndim=2.5)


class _CompactsItsRnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = tl.nn.LSTM(6, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rnn.flatten_parameters()  # the usual first line of an RNN model's forward (for cuDNN)
        return self.rnn(x)[0]


def test_an_rnn_compacted_before_its_first_call_builds_as_eager() -> None:
    """`flatten_parameters()` on an unbuilt RNN raised a raw AttributeError (`_flat_weights`)."""
    x = torch.randn(2, 5, 3)
    torch.manual_seed(0)
    model = _CompactsItsRnn()
    out = model(x)
    torch.manual_seed(0)
    eager = nn.LSTM(3, 6, batch_first=True)
    assert torch.equal(out, eager(x)[0])
    assert all(torch.equal(a, b) for a, b in zip(model.rnn.parameters(), eager.parameters()))


def test_a_method_of_an_unbuilt_layer_using_its_parts_is_a_not_built_error() -> None:
    """`AdaptiveLogSoftmaxWithLoss.log_prob` before the first call: a raw NotImplementedError ("missing forward")."""
    layer = tl.nn.AdaptiveLogSoftmaxWithLoss(10, [4, 8])
    with pytest.raises(tl.NotBuiltError, match="not built yet"):
        layer.log_prob(torch.randn(5, 16))
    assert layer(torch.randn(5, 16), torch.tensor([0, 3, 5, 9, 1])).output.shape == (5,)


def test_a_partial_freeze_before_the_first_call_follows_the_parameters_it_froze() -> None:
    """All frozen, then `out_proj` unfrozen: q/k/v_proj_weight stand where the frozen in_proj_weight stood."""
    layer = tl.nn.MultiheadAttention(2, batch_first=True).requires_grad_(False)
    layer.out_proj.requires_grad_(True)
    layer(torch.randn(2, 3, 8), torch.randn(2, 4, 5), torch.randn(2, 4, 3))
    grads = {name: p.requires_grad for name, p in layer.named_parameters()}
    assert not grads["q_proj_weight"] and grads["out_proj.weight"]


def test_deep_copies_build_on_their_own_inputs_device_and_size_options_take_any_integer() -> None:
    """A copy built after another took its values on the other's device (a meta input was refused); a numpy
    integer `normalized_ndim` was refused."""
    first = tl.nn.Linear(4)
    second = copy.deepcopy(first)
    first(torch.randn(2, 3))
    second(torch.randn(2, 3, device="meta"))
    assert second.weight.is_meta and second.weight.shape == first.weight.shape
    assert tuple(tl.nn.LayerNorm(normalized_ndim=np.int64(2))(torch.randn(2, 3, 4)).shape) == (2, 3, 4)


def test_parameters_registered_as_none_read_none_before_the_first_call() -> None:
    """`bias=False`: PyTorch's lazy layers read `.bias` as None before the first call; an AttributeError here, and
    `nn.TransformerEncoder` of a bias-free lazy layer could not be built."""
    assert tl.nn.Linear(3, bias=False).bias is None
    assert tl.nn.LayerNorm(elementwise_affine=False).weight is None
    layer = tl.nn.TransformerEncoderLayer(2, dim_feedforward=16, batch_first=True, bias=False)
    assert layer.self_attn.in_proj_bias is None
    stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    assert stack(torch.randn(2, 3, 8)).shape == (2, 3, 8)


@pytest.mark.parametrize(
    "make", [lambda: tl.nn.GroupNorm(11), lambda: tl.nn.MultiheadAttention(13)], ids=["g11", "h13"]
)
def test_sizes_no_probe_divides_still_give_placeholders(make: Callable[[], nn.Module]) -> None:
    """11 groups or 13 heads divide none of the probe sizes: the layer had no placeholders, so an optimizer made
    before the first call left its parameters out and a freeze or cast before it was dropped, silently."""
    layer = make()
    assert list(layer.parameters())
    layer.requires_grad_(False)
    assert all(not p.requires_grad for p in layer.parameters())


def test_settings_made_before_the_first_call_hold_on_the_built_layer() -> None:
    """`ln.eps = 0.5` before the first call came back to 1e-5 after it (eager keeps what was set)."""
    norm = tl.nn.LayerNorm()
    norm.eps = 0.5
    block = tl.nn.TransformerEncoderLayer(2, dim_feedforward=16)
    block.norm_first = True
    norm(torch.randn(2, 4))
    block(torch.randn(3, 2, 8))
    assert norm.eps == 0.5 and block.norm_first


def test_a_lazy_class_holding_an_array_constructs() -> None:
    """An attribute whose `==` is elementwise (a numpy array) broke the comparison of two skeletons."""

    class Scaled(nn.Module):
        def __init__(self, in_features: int, out_features: int) -> None:
            super().__init__()
            self.scale = np.ones(3)
            self.proj = nn.Linear(in_features, out_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    layer = tl.lazy(Scaled, in_features=lambda x: x.shape[-1])(4)
    assert layer(torch.randn(2, 5)).shape == (2, 4)


def test_settings_of_a_module_put_in_a_stand_ins_place_are_not_carried() -> None:
    """A 4-head attention the user put in place of an unbuilt layer's `self_attn`: its `num_heads` was set on the
    built 2-head one, whose weights were made for 2 heads (it then computed wrong attention, silently)."""
    block = tl.nn.TransformerEncoderLayer(2, dim_feedforward=16, batch_first=True)
    block.self_attn = nn.MultiheadAttention(8, 4, batch_first=True)
    block(torch.randn(2, 3, 8))
    assert block.self_attn.head_dim * block.self_attn.num_heads == block.self_attn.embed_dim


def test_a_default_that_no_probe_divides_still_gives_placeholders() -> None:
    """`heads=13` as the class's default, not passed: no placeholders (passed, there were)."""

    class Attention(nn.Module):
        def __init__(self, dim: int, heads: int = 13) -> None:
            super().__init__()
            assert dim % heads == 0
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    lazy = tl.lazy(Attention, dim=lambda x: x.shape[-1])
    assert [name for name, _ in lazy().named_parameters()] == ["proj.weight", "proj.bias"]
