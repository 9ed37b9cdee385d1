"""build() from Specs, summary() before allocation, and the command line, against saved outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zoo
from alloc import CountAllocations, state_bytes
from exact import assert_models_identical, assert_same_tensors
from models import MODELS
from torch import nn

import torchlazy as tl

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("TORCHLAZY_REGEN") == "1"


def check_golden(name: str, text: str) -> None:
    """Compare with a saved output; only `TORCHLAZY_REGEN=1` writes one (a missing file is a failure)."""
    path = GOLDEN / name
    if REGEN:
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: run the tests with TORCHLAZY_REGEN=1 to write it, then review it")
    assert text == path.read_text(), f"{name} changed; rerun with TORCHLAZY_REGEN=1 if intended"


def build_deferred_cnn_and_check_exact() -> tuple[nn.Module, CountAllocations]:
    with tl.deferred():  # the compiled draw kernels' calibration, once per process, is not the build's
        warm = zoo.cnn()
    tl.build(warm, tl.Spec(1, 3, 8, 8))
    torch.manual_seed(0)
    with tl.deferred():
        model = zoo.cnn()
    with CountAllocations() as allocations:
        tl.build(model, tl.Spec(2, 3, 32, 32))
    torch.manual_seed(0)
    assert_models_identical(model, zoo.cnn_eager())
    return model, allocations


def test_build_from_spec_is_exact_and_allocates_once() -> None:
    model, allocations = build_deferred_cnn_and_check_exact()
    # every real byte allocated during the build is a byte the model holds: one allocation per tensor
    assert allocations.nbytes == state_bytes(model) > 0, allocations.storages
    assert len(allocations.storages) == len(model.state_dict())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_build_without_deferred_inits_in_construction_order() -> None:
    torch.manual_seed(0)
    one = nn.Sequential(tl.nn.Linear(4), tl.nn.Linear(3))
    torch.manual_seed(5)
    tl.build(one, tl.Spec(2, 6))
    after_one = torch.random.get_rng_state()
    torch.manual_seed(0)
    two = nn.Sequential(tl.nn.Linear(4), tl.nn.Linear(3))
    torch.manual_seed(5)
    tl.build(two, {"x": tl.Spec(2, 6)}["x"])
    assert_models_identical(one, two)
    torch.manual_seed(5)
    eager = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    assert_models_identical(one, eager)  # drew from the live generator, in construction order
    assert_same_tensors(after_one, torch.random.get_rng_state(), "generator state")


def test_build_accepts_tensors_nested_examples_and_kwargs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tl.nn.Linear(3)
            self.b = tl.nn.Linear(3)

        def forward(self, pair: tuple[torch.Tensor, torch.Tensor], *, scale: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.a(pair[0]) + self.b(pair[1]) * scale["s"]

    m = Two()
    tl.build(m, (tl.Spec(2, 5), torch.randn(2, 7)), scale={"s": tl.Spec(2, 3)}, dtype=torch.float64)
    assert (m.a.in_features, m.b.in_features, m.a.weight.dtype) == (5, 7, torch.float64)


def test_build_failure_names_module_and_rolls_back() -> None:
    with tl.deferred():
        model = nn.Sequential(tl.nn.Linear(4), nn.Linear(5, 2))  # 4 != 5
    with pytest.raises(tl.ShapeError, match=r"`1` \(Linear\) fails on the example"):
        tl.build(model, tl.Spec(2, 3))
    assert not tl.is_built(model) and repr(model[0]) == "Linear(in_features=?, out_features=4)"
    model[1] = nn.Linear(4, 2)
    tl.build(model, tl.Spec(2, 3))
    assert model[0].in_features == 3


def test_build_on_built_model_checks_shapes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    tl.build(model, tl.Spec(1, 3, 8, 8))
    with pytest.raises(tl.ShapeError, match=r"`2` \(Linear\)"):
        tl.build(model, tl.Spec(1, 3, 9, 9))


def test_data_dependent_forward_gets_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = tl.nn.Linear(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) if x.sum() > 0 else x

    with pytest.raises(tl.DeferredError, match="depends on tensor values"):
        tl.build(Branchy(), tl.Spec(2, 3))


def test_spec_validation() -> None:
    assert tl.Spec((2, 3)) == tl.Spec(2, 3)
    with pytest.raises(tl.ShapeError):
        tl.Spec(2, -1)


def test_summary_allocates_nothing_and_leaves_model_unchanged() -> None:
    with tl.deferred():
        model = zoo.cnn()
    before = repr(model)
    with CountAllocations() as allocations:
        s = tl.summary(model, tl.Spec(8, 3, 32, 32))
    assert allocations.storages == []
    with CountAllocations() as control:  # the same counter does see what eager construction allocates
        zoo.cnn_eager()
    assert control.nbytes > 20_000
    assert repr(model) == before and not tl.is_built(model)
    assert s.total_params == sum(p.numel() for p in zoo.cnn_eager().parameters())
    check_golden("summary_cnn.txt", str(s) + "\n")
    tl.build(model, tl.Spec(8, 3, 32, 32))  # a summary earlier leaves no trace on the build
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_summary_counts_tied_once_and_folds_depth() -> None:
    with tl.deferred():
        model = MODELS["gpt2"]()
    s = tl.summary(model, depth=2)
    eager = MODELS["gpt2"]()
    assert s.total_params == sum(p.numel() for p in eager.parameters())  # parameters() dedups ties
    assert any(r.tied_to for r in s.rows)
    check_golden("summary_gpt2_depth2.txt", str(s) + "\n")
    assert "<table>" in s._repr_html_()


def test_summary_of_unbuilt_model_shows_unknowns() -> None:
    s = tl.summary(zoo.cnn())
    assert s.total_params is None and "?" in str(s) and len(s.unknown) == 8
    check_golden("summary_unbuilt.txt", str(s) + "\n")


def cli_pythonpath() -> str:
    """The tree under test first (the directory holding the imported `torchlazy`), then the zoo, then the rest."""
    package_root = str(Path(tl.__file__).resolve().parents[1])
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([package_root, str(Path(__file__).parent), *kept])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": cli_pythonpath()}
    return subprocess.run(
        [sys.executable, "-m", "torchlazy", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_runs_the_torchlazy_under_test() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import torchlazy; print(torchlazy.__file__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": cli_pythonpath()},
        check=True,
    )
    assert Path(out.stdout.strip()).resolve() == Path(tl.__file__).resolve()


def test_cli_summary() -> None:
    out = run_cli("summary", "zoo:cnn", "--kwargs", '{"classes": 5}', "--input", "8x3x32x32")
    assert out.returncode == 0, out.stderr
    check_golden("cli_summary_cnn.txt", out.stdout)


def test_cli_materialize_writes_exact_seed_checkpoint(tmp_path: Path) -> None:
    out = run_cli(
        "materialize",
        "zoo:cnn",
        "--input",
        "1x3x32x32",
        "--seed",
        "7",
        "--dtype",
        "bf16",
        "--out",
        str(tmp_path / "c.safetensors"),
    )
    assert out.returncode == 0, out.stderr
    torch.manual_seed(7)
    reference = zoo.cnn_eager().to(torch.bfloat16)
    loaded = tl.materialize(nn.Sequential(*zoo.cnn()), checkpoint=tmp_path / "c.safetensors")
    assert_models_identical(loaded.to(torch.bfloat16), reference)
    tied = run_cli("materialize", "zoo:tied", "--out", str(tmp_path / "t"), "--max-shard-size", "1KB")
    assert tied.returncode == 0, tied.stderr
    index = json.loads((tmp_path / "t" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["emb.weight"]  # the tied head is stored once


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("summary", "zoo:cnn", "--input", "8xtwo"), 2, "bad --input"),
        (("summary", "zoo:cnn", "--input", "8x3:complex7"), 2, "unknown dtype"),
        (("summary", "zoo", "--input", "8x3"), 2, "MODULE:CALLABLE"),
        (("summary", "zoo:cnn", "--kwargs", "{nope"), 2, "not valid JSON"),
        (("summary", "no_such_module:f"), 3, "cannot import"),
        (("summary", "zoo:missing"), 3, "no attribute"),
        (("summary", "zoo:broken"), 4, "always fails"),
        (("materialize", "zoo:cnn", "--out", "x.safetensors"), 2, "pass --input"),
        (("materialize", "zoo:cnn_eager", "--out", "x", "--max-shard-size", "0"), 2, "--max-shard-size `0`"),
        (("materialize", "zoo:cnn_eager", "--out", "x.safetensors", "--seed", str(2**70)), 2, "--seed"),
        (
            ("materialize", "zoo:cnn_eager", "--out", "/proc/no/such/x.safetensors"),
            4,
            "cannot create the folder `/proc/no/such`",
        ),
        # an existing folder without --max-shard-size: a bad argument, said before the model is made (found by review)
        (("materialize", "zoo:broken", "--out", "/tmp"), 2, "--out `/tmp` is a folder"),
    ],
)
def test_cli_errors(args: tuple[str, ...], code: int, message: str) -> None:
    out = run_cli(*args)
    assert out.returncode == code and message in out.stderr and out.stderr.startswith("torchlazy: error:")


def test_summary_fast_meta_path_and_exact_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchlazy._summary as summary_module

    with tl.deferred():
        model = zoo.cnn()
    slow = str(tl.summary(model, tl.Spec(8, 3, 32, 32)))
    monkeypatch.setattr(summary_module, "fake_forward", lambda *a, **k: pytest.fail("fast path expected"))
    fast = str(tl.summary(model, tl.Spec(8, 3, 32, 32)))
    assert fast == slow and tl.is_deferred(model) and not tl.is_built(model)

    class Gather(nn.Module):  # needs the index values: only the exact path can run it
        def __init__(self) -> None:
            super().__init__()
            self.lin = tl.nn.Linear(3)

        def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.lin(x[idx.nonzero().squeeze(1)])

    monkeypatch.undo()
    s = tl.summary(Gather(), tl.Spec(5, 4), torch.tensor([1, 0, 1, 1, 0]))
    assert s.rows[1].inputs == ((3, 4),) and s.total_params == 15


def test_build_shapes_on_a_meta_twin_without_a_fake_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchlazy._infer as infer

    monkeypatch.setattr(infer, "fake_forward", lambda *a, **k: pytest.fail("meta twin expected"))
    build_deferred_cnn_and_check_exact()

    class Outer(nn.Module):  # a lazy class whose real constructor makes lazy layers: needs the fake forward too
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(channels, 4), tl.nn.LayerNorm())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    monkeypatch.undo()
    nested = nn.Sequential(tl.lazy(Outer, channels=lambda x: x.shape[-1])())
    tl.build(nested, tl.Spec(2, 6))
    assert tl.is_built(nested) and nested[0].inner[1].normalized_shape == (4,)


def test_build_without_examples_says_what_to_pass() -> None:
    with pytest.raises(tl.ShapeError, match=r"needs example inputs.*tl.Spec"):
        tl.build(nn.Sequential(tl.nn.Linear(3)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tl.materialize("model")  # type: ignore[arg-type]
    assert tl.build(nn.Linear(2, 2)) is not None  # nothing lazy: nothing needed


def test_summary_copies_no_tensor_a_module_keeps_in_a_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta twin deep-copied real tensors kept in dict attributes (a 400 MB lookup table: 400 MB more)."""

    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.tables = {"lut": torch.ones(4)}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    model = Tables()
    copied: list[torch.Tensor] = []
    original = torch.Tensor.__deepcopy__

    def watched(t: torch.Tensor, memo: dict[int, object]) -> torch.Tensor:
        copied.append(t)
        return original(t, memo)

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", watched)
    tl.summary(model, torch.randn(2, 8))
    assert not any(t is model.tables["lut"] for t in copied)


