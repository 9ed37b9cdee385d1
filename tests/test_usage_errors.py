"""Issue 10, the rest: every bad argument is a torchlazy error; lazy layers under compile and inference_mode.

Each test compares with the eager program, or asserts the torchlazy error and that the model
(or the layer) is as it was before the call.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from exact import assert_models_identical
from torch import nn

import torchlazy as tl


def _lazy_net() -> nn.Module:
    return nn.Sequential(tl.nn.Linear(4), nn.ReLU(), tl.nn.Linear(2))


# -- 1. torch.compile of an unbuilt model: the first call builds eagerly -----------------------

# At a graph break dynamo wraps the live activations and reads their `.grad` under a filter that
# `-W error` overrides (any model with a graph break does this): not torchlazy's warning.
_DYNAMO_GRAD_WARNING = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")


@_DYNAMO_GRAD_WARNING
def test_compile_of_an_unbuilt_model_builds_at_the_first_call_and_matches_eager() -> None:
    x = torch.randn(3, 5)
    model = _lazy_net()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(model, backend="eager")
    torch.manual_seed(0)
    first = compiled(x)  # builds in call order, which is construction order here: eager's draws
    assert tl.is_built(model) and type(model[0]) is nn.Linear
    assert_models_identical(model, eager)
    assert torch.equal(first, eager(x))
    assert torch.equal(compiled(x), eager(x))  # later calls: the compiled plain model


@_DYNAMO_GRAD_WARNING
def test_compile_of_an_unbuilt_lazy_module_builds_at_the_first_call() -> None:
    class Block(tl.LazyModule):
        def build(self, x: torch.Tensor) -> None:
            self.proj = nn.Linear(x.shape[-1], 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    block = Block()
    compiled = torch.compile(block, backend="eager")
    x = torch.randn(3, 5)
    assert torch.equal(compiled(x), block.proj(x))
    assert torch.equal(compiled(x), block(x))


@_DYNAMO_GRAD_WARNING
def test_compile_of_a_deferred_model_is_a_deferred_error_then_runs_once_materialized() -> None:
    # the forward guard walks frames to name the module, which dynamo's tracer cannot follow: the call failed
    # inside dynamo with an AssertionError instead of the DeferredError an eager call gets
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    torch.manual_seed(0)
    with tl.deferred():
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 4)
    with pytest.raises(tl.DeferredError, match=r"`Linear` \(Linear\) was constructed under `tl.deferred\(\)`"):
        compiled(x)
    assert tl.is_deferred(model)
    tl.materialize(model)
    assert_models_identical(model, eager)
    assert torch.equal(compiled(x), eager(x))


# -- 2. a first call under inference_mode builds normal, trainable parameters ------------------


def test_a_first_call_under_inference_mode_builds_trainable_parameters() -> None:
    class Block(tl.LazyModule):
        def build(self, x: torch.Tensor) -> None:
            self.proj = nn.Linear(x.shape[-1], 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = nn.Sequential(tl.nn.Linear(4), nn.ReLU(), Block(), tl.nn.BatchNorm1d())
    with torch.inference_mode():
        out = model(torch.randn(3, 5))
    assert out.is_inference()  # the forward itself ran in inference mode
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    running = model[3].running_mean.clone()
    model(torch.randn(3, 5)).pow(2).sum().backward()
    opt.step()  # eager raised here: "Inplace update to inference tensor outside InferenceMode"
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not torch.equal(running, model[3].running_mean)


# -- 3. a user rule that fails on the input is a ShapeError; the layer stays unbuilt -----------


def test_a_rule_that_fails_on_the_input_is_a_shape_error_and_leaves_the_layer_unbuilt() -> None:
    LazyLinear = tl.lazy(nn.Linear, in_features=lambda x: x.shape[5])
    layer = LazyLinear(out_features=3)
    with pytest.raises(tl.ShapeError, match=r"`in_features`.*Tensor\[2, 3\].*IndexError.*still unbuilt"):
        layer(torch.ones(2, 3))
    assert not tl.is_built(layer) and type(layer) is LazyLinear
    assert layer(torch.ones(1, 1, 1, 1, 1, 4)).shape == (1, 1, 1, 1, 1, 3)


# -- 5. eager's argument order is refused with the call that was meant -------------------------


@pytest.mark.parametrize(
    ("make", "meant"),
    [
        (lambda: tl.nn.Linear(3, 4), r"`tl.nn.Linear\(4\)` or `nn.Linear\(3, 4\)`"),
        (lambda: tl.nn.Conv2d(3, 16, 3), r"`tl.nn.Conv2d\(16, 3\)` or `nn.Conv2d\(3, 16, 3\)`"),
        (lambda: tl.nn.BatchNorm1d(4), r"`tl.nn.BatchNorm1d\(\)` or `nn.BatchNorm1d\(4\)`"),
        (lambda: tl.nn.LSTM(10, 20), r"`tl.nn.LSTM\(20\)` or `nn.LSTM\(10, 20\)`"),
        (lambda: tl.nn.GroupNorm(2, 8), r"`tl.nn.GroupNorm\(8\)` or `nn.GroupNorm\(2, 8\)`"),
    ],
    ids=["Linear(3, 4)", "Conv2d(3, 16, 3)", "BatchNorm1d(4)", "LSTM(10, 20)", "GroupNorm(2, 8)"],
)
def test_eager_argument_order_is_an_argument_error_naming_both_calls(make: Callable[[], object], meant: str) -> None:
    with pytest.raises(tl.ArgumentError, match=r"lazy layers infer `\w+` from the first input.*" + meant):
        make()


def test_optional_arguments_are_keyword_only_and_signatures_stay_visible() -> None:
    params = inspect.signature(tl.nn.Linear).parameters
    assert list(params) == ["out_features", "bias", "device", "dtype"]
    assert params["out_features"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("bias", "device", "dtype"))
    assert tl.nn.Linear(4, bias=False)(torch.ones(2, 3)).shape == (2, 4)
    assert tl.nn.Conv2d(8, 3, padding=1)(torch.ones(1, 2, 5, 5)).shape == (1, 8, 5, 5)
    with pytest.raises(tl.ArgumentError, match=r"missing a required argument: 'out_features'.*tl.nn.Linear\("):
        tl.nn.Linear()  # type: ignore[call-arg]


# -- 7. NotBuiltError names what the user did, not PyTorch's internal op ------------------------


@pytest.mark.parametrize(
    ("use", "named"),
    [
        (lambda w: w.detach(), r"`\.detach\(\)`"),
        (lambda w: w[0], r"indexing \(`t\[...\]`\)"),
        (lambda w: len(w), r"`len\(\)`"),
        (lambda w: w == 0, "`==`"),
        (lambda w: torch.nn.functional.linear(torch.ones(2, 2), w), r"`linear\(\)`"),
        (lambda w: w._is_view(), r"using it \(PyTorch's internal `_is_view`"),
        (lambda w: w.copy_(torch.ones(2, 4)), r"`\.copy_\(\)`"),  # torch's own size error before
        (lambda w: torch.ones(2, 4).copy_(w), r"`\.copy_\(\)`"),
    ],
    ids=["detach", "getitem", "len", "eq", "F.linear", "_is_view", "copy_into", "copy_from"],
)
def test_not_built_errors_name_the_users_operation(use: Callable[[torch.Tensor], object], named: str) -> None:
    layer = tl.nn.Linear(3)
    with (
        torch.no_grad(),
        pytest.raises(tl.NotBuiltError, match=r"`weight` of .* is not built yet: " + named + ".* needs its shape"),
    ):
        use(layer.weight)
    assert not tl.is_built(layer)


def test_not_built_errors_name_the_path_in_a_model_a_function_was_handed() -> None:
    """`fully_shard(model)` reads every parameter's shape: the error named `weight` of `Linear(...)`, not where
    in the model it is (the path is found from the modules the running frames hold, not only their `self`)."""

    def shard_like(module: nn.Module) -> None:
        for p in module.parameters():
            _ = p.shape

    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(tl.nn.Linear(5)))
    with pytest.raises(tl.NotBuiltError, match=r"`1\.0\.weight` of Linear\(in_features=\?"):
        shard_like(model)


def _unchanged(model: nn.Module) -> Callable[[], None]:
    before = copy.deepcopy(model)

    def check() -> None:
        assert repr(model) == repr(before)
        assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]

    return check


# -- 8. load_state_dict into an unbuilt LazyModule -------------------------------------------


class _Block(tl.LazyModule):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def build(self, x: torch.Tensor) -> None:
        self.proj = nn.Linear(x.shape[-1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


def test_load_state_dict_into_an_unbuilt_lazy_module_is_a_not_built_error() -> None:
    built = nn.Sequential(_Block())
    built(torch.ones(1, 3))
    state = built.state_dict()
    model = nn.Sequential(_Block())
    check = _unchanged(model)
    for strict in (True, False):  # strict=False would drop the weights silently
        with pytest.raises(tl.NotBuiltError, match=r"`0` \(_Block\).*`0.proj.bias`, `0.proj.weight`.*tl.build"):
            model.load_state_dict(state, strict=strict)
        check()
    model(torch.ones(1, 3))
    model.load_state_dict(state)  # once built, it loads
    assert_models_identical(model, built)


def test_load_state_dict_into_an_unbuilt_lazy_module_with_only_its_own_keys_works() -> None:
    block = _Block()
    block.load_state_dict({"scale": torch.tensor(2.0)})
    assert block.scale.item() == 2.0 and not tl.is_built(block)


# -- 9. the command line: bad arguments exit 2 naming the argument; --out x.pt is a torch file -------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from torchlazy.cli import main

    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("summary", "zoo:cnn", "--input", "1x3x8x8", "--depth", "-1"), "--depth -1"),
        (("summary", "zoo:cnn", "--input", "1x3x8x8", "--memory", "--autocast", "int8"), "--autocast `int8`"),
        (("materialize", "zoo:cnn", "--input", "1x3x8x8", "--dtype", "int8", "--out", "x.st"), "--dtype `int8`"),
        (("materialize", "zoo:cnn", "--input", "1x3x8x8", "--max-shard-size", "2XB", "--out", "d"), "--max-shard-size"),
        (("materialize", "zoo:cnn", "--input", "1x3x8x8", "--max-shard-size", "1KB", "--out", "x.pt"), "--out `x.pt`"),
        (("summary", "zoo:cnn", "--input", "1x3x8x8", "--depth", "abc"), "argument --depth: invalid int value"),
        (
            ("materialize", "zoo:cnn", "--input", "1x3x8x8", "--dtype", "nope", "--out", "x.st"),
            "--dtype: unknown dtype",
        ),
        (("summary", "zoo:cnn", "--input", "1x3x8x8:float99"), "--input `1x3x8x8:float99`: unknown dtype"),
    ],
    ids=[
        "depth-1",
        "autocast-int8",
        "dtype-int8",
        "shard-2XB",
        "shards-into-pt",
        "depth-abc",
        "dtype-nope",
        "input-dtype",
    ],
)
def test_bad_cli_arguments_exit_2_with_one_line_naming_the_argument(
    args: tuple[str, ...], named: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = tuple(str(tmp_path / a) if a in ("x.st", "d", "x.pt") else a for a in args)
    named = named.replace("x.pt", str(tmp_path / "x.pt"))
    code, out, err = _cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith(f"torchlazy: error: {named}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_cli_out_with_a_torch_suffix_writes_a_torch_save_state_dict(
    suffix: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import zoo

    out = tmp_path / f"model{suffix}"
    code, _, err = _cli(capsys, "materialize", "zoo:cnn", "--input", "1x3x8x8", "--seed", "3", "--out", str(out))
    assert code == 0, err
    state = torch.load(out, weights_only=True)
    torch.manual_seed(3)
    reference = zoo.cnn_eager()
    assert state.keys() == reference.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())


def test_a_factory_failing_with_any_exception_exits_4_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # only LazyError, ValueError, TypeError, RuntimeError and OSError were caught: a KeyError of the model's own
    # code (a config lookup) printed a traceback and exited 1, as did an output safetensors could not write
    (tmp_path / "broken_factory.py").write_text("def make():\n    return {}['hidden_size']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = _cli(capsys, "summary", "broken_factory:make")
    assert (code, out) == (4, "")
    assert err.startswith("torchlazy: error: `broken_factory:make()` raised KeyError: 'hidden_size' (the model's own")
    assert err.count("\n") == 1


def test_cli_concretize_flag_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "summary", "zoo:cnn", "--input", "1x3x8x8", "--concretize")
    assert code == 0, err
    assert "Total" in out or "params" in out.lower()


# -- every public function: a wrong-typed first argument or a bad keyword is a torchlazy error ------


def _deferred_linear() -> nn.Module:
    with tl.deferred():
        return nn.Linear(2, 2)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: tl.materialize(3), id="materialize(3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.materialize(_deferred_linear(), exact="yes"), id="materialize(exact='yes')"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.materialize(_deferred_linear(), progress=3), id="materialize(progress=3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.materialize(_deferred_linear(), device="bogus"), id="materialize(device='bogus')"),
        pytest.param(lambda: tl.build(3, tl.Spec(1, 2)), id="build(3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.build(nn.Sequential(tl.nn.Linear(2)), tl.Spec(1, 2), dtype="f"), id="build(dtype='f')"),  # type: ignore[arg-type]
        pytest.param(
            lambda: tl.build(nn.Sequential(tl.nn.Linear(2)), tl.Spec(1, 2), device="bogus"), id="build(device)"
        ),
        pytest.param(lambda: tl.summary(3), id="summary(3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.summary(nn.Linear(2, 2), depth="a"), id="summary(depth='a')"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.summary(nn.Linear(2, 2), depth=-1), id="summary(depth=-1)"),
        pytest.param(lambda: tl.save(3, "x.safetensors"), id="save(3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.save(nn.Linear(2, 2), 3), id="save(path=3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.save(nn.Linear(2, 2), "d", max_shard_size=-1), id="save(max_shard_size=-1)"),
        pytest.param(lambda: tl.save(nn.Linear(2, 2), "d", max_shard_size="2XB"), id="save(max_shard_size='2XB')"),
        pytest.param(lambda: tl.save(nn.Linear(2, 2), "d", max_shard_size=1.5), id="save(max_shard_size=1.5)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.estimate_memory(3), id="estimate_memory(3)"),  # type: ignore[arg-type]
        pytest.param(
            lambda: tl.estimate_memory(nn.Linear(2, 2), tl.Spec(1, 2), optimizer="bogus"),
            id="estimate_memory(optimizer='bogus')",
        ),
        pytest.param(
            lambda: tl.estimate_memory(nn.Linear(2, 2), tl.Spec(1, 2), autocast=torch.int8),
            id="estimate_memory(autocast=int8)",
        ),
        pytest.param(
            lambda: tl.estimate_memory(nn.Linear(2, 2), tl.Spec(1, 2), autocast=torch.float64),
            id="estimate_memory(autocast=float64)",  # torch switches autocast off for it: the label would be false
        ),
        pytest.param(
            lambda: tl.estimate_memory(nn.Linear(2, 2), tl.Spec(1, 2), example_kwargs=[1]),  # type: ignore[arg-type]
            id="estimate_memory(example_kwargs=[1])",
        ),
        pytest.param(
            lambda: tl.estimate_memory(nn.Linear(2, 2), x=tl.Spec(1, 2)),
            id="estimate_memory(x=Spec)",  # a keyword input sent to the optimizer: refused, naming example_kwargs
        ),
        pytest.param(lambda: tl.materialize(_deferred_linear(), device="meta"), id="materialize(device='meta')"),
        pytest.param(lambda: tl.materialize(_deferred_linear(), device="xla"), id="materialize(device='xla')"),
        pytest.param(lambda: tl.materialize(_deferred_linear(), device="hpu"), id="materialize(device='hpu')"),
        pytest.param(lambda: tl.lazy(3, x=lambda x: 1), id="lazy(3)"),  # type: ignore[call-overload]
        pytest.param(lambda: tl.lazy(nn.Linear(2, 2), in_features=lambda x: 1), id="lazy(instance)"),  # type: ignore[call-overload]
        pytest.param(lambda: tl.lazy(nn.Linear, in_features=3), id="lazy(rule=3)"),
        pytest.param(lambda: tl.lazy(nn.Linear), id="lazy-without-rules"),
        pytest.param(lambda: tl.is_built(3), id="is_built(3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.is_deferred(3), id="is_deferred(3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.deferred_tensors(3), id="deferred_tensors(3)"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.deferred(concretize="x").__enter__(), id="deferred(concretize='x')"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.Spec("a"), id="Spec('a')"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.Spec(-1), id="Spec(-1)"),
        pytest.param(lambda: tl.Spec(2, dtype="float32"), id="Spec(dtype='float32')"),  # type: ignore[arg-type]
        pytest.param(lambda: tl.Spec(2, device="bogus"), id="Spec(device='bogus')"),
    ],
)
def test_bad_arguments_of_every_public_function_are_lazy_errors(
    call: Callable[[], object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tl.LazyError):
        call()
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: tl.build(nn.Sequential(tl.nn.Linear(2)), tl.Spec(1, 3), dtype=torch.int8), "`tl.build`"),
        (lambda: tl.build(nn.Sequential(tl.nn.Linear(2)), tl.Spec(1, 3), device="meta"), "`tl.build`"),
        (lambda: tl.save({"a": torch.zeros(1)}, "x.safetensors"), "`tl.save(model, path)` takes a torch.nn.Module"),  # type: ignore[arg-type]
    ],
    ids=["build-int8", "build-meta", "save-dict"],
)
def test_errors_name_the_function_the_user_called(call: Callable[[], object], named: str) -> None:
    # `tl.build`'s device/dtype errors said `tl.materialize` (checked late, by the materialize it calls, after
    # shaping); `tl.save` of a state dict said `tl.is_deferred` takes a module
    with pytest.raises(tl.ArgumentError) as caught:
        call()
    assert str(caught.value).startswith(named)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: tl.build(m, tl.Spec(2, 3)),
        lambda m: tl.summary(m, tl.Spec(2, 3)),
        lambda m: tl.estimate_memory(m, tl.Spec(2, 3)),
    ],
    ids=["build", "summary", "estimate_memory"],
)
def test_torchs_own_lazy_layers_are_refused_pointing_to_tl_nn(call: Callable[[nn.Module], object]) -> None:
    # shaping them on fake inputs failed inside them with "found at least two devices, cpu and meta"
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with pytest.raises(tl.LazyError, match=r"PyTorch's own `LazyLinear`.*Use `tl.nn.Linear`"):
        call(model)
    assert model[0].has_uninitialized_params()


def test_summary_without_inputs_shows_torchs_lazy_layers_as_unknown() -> None:
    table = str(tl.summary(nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2))))  # raised torch's RuntimeError
    assert "LazyLinear" in table and "Total params: ?" in table


def test_estimate_memory_takes_mapping_inputs_and_tensor_optimizer_arguments() -> None:
    # a tokenizer's BatchEncoding (a UserDict) was refused as "not a dict"; `lr=torch.tensor(1e-3)`, which torch's
    # optimizers take, was read inside the fake step and failed as a ShapeError
    from types import MappingProxyType

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    plain = tl.estimate_memory(Keyed(), example_kwargs={"x": tl.Spec(2, 4)})
    assert tl.estimate_memory(Keyed(), example_kwargs=MappingProxyType({"x": tl.Spec(2, 4)})).peak == plain.peak
    with_tensor = tl.estimate_memory(Keyed(), example_kwargs={"x": tl.Spec(2, 4)}, lr=torch.tensor(1e-3))
    assert with_tensor.peak == plain.peak


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_an_autocast_dtype_the_device_does_not_take_is_a_cost_error_not_a_false_label() -> None:
    # torch warns and switches autocast off for float64 on the CPU: the estimate was labelled "autocast float64"
    with pytest.raises(tl.CostError, match="switch itself off"):
        tl.estimate_memory(nn.Linear(2, 2), tl.Spec(1, 2), autocast=torch.float64)


# -- 6. tl.build with a Spec agrees with the real first call on dtypes --------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: tl.nn.GroupNorm(0), lambda: tl.nn.Linear(-3), lambda: tl.nn.Linear("a")],
    ids=["gn0", "lin-3", "lin-a"],
)
def test_constructor_arguments_no_input_can_build_are_an_argument_error(make: Callable[[], nn.Module]) -> None:
    # the first call blamed the input ("pass an input whose sizes suit the other arguments"), or let torch's
    # ZeroDivisionError escape (GroupNorm(0))
    layer = make()
    with pytest.raises(tl.ArgumentError, match="no input can build it with the arguments it was constructed with"):
        layer(torch.zeros(2, 8, 6))
    assert not tl.is_built(layer)


def test_an_input_the_arguments_do_not_suit_is_still_a_shape_error() -> None:
    layer = tl.nn.GroupNorm(3)  # 9 channels would build it: the input is at fault
    with pytest.raises(tl.ShapeError, match="must be divisible by num_groups"):
        layer(torch.zeros(2, 8, 6))
    assert layer(torch.zeros(2, 9, 6)).shape == (2, 9, 6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64], ids=str)
@pytest.mark.parametrize(
    "first_call",
    [
        lambda m, dt: m(torch.ones(2, 5, dtype=dt)),
        lambda m, dt: tl.build(m, tl.Spec(2, 5, dtype=dt)),
        lambda m, dt: tl.summary(m, tl.Spec(2, 5, dtype=dt)),
        lambda m, dt: tl.build(m, torch.ones(2, 5, dtype=dt)),
    ],
    ids=["real", "build(Spec)", "summary(Spec)", "build(tensor)"],
)
def test_a_wrong_input_dtype_is_the_same_dtype_error_real_or_fake(
    first_call: Callable[[nn.Module, torch.dtype], object], dtype: torch.dtype
) -> None:
    model = nn.Sequential(tl.nn.Linear(3), nn.ReLU(), tl.nn.Conv1d(2, 1))
    check = _unchanged(model)
    with pytest.raises(
        tl.DtypeError, match=rf"`0` \(Linear\) holds torch.float32 parameters but its first input is {dtype}"
    ):
        first_call(model, dtype)
    check()


def test_integer_inputs_where_integers_belong_still_build() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), tl.nn.Linear(3))
    tl.build(model, tl.Spec(2, 5, dtype=torch.int64))
    assert model[1].in_features == 4
    plain = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(tl.ShapeError, match=r"`mm` needs operands of one dtype, but got int64 and float32|addmm"):
        tl.build(plain, tl.Spec(2, 5, dtype=torch.int64))  # a built model: checked as the real kernel would


# -- 4. is_built is about shapes, is_deferred about values ---------------------------------------


def test_is_built_means_every_shape_is_known_and_is_deferred_that_values_are_not_made() -> None:
    with tl.deferred():
        plain = nn.Linear(5, 3)
        lazy = nn.Sequential(tl.nn.Linear(3))
    assert (tl.is_built(plain), tl.is_deferred(plain)) == (True, True)
    assert (tl.is_built(lazy), tl.is_deferred(lazy)) == (False, True)
    tl.build(lazy, tl.Spec(2, 5))
    tl.materialize(plain)
    assert (tl.is_built(lazy), tl.is_deferred(lazy)) == (True, False)
    assert (tl.is_built(plain), tl.is_deferred(plain)) == (True, False)


FILLS_EAGER_REFUSES: dict[str, Callable[[], object]] = {
    "normal_ into int64": lambda: torch.empty(3, dtype=torch.int64).normal_(),
    "uniform_ into bool": lambda: torch.empty(3, dtype=torch.bool).uniform_(),
    "normal_ into an expanded view": lambda: torch.empty(3, 1).expand(3, 4).normal_(),
    "fill_ float16 past its range": lambda: torch.empty(3, dtype=torch.float16).fill_(1e10),
    "fill_ int8 past its range": lambda: torch.empty(3, dtype=torch.int8).fill_(300),
    "fill_ uint8 below -255": lambda: torch.empty(3, dtype=torch.uint8).fill_(-256),
    "fill_ int32 with nan": lambda: torch.empty(3, dtype=torch.int32).fill_(float("nan")),
    "fill_ complex64 past float32": lambda: torch.empty(3, dtype=torch.complex64).fill_(1e39),
    # found by review: complex values, a draw's numbers, and tensors without elements
    "fill_ float32 with an imaginary part": lambda: torch.empty(3).fill_(1 + 2j),
    "fill_ int32 with an imaginary part": lambda: torch.empty(3, dtype=torch.int32).fill_(1 + 2j),
    "fill_ empty float32 with an imaginary part": lambda: torch.empty(0).fill_(1 + 2j),
    "fill_ complex64 imaginary part past float32": lambda: torch.empty(3, dtype=torch.complex64).fill_(1e39j),
    "fill_ int32 with 1e10+0j": lambda: torch.empty(3, dtype=torch.int32).fill_(1e10 + 0j),
    "uniform_ from above to": lambda: torch.empty(3).uniform_(2, 1),
    "uniform_ from above to, no elements": lambda: torch.empty(0).uniform_(2, 1),
    "uniform_ to past float32": lambda: torch.empty(3).uniform_(0, 1e39),
    "uniform_ from -inf": lambda: torch.empty(3, dtype=torch.float64).uniform_(float("-inf"), 0),
    "uniform_ to nan": lambda: torch.empty(3).uniform_(0, float("nan")),
    "uniform_ to past float16": lambda: torch.empty(3, dtype=torch.float16).uniform_(0, 70000),
    "uniform_ into int32, no elements": lambda: torch.empty(0, dtype=torch.int32).uniform_(),
    "normal_ std below 0": lambda: torch.empty(3).normal_(0, -1),
    "normal_ std below 0, no elements": lambda: torch.empty(0).normal_(0, -1),
    "normal_ std nan": lambda: torch.empty(3).normal_(0, float("nan")),
    "bernoulli_ p above 1": lambda: torch.empty(20).bernoulli_(1.5),
    "bernoulli_ p below 0": lambda: torch.empty(20).bernoulli_(-0.1),
    "random_ uint8 from below 0": lambda: torch.empty(3, dtype=torch.uint8).random_(-1, 5),
    "random_ uint8 to past 256": lambda: torch.empty(3, dtype=torch.uint8).random_(0, 300),
    "random_ from above to": lambda: torch.empty(3).random_(5, 2),
    "random_ to 0": lambda: torch.empty(3, dtype=torch.int64).random_(0),
    "random_ float16 to past 65504": lambda: torch.empty(3, dtype=torch.float16).random_(0, 70000),
    "random_ float32 from 2**25 to its top": lambda: torch.empty(3).random_(2**25, None),
}
FILLS_EAGER_TAKES: dict[str, Callable[[], object]] = {
    "fill_ uint8 with -1 (wraps)": lambda: torch.empty(3, dtype=torch.uint8).fill_(-1),
    "fill_ float16 with inf": lambda: torch.empty(3, dtype=torch.float16).fill_(float("inf")),
    "fill_ bfloat16 with nan": lambda: torch.empty(3, dtype=torch.bfloat16).fill_(float("nan")),
    "zero_ of an expanded view": lambda: torch.empty(3, 1).expand(3, 4).zero_(),
    "normal_ into complex64": lambda: torch.empty(3, dtype=torch.complex64).normal_(),
    "normal_ into int32, no elements": lambda: torch.empty(0, dtype=torch.int32).normal_(),
    "normal_ into an expanded view without elements": lambda: torch.empty(3, 0).expand(3, 0).normal_(),
    "normal_ std inf": lambda: torch.empty(3).normal_(0, float("inf")),
    "uniform_ from equal to": lambda: torch.empty(3).uniform_(1, 1),
    "uniform_ into complex64": lambda: torch.empty(3, dtype=torch.complex64).uniform_(),
    "fill_ complex64 with a complex value": lambda: torch.empty(3, dtype=torch.complex64).fill_(1 + 2j),
    "fill_ int32 with 1+0j": lambda: torch.empty(3, dtype=torch.int32).fill_(1 + 0j),
    "fill_ bool with 1+2j": lambda: torch.empty(3, dtype=torch.bool).fill_(1 + 2j),
    "bernoulli_ p 1": lambda: torch.empty(20).bernoulli_(1.0),
    "random_ uint8 to 256": lambda: torch.empty(3, dtype=torch.uint8).random_(0, 256),
    "random_ bool to 2": lambda: torch.empty(3, dtype=torch.bool).random_(0, 2),
    "random_ int8 to 5": lambda: torch.empty(3, dtype=torch.int8).random_(5),
    "random_ empty int32 from -2**63 to its top": lambda: torch.empty(0, dtype=torch.int32).random_(-(2**63), None),
}


@pytest.mark.parametrize("name", list(FILLS_EAGER_REFUSES))
def test_a_fill_eager_refuses_is_refused_at_once_under_deferred(name: str) -> None:
    """Meta kernels let these pass; replay would fail only at materialize. They fail where eager does, as
    torchlazy errors that are also the RuntimeError eager raises."""
    with pytest.raises(RuntimeError):
        FILLS_EAGER_REFUSES[name]()
    with pytest.raises((tl.DtypeError, tl.ShapeError, tl.DeferredError), match="during deferred construction"):
        with tl.deferred():
            FILLS_EAGER_REFUSES[name]()


AFTER_THE_BLOCK: dict[str, Callable[[torch.Tensor], object]] = {
    "uniform_ from above to": lambda t: t.uniform_(2, 1),
    "uniform_ to past float32": lambda t: t.uniform_(0, 1e39),
    "normal_ std below 0": lambda t: t.normal_(0, -1),
    "fill_ with an imaginary part": lambda t: t.fill_(1 + 2j),
}


@pytest.mark.parametrize("name", list(AFTER_THE_BLOCK))
def test_a_fill_eager_refuses_is_refused_on_a_deferred_tensor_after_its_block(name: str) -> None:
    with pytest.raises(RuntimeError):
        AFTER_THE_BLOCK[name](torch.empty(3))
    with tl.deferred():
        holder = nn.Module()
        holder.register_buffer("t", torch.empty(3))
    with pytest.raises((tl.DtypeError, tl.DeferredError), match="after its `tl.deferred"):
        AFTER_THE_BLOCK[name](holder.t)
    holder.t.fill_(7.0)  # the refused op left the record as it was: the next op records, materialize replays
    assert torch.equal(tl.materialize(holder).t, torch.full((3,), 7.0))


@pytest.mark.parametrize("name", list(FILLS_EAGER_TAKES))
def test_a_fill_eager_takes_is_taken_under_deferred(name: str) -> None:
    FILLS_EAGER_TAKES[name]()
    with tl.deferred():
        FILLS_EAGER_TAKES[name]()


@pytest.mark.parametrize(
    "args", [((100,), (1,)), ((2,), (1,), 23), ((2,), (1,), 22), ((0,), (1,), 30), ((3,), (0,), 23), ((6, 4), (1, 6))]
)
def test_as_strided_past_the_storage_is_refused_where_eager_refuses(args: tuple[object, ...]) -> None:
    """Inside the block, after it, and on a view (its storage offset is the default one)."""

    def outcome(make: Callable[[], torch.Tensor]) -> bool:
        try:
            make()
        except RuntimeError:
            return False
        return True

    eager = torch.empty(4, 6)
    with tl.deferred():
        deferred = torch.empty(4, 6)
        inside = outcome(lambda: torch.empty(4, 6).as_strided(*args))
    assert inside == outcome(lambda: eager.as_strided(*args))
    assert outcome(lambda: deferred.as_strided(*args)) == inside
    assert outcome(lambda: deferred[1:].as_strided(*args)) == outcome(lambda: eager[1:].as_strided(*args))
    with pytest.raises(tl.ShapeError, match="storage"):
        deferred.as_strided((25,), (1,))


def test_materialize_refuses_parameters_with_views_alive_and_changes_nothing() -> None:
    """torch refuses to swap a tensor whose views are alive: materialize swapped the parameters before, then
    failed with torch's RuntimeError half-way (`0.*` real, `1.*` deferred). Now it asks first, names the
    parameter, and leaves the model as it was; without the view it materializes exactly."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    torch.manual_seed(0)
    with tl.deferred():
        model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    row = model[1].weight[0]
    with pytest.raises(tl.DeferredError, match=r"`1\.weight`.*view"):
        tl.materialize(model)
    assert tl.deferred_tensors(model) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    del row
    tl.materialize(model)
    assert_models_identical(model, eager)


