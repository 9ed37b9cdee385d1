"""Every lazy layer against its eager twin: type, keys, shapes, outputs, errors, round trips."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from exact import assert_models_identical, assert_same_tensors
from layer_cases import CASES, Case, call
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

import torchlazy as tl


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_becomes_the_eager_class(case: Case) -> None:
    lazy, eager, inputs = case.lazy(), case.eager(), case.inputs()
    lazy.eval(), eager.eval()
    assert "?" in repr(lazy)
    obj = id(lazy)
    call(lazy, inputs)
    assert type(lazy) is type(eager) and id(lazy) == obj
    assert not lazy.training
    assert {k: v.shape for k, v in lazy.state_dict().items()} == {k: v.shape for k, v in eager.state_dict().items()}
    assert not any(k.startswith("_tl") for k in vars(lazy))
    assert repr(lazy) == repr(eager)
    lazy.load_state_dict(eager.state_dict())
    assert_models_identical(lazy, eager)
    assert_same_tensors(call(lazy, inputs), call(eager, inputs), "output")


def known_failures(cases: list[Case], reasons: dict[str, str]) -> list[object]:
    """The cases, those named in `reasons` marked as strict expected failures (they flip to an error when fixed)."""
    assert set(reasons) <= {c.name for c in cases}, f"unknown cases: {set(reasons) - {c.name for c in cases}}"
    return [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=reasons[c.name])) if c.name in reasons else c
        for c in cases
    ]


@pytest.mark.parametrize(
    "case",
    known_failures(
        CASES, {"LSTM-packed": "PyTorch has no fake-tensor kernel for packed LSTM: build from a real batch (README)"}
    ),
    ids=repr,
)
def test_exact_under_deferred(case: Case) -> None:
    inputs = case.inputs()
    torch.manual_seed(0)
    with tl.deferred():
        lazy = case.lazy()
    torch.randn(17)  # the RNG used in between does not matter
    tl.build(lazy, *inputs)
    torch.manual_seed(0)
    eager = case.eager()
    assert type(lazy) is type(eager)
    assert_models_identical(lazy, eager)
    assert not tl.is_deferred(lazy)


@pytest.mark.parametrize("case", [c for c in CASES if c.bad is not None], ids=repr)
def test_bad_first_input_leaves_layer_unbuilt(case: Case) -> None:
    lazy = case.lazy()
    assert case.bad is not None
    with pytest.raises((tl.ShapeError, TypeError)) as info:
        lazy(*case.bad())
    if isinstance(info.value, tl.ShapeError):
        assert type(lazy).__name__ in str(info.value) and "expected" in str(info.value)
    assert not tl.is_built(lazy)
    call(lazy, case.inputs())  # still usable
    assert tl.is_built(lazy)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_unbuilt_parameters_raise_not_built(case: Case) -> None:
    lazy = case.lazy()
    params, buffers = list(lazy.parameters()), list(lazy.buffers())
    assert all(isinstance(p, UninitializedParameter) for p in params)
    assert all(isinstance(b, UninitializedBuffer) for b in buffers)
    if not params and not buffers:  # InstanceNorm1d without affine or stats: only its sizes are unknown
        with pytest.raises(tl.NotBuiltError, match="forward pass"):
            _ = lazy.num_features  # type: ignore[attr-defined]
        return
    with pytest.raises(tl.NotBuiltError, match="forward pass"):
        sum(t.numel() for t in [*params, *buffers])
    for t in (params or buffers)[:1]:
        with pytest.raises(tl.NotBuiltError):
            _ = t.shape
        with pytest.raises(ValueError):  # what PyTorch raises for its own lazy parameters
            t + 1


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_load_state_dict_infers_sizes(case: Case) -> None:
    lazy, eager, inputs = case.lazy(), case.eager(), case.inputs()
    lazy.eval(), eager.eval()
    result = lazy.load_state_dict(eager.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    if eager.state_dict():
        assert type(lazy) is type(eager)
    else:  # nothing to take sizes from: still unbuilt, and the first call builds it
        assert not tl.is_built(lazy)
    assert_same_tensors(call(lazy, inputs), call(eager, inputs), "output")
    assert type(lazy) is type(eager)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_copy_and_pickle_before_and_after_build(case: Case) -> None:
    lazy = case.lazy().eval()
    for clone in (copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):
        call(clone, case.inputs())
        assert type(clone) is type(case.eager())
    out = call(lazy, inputs := case.inputs())
    buffer = io.BytesIO()
    torch.save(lazy, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(lazy), torch.load(buffer, weights_only=False)):
        assert_same_tensors(call(clone, inputs), out, "output")


_OTHER_PARAMETERS = pytest.mark.xfail(
    strict=True,
    reason="distinct kdim/vdim make q/k/v_proj_weight where the placeholders held in_proj_weight: "
    "three parameters cannot take the identity of one; create the optimizer after the first call",
)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=_OTHER_PARAMETERS) if c.name == "MultiheadAttention-kvdim" else c for c in CASES],
    ids=repr,
)
def test_optimizer_created_before_build_holds_the_real_parameters(case: Case) -> None:
    lazy = case.lazy()
    held = list(lazy.parameters())
    call(lazy, case.inputs())
    assert [id(p) for p in held] == [id(p) for p in lazy.parameters()]
    assert all(type(p) is nn.Parameter for p in held)


def test_optimizer_created_before_build_trains_real_parameters() -> None:
    net = nn.Sequential(tl.nn.Linear(8), nn.ReLU(), tl.nn.Linear(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    held = list(opt.param_groups[0]["params"])
    x = torch.randn(16, 4)
    before = [p.detach().clone() for p in [*net.parameters()] if not isinstance(p, UninitializedParameter)]
    assert before == []
    loss = net(x).pow(2).mean()
    loss.backward()
    opt.step()
    assert [id(p) for p in held] == [id(p) for p in net.parameters()]
    assert held[0].shape == (8, 4) and type(held[0]) is nn.Parameter
    assert held[0].grad is not None


def test_hooks_and_mode_survive_build() -> None:
    layer = tl.nn.Linear(3)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer.eval()
    layer(torch.randn(2, 5))
    assert seen == [torch.Size([2, 3])] and not layer.training
    handle.remove()
    layer(torch.randn(2, 5))
    assert len(seen) == 1


def test_parameters_on_input_device_in_layer_dtype() -> None:
    layer = tl.nn.Linear(3, dtype=torch.float64)
    layer(torch.randn(2, 5, dtype=torch.float64))
    assert layer.weight.dtype == torch.float64
    half = tl.nn.Linear(3).to(torch.bfloat16)
    half(torch.randn(2, 5, dtype=torch.bfloat16))
    assert half.weight.dtype == torch.bfloat16
    meta = tl.nn.Conv2d(4, 3)
    meta(torch.empty(1, 2, 5, 5, device="meta"))
    assert meta.weight.device.type == "meta" and meta.weight.shape == (4, 2, 3, 3)


def test_first_call_under_no_grad_and_autocast() -> None:
    layer = tl.nn.Linear(3)
    with torch.no_grad():
        out = layer(torch.randn(2, 5))
    assert not out.requires_grad and layer.weight.requires_grad
    layer = tl.nn.Linear(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 5))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32


def test_torch_compile_after_build() -> None:
    net = nn.Sequential(tl.nn.Linear(4), nn.ReLU(), tl.nn.Linear(2))
    x = torch.randn(3, 5)
    expected = net(x)
    compiled = torch.compile(net, backend="eager")
    assert_same_tensors(compiled(x), expected, "output")


def test_repr_and_signature() -> None:
    import inspect

    assert repr(tl.nn.Linear(128)) == "Linear(in_features=?, out_features=128)"
    params = inspect.signature(tl.nn.Conv2d).parameters
    assert "in_channels" not in params and list(params)[:2] == ["out_channels", "kernel_size"]
    with pytest.raises(TypeError, match="out_features"):
        tl.nn.Linear()


def test_layer_shared_in_two_places_builds_once() -> None:
    shared = tl.nn.Linear(4)
    net = nn.Sequential(shared, nn.ReLU(), tl.nn.Linear(4), shared)
    with pytest.raises(RuntimeError):  # second use sees 4 features, built for 6: PyTorch's own error
        net(torch.randn(2, 6))
    assert shared.in_features == 6


def test_every_table_row_is_a_torch_nn_subclass() -> None:
    for name in tl.nn.__all__:
        cls = getattr(tl.nn, name)
        assert issubclass(cls, getattr(nn, name))
        assert cls.__module__ == "torchlazy.nn" and cls.__qualname__ == name
    assert {c.name.split("-")[0] for c in CASES} == set(tl.nn.__all__)


def test_failed_first_forward_is_undone_with_a_shape_error() -> None:
    layer = tl.nn.Bilinear(3)
    with pytest.raises(tl.ShapeError, match=r"took in1_features=4, in2_features=5.*still unbuilt") as info:
        layer(torch.randn(2, 4), torch.randn(3, 5))  # batch sizes disagree
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, RuntimeError)
    assert not tl.is_built(layer) and "?" in repr(layer)
    layer(torch.randn(2, 4), torch.randn(2, 5))
    assert layer.in1_features == 4


def test_sizes_the_class_rejects_give_a_shape_error_and_leave_it_unbuilt() -> None:
    norm = tl.nn.GroupNorm(4)
    with pytest.raises(tl.ShapeError, match=r"took num_channels=6.*`GroupNorm` cannot be built.*divisible"):
        norm(torch.randn(2, 6, 3))
    assert not tl.is_built(norm)
    assert norm(torch.randn(2, 8, 3)).shape == (2, 8, 3)


def test_dtype_set_before_the_build_is_honoured_by_build_as_by_a_first_call() -> None:
    """`.double()` / `.to(dtype)` on an unbuilt lazy layer: the first call built float64 parameters, `tl.build` built
    float32 ones (its next forward then failed with torch's dtype error), also through a container."""
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.manual_seed(0)
    called = tl.nn.Linear(3).double()
    called(x)
    torch.manual_seed(0)
    built = tl.build(torch.nn.Sequential(tl.nn.Linear(3)).to(torch.float64), x)[0]
    assert called.weight.dtype == built.weight.dtype == torch.float64
    assert torch.equal(called.weight, built.weight) and torch.equal(called.bias, built.bias)
    assert built(x).dtype == torch.float64


def test_a_state_dict_missing_or_adding_keys_still_shapes_an_unbuilt_layer() -> None:
    """The keys a state dict has decide the sizes, and `load_state_dict` reports the rest as eager does; it said no
    size fits (`in_features=3` fits `weight` (4, 3)). Keys that decide nothing are refused as such."""
    source = nn.Linear(3, 4).state_dict()
    layer = tl.nn.Linear(4)
    keys = layer.load_state_dict({"weight": source["weight"]}, strict=False)
    assert keys.missing_keys == ["bias"] and layer.in_features == 3
    assert torch.equal(layer.weight, source["weight"])
    extra = tl.nn.Linear(4).load_state_dict({**source, "extra": torch.zeros(1)}, strict=False)
    assert extra.unexpected_keys == ["extra"]
    with pytest.raises(tl.ShapeError, match="fit more than one value of `in_features`"):
        tl.nn.Linear(4).load_state_dict({"bias": source["bias"]}, strict=False)