def test_integer_examples_that_are_views_of_one_another_build_and_summarize() -> None:
    """A seq2seq call passes `decoder_input_ids=input_ids[:, :5]`: small integer examples keep their values as
    constants, and torch's converter refused a constant over memory another example shares (a raw
    AssertionError from `tl.summary`, `tl.estimate_memory` and `tl.build`)."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 4)
            self.out = tl.nn.Linear(3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(a)).sum() + self.emb(b).sum()

    ids = torch.randint(0, 16, (2, 8))
    model = TwoInputs()
    tl.build(model, ids, ids[:, :5])
    assert model.out.weight.shape == (3, 4)
    rows = {row.path: row for row in tl.summary(model, ids, ids[:, :5]).rows}
    assert rows["out"].outputs is not None and rows["out"].outputs[0] == (2, 8, 3)
    assert tl.estimate_memory(model, ids, ids[:, :5]).params == sum(p.numel() * 4 for p in model.parameters())


def test_summary_of_an_eval_transformer_encoder_with_a_padding_mask() -> None:
    """Its forward takes PyTorch's nested-tensor fast path when autograd is off, which fake tensors cannot run: a
    summary run without autograd (to keep a leaked graph off the model's tensors) failed here. It runs on fresh
    fake tensors in place of the model's own instead, with autograd as the caller has it."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    s = tl.summary(encoder, tl.Spec(2, 5, 16), src_key_padding_mask=mask)
    assert s.total_params == sum(p.numel() for p in encoder.parameters())
    assert {r.path: r for r in s.rows}["layers.0"].outputs == ((2, 5, 16),)


def test_a_module_with_an_attribute_named_as_fsdps_is_not_taken_for_a_sharded_one() -> None:
    # found by review: any module with a `_get_fsdp_state` attribute was refused as sharded by fully_shard (and a
    # string there broke `tl.build`); FSDP's modules are known by their class
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = tl.nn.Linear(3)
            self._get_fsdp_state = "not FSDP's"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    model = Odd()
    assert tl.summary(model, tl.Spec(2, 5)).total_params == 18
    assert tl.estimate_memory(model, tl.Spec(2, 5)).params == 18 * 4
    tl.build(model, tl.Spec(2, 5))
    assert model.lin.weight.shape == (3, 5)
