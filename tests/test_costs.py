"""FLOPs and training memory before allocation, against PyTorch's own counters on real tensors.

References, run on the real model in the same test:
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` on a real forward (and forward + backward);
- memory: `torch.distributed._tools.mem_tracker.MemTracker` on a real steady-state step (a first
  step creates the optimizer state; the second is measured, as `tl.estimate_memory` does).
MemTracker counts storage bytes on CPU (no allocator rounding), as the estimate does; the
transformers models, the convnet and the autocast / bf16 variants agree to the byte or within
0.01%; the assertion is the issue's 5%. LSTM training is the known exception (see its test).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zoo
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

import torchlazy as tl

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("TORCHLAZY_REGEN") == "1"
TOLERANCE = 0.05


def check_golden_strict(name: str, text: str) -> None:
    """Compare with a saved output; a missing file fails (regenerate only with TORCHLAZY_REGEN=1)."""
    path = GOLDEN / name
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"golden file {name} is missing; create it with TORCHLAZY_REGEN=1 and review it"
    assert text == path.read_text(), f"{name} changed; rerun with TORCHLAZY_REGEN=1 if intended"


# -- models (big enough that activations, not bookkeeping, make the peak) ---------------------------


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=1, n_embd=128, n_head=4, vocab_size=512, n_positions=64)
    cfg._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(cfg)


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg)


def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=4, vocab_size=512
    )
    cfg._attn_implementation = "sdpa"
    return transformers.BertForMaskedLM(cfg)


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 32))


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "gpt2": (gpt2, tokens),
    "llama": (llama, tokens),
    "bert": (bert, tokens),
    "convnet": (convnet, lambda: torch.randn(8, 3, 32, 32)),
    "lstm": (Recurrent, lambda: torch.randn(4, 10, 32)),
}


def loss_of(out: Any) -> torch.Tensor:
    """The estimate's default loss: the first floating output, summed."""
    logits = out if isinstance(out, torch.Tensor) else out[0]
    return logits.sum()