class _BufferViews(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(6.0))
        self.register_buffer("window", self.table[2:4])  # the model's own view of its buffer: kept a view


def test_a_view_of_a_buffer_held_outside_the_model_is_refused_the_models_own_views_are_kept() -> None:
    # a user-held view of a buffer was accepted: afterwards it still read the deferred tensor's values (ones
    # after `running_var.fill_(5)`), where eager's view follows the buffer
    with tl.deferred():
        norm = nn.BatchNorm1d(4)
    row = norm.running_var[0:2]
    with pytest.raises(tl.DeferredError, match=r"`running_var`.*view"):
        tl.materialize(norm)
    assert tl.is_deferred(norm.running_var)
    del row
    tl.materialize(norm)
    views = tl.materialize(_deferred_of(_BufferViews))
    views.table.fill_(5.0)
    assert views.window.tolist() == [5.0, 5.0]


def _deferred_of(make: Callable[[], nn.Module]) -> nn.Module:
    with tl.deferred():
        return make()


class _KeepsATranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.wt = self.linear.weight.t()  # a view of its parameter, kept as an attribute


def test_materialize_refuses_a_module_attribute_viewing_a_parameter() -> None:
    """A view of a parameter kept as a plain attribute: torch's own error before (`Can't detach views in-place`,
    or a use_count), now a DeferredError that says what to do, the model still deferred."""
    with tl.deferred():
        model = _KeepsATranspose()
    with pytest.raises(tl.DeferredError, match=r"`linear\.weight`.*self\.wt = self\.weight\.t\(\)"):
        tl.materialize(model)
    assert tl.is_deferred(model.linear.weight)


def test_a_weakly_referenced_parameter_with_a_view_alive_is_put_in_place_not_refused() -> None:
    """What `swap_all` does not swap (a weakly referenced parameter, put in place by reference) is not asked
    about either: the check refused it (a regression of the check)."""
    import weakref

    with tl.deferred():
        model = _KeepsATranspose()
    watcher = weakref.ref(model.linear.weight)
    tl.materialize(model)
    assert not tl.is_deferred(model) and watcher is not None


def test_writing_a_deferred_value_into_a_real_tensor_is_refused() -> None:
    """`real.add_(deferred)`, `real.copy_(deferred)`, `real[0] = deferred[0]`: the write ran on fake stand-ins and the
    real tensor silently kept its old values (eager changes them). Refused, the real tensor untouched."""
    with tl.deferred():
        model = nn.Linear(3, 3)
    real = torch.zeros(3, 3)
    writes = [
        lambda: real.add_(model.weight),
        lambda: real.copy_(model.weight),
        lambda: real.__setitem__(0, model.weight[0]),
    ]
    for write in writes:
        with torch.no_grad(), pytest.raises(tl.DeferredError, match="writes into a real tensor"):
            write()
    assert not real.any()
    table = torch.zeros(3)
    with pytest.raises(tl.DeferredError, match="during deferred construction"):
        with tl.deferred():
            layer = nn.Linear(3, 3)
            with torch.no_grad():
                table.copy_(layer.weight[0])  # a module-level tensor, registered as a buffer after
    assert not table.any()
    with tl.deferred():
        nn.Linear(3, 3)
        table.add_(1)  # real tensors alone: made for real, as eager makes it (it was refused)
    assert torch.equal(table, torch.ones(3))
    with pytest.raises(tl.DeferredError, match="writes into a real tensor"):
        with tl.deferred():
            nn.Linear(3, 3)
            table.normal_()  # a draw: the generator is a stand-in in the block
    assert torch.equal(table, torch.ones(3))
    table = torch.arange(6.0).reshape(2, 3)
    with tl.deferred():
        holder = nn.Linear(2, 2)
        table.t_()  # a shape change of a real tensor alone: runs as eager runs it (torch's fake mode asserted)
        holder.register_buffer("c", table.clone())
    tl.materialize(holder)
    assert table.shape == (3, 2) and torch.equal(holder.c, torch.arange(6.0).reshape(2, 3).t())
    pretrained = torch.randn(5, 3)
    kept = pretrained.clone()
    through_views = [
        lambda e: e.weight[0].zero_(),  # the write was lost: the model kept the row, eager zeroes it
        lambda e: e.weight.__setitem__((slice(None), 1), 5.0),
        lambda e: torch.nn.init.ones_(e.weight.data[1]),
        lambda e: e.weight.narrow(0, 0, 2).copy_(torch.ones(2, 3)),
        lambda e: e.weight.unbind(0)[0].zero_(),  # views the first version did not know (any op whose output
        lambda e: e.weight.diagonal().zero_(),  # aliases its input, by its schema)
        lambda e: e.weight.view(torch.int32)[0].zero_(),
    ]
    for write in through_views:
        with pytest.raises(tl.DeferredError, match=r"through a view of shape .* of a real tensor"):
            with tl.deferred():
                embedding = nn.Embedding.from_pretrained(pretrained, freeze=False)
                with torch.no_grad():
                    write(embedding)
        assert torch.equal(pretrained, kept)