def measured_peak(
    model: nn.Module, x: torch.Tensor, *, train: bool = True, autocast: torch.dtype | None = None, **opt: Any
) -> int:
    """MemTracker's peak (bytes) of a real steady-state step (AdamW unless `opt` says otherwise)."""
    amp = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    if not train:
        mt = MemTracker()
        mt.track_external(model, x)
        with mt, torch.no_grad(), amp():
            model(x)
        return int(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    optimizer = opt.pop("cls", torch.optim.AdamW)(model.parameters(), **opt)

    def step() -> None:
        with amp():
            loss = loss_of(model(x))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    gc.collect()
    mt = MemTracker()
    mt.track_external(model, optimizer, x)
    with mt:
        step()
    return int(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    out = {}
    for name, (factory, example) in CASES.items():
        torch.manual_seed(0)
        out[name] = (factory(), example())
    return out


# -- FLOPs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_flops_equal_flop_counter_mode_on_a_real_forward(
    name: str, built: dict[str, tuple[nn.Module, torch.Tensor]]
) -> None:
    model, x = built[name]
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        forward = counter.get_total_flops()
        loss_of(out).backward()
    model.zero_grad(set_to_none=True)
    s = tl.summary(model, x, flops=True)
    assert (s.total_flops, s.total_flops_train) == (forward, counter.get_total_flops())
    assert s.total_flops == sum(r.flops or 0 for r in s.rows)  # own FLOPs add up to the total
    assert all(p.grad is None for p in model.parameters())


def test_flops_of_a_deferred_model_and_per_module_attribution() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        model = llama()
    s = tl.summary(model, tl.Spec(2, 32, dtype=torch.long), flops=True, depth=2)
    eager, x = llama(), tokens()
    with FlopCounterMode(display=False) as counter:
        eager(x)
    counts = counter.get_flop_counts()
    assert s.total_flops == counter.get_total_flops()
    rows = {r.path: r for r in s.rows}
    assert rows["lm_head"].flops == sum(counts["LlamaForCausalLM.lm_head"].values())
    assert rows["model.layers"].total_flops == sum(
        sum(counts[f"LlamaForCausalLM.model.layers.{i}"].values()) for i in range(1)
    )
    assert tl.is_deferred(model)


def test_a_float32_mixture_of_experts_is_counted_as_it_runs_on_the_cpu() -> None:
    """transformers' MoE layers call `_grouped_mm`, whose meta kernel demands bfloat16 (CUDA's rule) while the CPU
    kernel takes float32: summaries and estimates of a float32 Mixtral failed with a ShapeError blaming the inputs."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model, ids = MixtralForCausalLM(config), torch.randint(0, 128, (1, 8))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
    assert counter.get_total_flops() > 0
    s = tl.summary(model, input_ids=ids, flops=True)
    assert s.total_flops == counter.get_total_flops()
    rows = {r.path: r for r in s.rows}
    assert rows["lm_head"].outputs is not None and rows["lm_head"].outputs[0] == tuple(logits.shape)
    estimate = tl.estimate_memory(model, example_kwargs={"input_ids": ids})
    assert estimate.params == sum(p.numel() * 4 for p in model.parameters()) and estimate.peak > 3 * estimate.params


class _Experts(nn.Module):
    """Two experts as one grouped product, as transformers' MoE layers make it (`weight` sized by the test)."""

    def __init__(self, inner: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, inner, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.grouped_mm(x, self.weight, offs=torch.tensor([3, 6], dtype=torch.int32))


def test_a_mis_sized_grouped_product_is_a_shape_error_as_on_the_cpu() -> None:
    """The fake output of a float32 `_grouped_mm` follows the CPU kernel's checks: experts whose inner size does
    not match the tokens' fail there, and gave numbers here."""
    x = torch.randn(6, 8)
    with FlopCounterMode(display=False) as counter:
        assert _Experts(8)(x).shape == (6, 4)
    assert tl.summary(_Experts(8), x, flops=True).total_flops == counter.get_total_flops()
    with pytest.raises(RuntimeError, match="contraction"):
        _Experts(12)(x)
    with pytest.raises(tl.ShapeError, match="contraction"):
        tl.summary(_Experts(12), x, flops=True)


# -- memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "convnet"])
def test_training_peak_within_5_percent_of_memtracker(
    name: str, built: dict[str, tuple[nn.Module, torch.Tensor]]
) -> None:
    model, x = built[name]
    estimate = tl.estimate_memory(model, x, optimizer=torch.optim.AdamW)
    real = measured_peak(model, x)
    assert abs(estimate.peak - real) <= TOLERANCE * real, (estimate.peak, real)
    assert estimate.peak == sum(estimate.breakdown().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate.params == params and estimate.optimizer >= 2 * params
    inference = tl.estimate_memory(model, x, mode="inference")
    assert abs(inference.peak - measured_peak(model, x, train=False)) <= TOLERANCE * inference.peak
    assert inference.grads == inference.optimizer == 0


@pytest.mark.parametrize("variant", ["autocast", "bf16-model-sgd"])
def test_mixed_precision_bf16_and_other_optimizers(variant: str) -> None:
    torch.manual_seed(0)
    model, x = gpt2(), tokens()
    if variant == "autocast":
        estimate = tl.estimate_memory(model, x, autocast=torch.bfloat16)
        real = measured_peak(model, x, autocast=torch.bfloat16)
    else:
        model = model.to(torch.bfloat16)
        estimate = tl.estimate_memory(model, x, optimizer="sgd", lr=0.1, momentum=0.9)
        real = measured_peak(model, x, cls=torch.optim.SGD, lr=0.1, momentum=0.9)
        assert estimate.params == sum(p.numel() * 2 for p in model.parameters())
    assert abs(estimate.peak - real) <= TOLERANCE * real, (estimate.peak, real)


def test_lstm_training_misses_the_onednn_workspace(built: dict[str, tuple[nn.Module, torch.Tensor]]) -> None:
    """Known gap: on CPU `mkldnn_rnn_layer` returns a oneDNN workspace (e.g. 1.28 MB for a 128-wide layer
    over 20 steps of 8) whose fake kernel returns 0 bytes, so the training estimate is low by that much
    (-28% on that model).
    Inference has no workspace and is exact."""
    model, x = built["lstm"]
    estimate, real = tl.estimate_memory(model, x).peak, measured_peak(model, x)
    assert 0.5 * real < estimate < real
    inference = tl.estimate_memory(model, x, mode="inference")
    assert inference.peak == measured_peak(model, x, train=False)


def state_of(model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    return [(k, id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()]


def test_model_unchanged_eager_lazy_and_deferred() -> None:
    torch.manual_seed(0)
    eager = convnet().eval()
    before = state_of(eager)
    for mode in ("train", "inference"):
        tl.estimate_memory(eager, torch.randn(2, 3, 16, 16), mode=mode)
        tl.summary(eager, torch.randn(2, 3, 16, 16), flops=True)
    after = state_of(eager)
    assert [(k, i) for k, i, _ in before] == [(k, i) for k, i, _ in after]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(before, after))  # BatchNorm stats too
    assert not eager.training and all(p.grad is None for p in eager.parameters())

    lazy = zoo.cnn()
    m = tl.estimate_memory(lazy, tl.Spec(8, 3, 32, 32))
    assert not tl.is_built(lazy) and m.params == 5450 * 4

    torch.manual_seed(0)
    with tl.deferred():
        deferred = zoo.cnn()
    params = [id(p) for p in deferred.parameters()]
    assert tl.estimate_memory(deferred, tl.Spec(8, 3, 32, 32)).peak == m.peak
    assert tl.is_deferred(deferred) and not tl.is_built(deferred)
    tl.build(deferred, tl.Spec(8, 3, 32, 32))
    torch.manual_seed(0)  # still exact after estimates: nothing was drawn, nothing recorded
    with tl.deferred():
        again = zoo.cnn()
    tl.build(again, tl.Spec(8, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(deferred.state_dict().values(), again.state_dict().values()))
    tl.summary(deferred, tl.Spec(8, 3, 32, 32), flops=True)
    assert params  # (ids of deferred parameters change only at materialization)


def test_deferred_transformer_keeps_its_parameters() -> None:
    with tl.deferred():
        model = gpt2()
    params = {k: id(v) for k, v in model.named_parameters()}
    est = tl.estimate_memory(model, tl.Spec(2, 32, dtype=torch.long), autocast=torch.bfloat16)
    assert est.params == sum(p.numel() * 4 for p in model.parameters())
    assert {k: id(v) for k, v in model.named_parameters()} == params and tl.is_deferred(model)
    assert tl.deferred_tensors(model)[0] == "transformer.wte.weight"


# -- presentation ------------------------------------------------------------------------------------


def test_goldens_text_markdown_and_json() -> None:
    with tl.deferred():
        model = zoo.cnn()
    s = tl.summary(model, tl.Spec(8, 3, 32, 32), flops=True)
    m = tl.estimate_memory(model, tl.Spec(8, 3, 32, 32))
    check_golden_strict("costs_cnn.txt", f"{s}\n\n{m}\n")
    check_golden_strict("costs_cnn.md", f"{s.to_markdown()}\n\n{m.to_markdown()}\n")
    data = json.loads(json.dumps({"summary": s.to_dict(), "memory": m.to_dict()}))
    assert data["summary"]["total_flops"] == s.total_flops and data["memory"]["peak"] == m.peak
    assert data["summary"]["rows"][1]["outputs"] == [[8, 16, 32, 32]]
    # every category as `breakdown()` names it, in bytes (the optimizer's bytes were under `optimizer_state` and its
    # name under `optimizer`: found by review)
    assert {k: data["memory"][k] for k in m.breakdown()} == m.breakdown()
    assert data["memory"]["optimizer_name"] == "AdamW"


def test_listed_containers_show_dashes() -> None:
    with tl.deferred():
        model = gpt2()
    s = tl.summary(model, tl.Spec(1, 8, dtype=torch.long), flops=True, depth=2)
    line = next(x for x in str(s).splitlines() if x.startswith("transformer "))
    assert line.split()[-2:] == ["--", "--"]
    folded = next(x for x in str(s).splitlines() if x.strip().startswith("h "))
    assert "--" not in folded  # folded rows show their sub-tree's totals


# -- errors and the command line ---------------------------------------------------------------------


def test_bad_inputs_are_lazy_errors_that_say_what_to_do() -> None:
    net = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(tl.CostError, match=r"unknown optimizer `adamz`.*adamw"):
        tl.estimate_memory(net, tl.Spec(2, 4), optimizer="adamz")
    with pytest.raises(tl.CostError, match="optimizer class"):
        tl.estimate_memory(net, tl.Spec(2, 4), optimizer=torch.optim.SGD(net.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(tl.ShapeError, match=r"`0` \(Linear\) fails on the example inputs"):
        tl.estimate_memory(net, tl.Spec(2, 5))
    with pytest.raises(tl.ShapeError, match="needs example inputs"):
        tl.estimate_memory(net)
    with pytest.raises(tl.CostError, match="'train' or 'inference'"):
        tl.estimate_memory(net, tl.Spec(2, 4), mode="eval")
    with pytest.raises(tl.CostError, match="scalar"):
        tl.estimate_memory(net, tl.Spec(2, 4), loss=lambda out: out)
    with pytest.raises(tl.CostError, match="floating dtype"):
        tl.estimate_memory(net, tl.Spec(2, 4), autocast=torch.int8)
    with pytest.raises(tl.CostError, match="rejects the optimizer arguments"):
        tl.estimate_memory(net, tl.Spec(2, 4), betas=3)
    with pytest.raises(tl.CostError, match="torch.nn.Module"):
        tl.estimate_memory("model")  # type: ignore[arg-type]
    assert issubclass(tl.CostError, tl.LazyError)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command in-process (the subprocess path is covered by test_build_summary.py)."""
    from torchlazy.cli import main

    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_markdown_and_transformers_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, "summary", "zoo:cnn", "--input", "8x3x32x32", "--flops", "--memory", "--format", "markdown"
    )
    assert code == 0, err
    check_golden_strict("cli_costs_cnn.md", out)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    code, out, err = run_cli(
        capsys, "summary", str(tmp_path), "--input", "2x16:int64", "--flops", "--memory", "--format", "json"
    )
    assert code == 0, err
    data = json.loads(out)
    with tl.deferred():
        model = transformers.LlamaForCausalLM(config)
    x = tl.Spec(2, 16, dtype=torch.long)
    assert data["summary"]["total_flops"] == tl.summary(model, x, flops=True).total_flops
    assert data["memory"]["peak"] == tl.estimate_memory(model, x).peak


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--input", "2x3x8x8", "--memory", "--optimizer", "adamz"), "unknown optimizer `adamz`"),
        (("--flops",), "pass an example with --input"),
        (("--input", "2x3x8x8", "--format", "yaml"), "unknown --format"),
        (("--input", "2x3x8x8", "--memory", "--autocast", "bf17"), "unknown dtype"),
        (("--input", "2x3x8x8", "--optimizer", "sgd"), "add --memory"),  # ignored silently before
    ],
)
def test_cli_bad_arguments_exit_2(args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "summary", "zoo:cnn", *args)
    assert code == 2 and message in err and err.startswith("torchlazy: error:")


def test_cli_takes_a_module_instance_and_names_a_missing_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`MODULE:ATTRIBUTE` naming a module already made was called (a raw TypeError about its forward's arguments);
    a missing config.json was said to be a bad MODULE:CALLABLE."""
    code, out, err = run_cli(capsys, "summary", "zoo:CNN_INSTANCE", "--input", "2x3x8x8", "--flops", "--format", "json")
    assert code == 0, err
    expected = tl.summary(zoo.CNN_INSTANCE, tl.Spec(2, 3, 8, 8), flops=True).total_flops
    assert json.loads(out)["summary"]["total_flops"] == expected > 0
    code, _, err = run_cli(capsys, "summary", str(tmp_path / "missing" / "config.json"), "--input", "2x3")
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, "summary", "zoo:refuses", "--kwargs", '{"width": 7}')
    assert code == 4 and "`zoo:refuses(width=7)` raised ValueError: no model of width 7" in err  # said only "boom"


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        self.b = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.b(checkpoint(self.a, x, use_reentrant=True))


def test_reentrant_checkpointing_leaves_the_model_alone_and_counts_its_gradients() -> None:
    """A reentrant checkpoint's backward runs its module again: with the model's own parameters back in place by
    then, the estimate put fake gradients on them (a later real step silently trained other weights) and missed
    those gradients and their optimizer state."""
    model = _Checkpointed()
    x = torch.randn(32, 64, requires_grad=True)  # a reentrant checkpoint gives gradients only then, as in eager
    estimate = tl.estimate_memory(model, x)
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    assert estimate.grads == sum(p.numel() * p.element_size() for p in model.parameters())
    tl.summary(model, x, flops=True)
    assert all(p.grad is None for p in model.parameters())


class _KeepsItsLastOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.last = y.detach()  # kept for logging
        if "mask" not in self._buffers:
            self.register_buffer("mask", torch.ones_like(y), persistent=False)  # made on the first call
        return y


def test_what_the_forward_keeps_on_the_model_does_not_stay() -> None:
    """A forward that keeps a tensor on the module left a fake tensor there after an estimate (`torch.save(model)`
    then failed on it); the model is left as it was."""
    import io

    model = _KeepsItsLastOutput()
    tl.estimate_memory(model, torch.randn(2, 8))
    tl.summary(model, torch.randn(2, 8), flops=True)
    assert model.last is None and "mask" not in model._buffers
    torch.save(model, io.BytesIO())


def test_optimizer_and_loss_failures_are_cost_errors_not_shape_errors() -> None:
    """Errors past the forward (the optimizer's arguments or step, the loss) were reported as the examples'
    shapes (ShapeError naming the model's root)."""
    model, x = nn.Linear(4, 2), torch.randn(3, 4)
    with pytest.raises(tl.CostError, match="rejects the optimizer arguments"):
        tl.estimate_memory(model, x, optimizer="sgd", optimizer_kwargs={"lr": -1.0})
    with pytest.raises(tl.CostError, match=r"`LBFGS.step\(\)`"):
        tl.estimate_memory(model, x, optimizer=torch.optim.LBFGS)
    with pytest.raises(tl.CostError, match="the backward of the loss"):
        tl.estimate_memory(model, x, loss=lambda out: out.detach().sum())


def test_sparse_gradients_do_not_crash_the_estimate() -> None:
    # the gradient hook read `p.grad.untyped_storage()` unguarded: a sparse gradient (Embedding(sparse=True))
    # failed the backward as a CostError
    model = nn.Sequential(nn.Embedding(1000, 64, sparse=True), nn.Linear(64, 4))
    estimate = tl.estimate_memory(model, tl.Spec(8, 16, dtype=torch.int64), optimizer=torch.optim.SGD, lr=0.1)
    assert estimate.peak > estimate.params > 0


def test_a_forward_reading_a_value_is_a_cost_error_saying_so() -> None:
    # BatchNorm(momentum=None) reads num_batches_tracked: a ShapeError told the user to check the input shapes
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    with pytest.raises(tl.CostError, match="reads a tensor's value in its forward"):
        tl.estimate_memory(model, tl.Spec(2, 3, 8, 8))


class _Unpad(nn.Module):
    """Drops padding rows by a boolean attention mask, as packed-sequence models do, and zeroes them first."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.mlp = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h[~mask.bool()] = 0.0
        return self.mlp(h[mask.bool()])


def test_indexing_by_a_known_boolean_mask_is_counted_as_it_runs() -> None:
    """`h[mask.bool()]` with the mask given: its true elements decide the output's shape, known from the mask's
    values (the summary refused it, telling to call the model on a real batch)."""
    model = _Unpad()
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[0, :4] = 1
    mask[1, :2] = 1
    with FlopCounterMode(display=False) as counter:
        out = model(ids, mask)
    summary = tl.summary(model, ids, mask, flops=True)
    assert summary.rows[0].outputs == (tuple(out.shape),)
    assert summary.total_flops == counter.get_total_flops()
    estimate = tl.estimate_memory(model, ids, mask, optimizer=torch.optim.SGD)
    assert estimate.peak == sum(estimate.breakdown().values()) and estimate.activations > 0


def test_an_optimizer_reading_a_value_in_its_step_is_a_cost_error_saying_so() -> None:
    """Adafactor reads its step count: the error guessed at a closure or sparse gradients."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(tl.CostError, match="reads a tensor's value.*AdamW"):
        tl.estimate_memory(model, torch.randn(4, 8), optimizer=torch.optim.Adafactor)


def test_a_frozen_model_with_an_input_asking_for_its_gradient_counts_the_backward() -> None:
    """Saliency maps through a frozen model: the backward to the input ran for real, and was not counted."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    summary = tl.summary(model, x, flops=True)
    assert summary.total_flops_train == counter.get_total_flops() > summary.total_flops


def test_a_compiled_model_is_estimated_as_its_original() -> None:
    """`torch.compile(model)`: rows named `_orig_mod.*`, and dynamo traced the estimate's own hooks (9.6 s, with
    recompile warnings, for a three-layer model)."""
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    compiled = torch.compile(model)
    x = torch.randn(8, 64)
    summary = tl.summary(compiled, x, flops=True)
    assert [row.path for row in summary.rows] == [row.path for row in tl.summary(model, x).rows]
    assert summary.total_flops == tl.summary(model, x, flops=True).total_flops
    assert tl.estimate_memory(compiled, x).peak == tl.estimate_memory(model, x).peak


def test_a_boolean_mask_of_the_wrong_shape_is_a_shape_error_as_eager_raises() -> None:
    """A known mask is checked against the dimensions it indexes, as torch checks it (the summary reported a shape
    for a forward eager refuses)."""
    model = _Unpad()
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(IndexError):
        model(ids, mask)
    with pytest.raises(tl.ShapeError, match="shape of the mask"):
        tl.summary(model, ids, mask)