def test_a_forward_failing_on_the_examples_is_one_error_without_torchs_traceback_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fake-tensor mode logged a traceback for the failing meta kernel before torchlazy's ShapeError."""
    model = nn.Linear(4, 3)
    for call in (lambda: tl.summary(model, tl.Spec(2, 5)), lambda: tl.estimate_memory(model, tl.Spec(2, 5))):
        with caplog.at_level("DEBUG"), pytest.raises(tl.ShapeError, match="fails on the example inputs"):
            call()
    assert not [r for r in caplog.records if "meta" in r.getMessage()], caplog.text
    assert not logging.getLogger("torch._subclasses.fake_tensor").disabled  # put back


class _Peek(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = tl.nn.Linear(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = self.inner.weight.shape
        return x


def test_not_built_errors_name_the_path_in_the_model_whose_forward_runs() -> None:
    """A module shared by two models: the path is the one in the model running (the forwards' `self` chain comes
    first), not in another model a frame happens to hold."""
    shared = _Peek()
    student = nn.Sequential(shared)
    teacher = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), shared))
    with pytest.raises(tl.NotBuiltError, match=r"`0\.inner\.weight`"):
        student(torch.ones(2, 3))
    assert teacher[1][1] is shared


def test_copy_into_a_placeholder_keeps_torchs_own_errors() -> None:
    """Copies between placeholders stay torch's (its in-place-on-a-leaf error too); a real value into one is a
    NotBuiltError, whatever its shape."""
    a, b = tl.nn.Linear(3), tl.nn.Linear(3)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        a.weight.copy_(b.weight)
    with torch.no_grad():
        a.weight.copy_(b.weight)  # placeholder to placeholder: nothing to copy, as torch allows
        with pytest.raises(tl.NotBuiltError, match="copy_"):
            a.bias.copy_(torch.tensor(0.5))  # a scalar broadcasts into torch's (0,): the value was dropped silently


def test_not_built_errors_name_the_path_in_the_model_a_function_was_handed_not_a_guess() -> None:
    """A function handed one model names the path in it; a frame holding two models that share the layer does not
    say which one is meant: no path is guessed (the teacher's path was given for the student's layer)."""
    shared = _Peek()
    student = nn.Sequential(shared)
    teacher = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), shared))

    def use(model: nn.Module) -> None:
        _ = model[0].inner.weight.shape

    with pytest.raises(tl.NotBuiltError, match=r"`0\.inner\.weight`"):
        use(student)
    with pytest.raises(tl.NotBuiltError, match=r"^`weight` of Linear"):
        _ = student[0].inner.weight.shape
    assert teacher[1][1] is shared


def test_handed_paths_are_in_the_widest_model_the_calls_were_handed() -> None:
    """`shard(model)` calling `fully_shard(layer)` per layer: the path was taken in the layer (`inner.weight`); a layer
    shared by two unrelated models whose paths happen to end alike got the other model's path."""
    model = nn.Sequential(nn.Identity(), nn.Sequential(_Peek(), _Peek()))

    def per_layer(layer: nn.Module) -> None:
        _ = layer.inner.weight.shape

    def shard(model: nn.Module) -> None:
        for layer in model[1]:
            per_layer(layer)

    with pytest.raises(tl.NotBuiltError, match=r"`1\.0\.inner\.weight`"):
        shard(model)
    shared = tl.nn.Linear(4)
    student, teacher = nn.Module(), nn.Module()
    student.proj = shared
    teacher.enc = nn.Module()
    teacher.enc.proj = shared

    def step(student: nn.Module, teacher: nn.Module) -> None:
        _ = student.proj.weight.shape

    with pytest.raises(tl.NotBuiltError, match=r"^`weight` of Linear"):
        step(student, teacher)


def test_writes_through_data_of_an_unbuilt_placeholder_in_a_block_are_dropped_as_torch_drops_them() -> None:
    """transformers' `_init_weights` writes `m.weight.data.normal_()` into every Linear, lazy ones included: the
    refusal of writes through views of real tensors took the placeholder's `.data` for one."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = tl.nn.Linear(4)
            self.norm = tl.nn.LayerNorm()
            for m in (self.proj, self.norm):
                m.weight.data.normal_(0, 0.02) if m is self.proj else m.weight.data.fill_(1.0)
                m.bias.data.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.proj(x))

    with tl.deferred():
        model = Head()
    tl.build(model, tl.Spec(2, 3))
    assert not tl.is_deferred(model) and model.proj.weight.shape == (4, 3)


def test_handed_paths_are_not_guessed_from_the_order_of_local_variables() -> None:
    """A layer two models in one outer frame hold at different paths: the first model defined gave the path."""
    shared = nn.Sequential(tl.nn.Linear(3))
    teacher = nn.Sequential(shared)
    student = nn.Sequential(nn.Identity(), nn.Sequential(shared))

    def touch(module: nn.Module) -> None:
        _ = module[0].weight.shape

    with pytest.raises(tl.NotBuiltError, match=r"^`weight` of Linear"):
        touch(student[1][0])
    assert teacher[0] is shared


def test_a_real_tensor_given_a_deferred_ones_memory_by_data_is_named_as_such() -> None:
    """transformers' `tie_weights` after `load_state_dict(assign=True)` inside a block pads a real bias with
    `bias.data = F.pad(bias.data, ...)`: the result is deferred, and `.data =` gives its memory to the real tensor
    without any dispatch. The materialize error said to build the model outside `torch.device('meta')`."""
    bias = torch.ones(2)
    with tl.deferred():
        layer = nn.Linear(2, 2)
        layer.bias = nn.Parameter(bias)
        layer.bias.data = torch.nn.functional.pad(layer.bias.data, (0, 0))
    with pytest.raises(tl.DeferredError, match=r"`bias` took a deferred tensor's memory by `\.data =`"):
        tl.materialize(layer)


def test_a_real_shape_change_in_a_block_is_seen_by_the_ops_after_it() -> None:
    """`real.t_()` runs for real; the fake mode's cached stand-in of `real` kept the old shape, and the ops after it
    used that (a product of shape (2, 3) where eager's is (3, 2), silently)."""
    table = torch.arange(6.0).reshape(2, 3)
    with tl.deferred():
        layer = nn.Linear(2, 3)
        _ = table * 2  # gives `table` a stand-in
        table.t_()
        scaled = table * 1
        with torch.no_grad():
            layer.weight.copy_(table)
    assert scaled.shape == (3, 2)
    tl.materialize(layer)
    assert torch.equal(layer.weight, torch.arange(6.0).reshape(2, 3).t())
    with pytest.raises(tl.DeferredError, match="writes into a real tensor"):
        with tl.deferred():
            deferred = torch.zeros(2, 3)
            table.set_(deferred)  # a real tensor pointed at a deferred one's memory: refused, not torch's assert


def test_a_real_tensor_given_other_memory_is_not_read_with_its_old_shape() -> None:
    """`r.data = other` (no dispatch, no version bump): inside the block, the next op on `r` used the stand-in of
    its old shape (a (2, 3) result of a 4-element tensor, two values garbage); after the block, replay read the
    recorded shape over the new, smaller storage (heap garbage). The first now sees the new shape, the second is
    refused."""
    r, other = torch.arange(6.0).reshape(2, 3), torch.arange(4.0)
    with tl.deferred():
        module = nn.Linear(2, 2)
        _ = r * 1
        r.data = other
        module.register_buffer("y", r * 1)
    tl.materialize(module)
    assert torch.equal(module.y, torch.arange(4.0))
    r = torch.arange(6.0).reshape(2, 3)
    with tl.deferred():
        module = nn.Linear(2, 2)
        module.register_buffer("y", r * 1)
    r.data = torch.tensor([7.0])
    with pytest.raises(tl.DeferredError, match="was changed in place"):
        tl.materialize(module)
    r = torch.arange(6.0).reshape(2, 3)
    with tl.deferred():
        module = nn.Linear(2, 2)
        module.register_buffer("y", r * 1)
    r.share_memory_()  # other memory, the same layout and values: no change
    tl.materialize(module)
    assert torch.equal(module.y, torch.arange(6.0).reshape(2, 3))
    teacher = nn.Linear(3, 2).to(torch.bfloat16)
    with tl.deferred():
        student = nn.Linear(3, 2).to(torch.bfloat16)
        student.load_state_dict(teacher.state_dict())
    teacher.half()  # the same element size, another dtype: its bytes read as bfloat16 gave garbage
    with pytest.raises(tl.DeferredError, match="was changed in place"):
        tl.materialize(student)
    target = torch.zeros(6)
    with pytest.raises(tl.DeferredError, match="writes into a real tensor"):
        with tl.deferred():
            deferred = torch.zeros(2, 3)
            target.set_(deferred.untyped_storage(), 0, (6,))  # torch's device error about meta before
    assert torch.equal(target, torch.zeros(6))


def test_build_takes_dtype_names_as_materialize_does_and_a_missing_checkpoint_says_so(tmp_path: Path) -> None:
    """`tl.build(..., dtype="bf16")` raised torch's raw TypeError after building and materializing the model; a
    checkpoint path that does not exist was called an unknown format; `flops=True` without inputs named only
    `tl.estimate_memory`."""
    net = nn.Sequential(tl.nn.Linear(3), nn.ReLU(), tl.nn.Linear(2))
    tl.build(net, tl.Spec(2, 5), dtype="bf16")
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    with tl.deferred():
        plain = nn.Linear(3, 2)
    with pytest.raises(tl.CheckpointError, match="does not exist"):
        tl.materialize(plain, checkpoint=tmp_path / "nowhere")
    assert tl.is_deferred(plain)
    with pytest.raises(tl.ShapeError, match="tl.summary"):
        tl.summary(nn.Linear(3, 2), flops=True)
