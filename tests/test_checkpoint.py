"""Materialize from checkpoints: no random init, exact keys, safe formats, clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from exact import assert_models_identical, assert_same_tensors
from models import MODELS
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import torchlazy as tl


class CountRandom(TorchDispatchMode):
    """Counts random kernels run on real tensors (recording on fake tensors draws nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        real = not any(isinstance(t, FakeTensor) for t in tensors)
        if torch.Tag.nondeterministic_seeded in func.tags and real:
            self.draws += 1
        return func(*args, **(kwargs or {}))


def deferred(make):
    with tl.deferred():
        return make()


@pytest.fixture
def gpt2_saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(42)
    model = MODELS["gpt2"]()
    model.save_pretrained(tmp_path / "gpt2", max_shard_size="100KB")  # its own sharded layout
    return model, tmp_path / "gpt2"


def test_sharded_save_pretrained_loads_exactly_without_random_draws(gpt2_saved) -> None:
    reference, folder = gpt2_saved
    assert len(list(folder.glob("*.safetensors"))) > 1
    model = deferred(MODELS["gpt2"])
    with CountRandom() as counter:
        tl.materialize(model, checkpoint=folder)
    assert counter.draws == 0
    assert_models_identical(model, reference)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert tl.deferred_tensors(model) == []


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "pt", "bin"])
def test_formats(tmp_path: Path, fmt: str) -> None:
    make = lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))  # noqa: E731
    reference = make()
    if fmt == "safetensors":
        path = tmp_path / "m.safetensors"
        tl.save(reference, path)
    elif fmt == "sharded":
        path = tmp_path / "shards"
        files = tl.save(reference, path, max_shard_size=300)
        assert len(files) > 2 and (path / "model.safetensors.index.json").exists()
    else:
        path = tmp_path / f"m.{fmt}"
        torch.save(reference.state_dict(), path)
    model = tl.materialize(deferred(make), checkpoint=path, dtype=torch.float64)
    assert_models_identical(model, reference.double())
    assert model[1].num_batches_tracked.dtype == torch.long


def test_strict_false_initializes_missing_exactly_like_eager(tmp_path: Path) -> None:
    make = lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))  # noqa: E731
    donor = make()
    partial = {k: v for k, v in donor.state_dict().items() if not k.startswith("1.")}
    torch.save(partial, tmp_path / "partial.pt")
    torch.manual_seed(3)
    model = deferred(make)
    with pytest.raises(tl.CheckpointError, match=r"missing from the checkpoint: `1.weight`, `1.bias`.*strict=False"):
        tl.materialize(model, checkpoint=tmp_path / "partial.pt")
    assert tl.is_deferred(model)
    tl.materialize(model, checkpoint=tmp_path / "partial.pt", strict=False)
    torch.manual_seed(3)
    reference = make()
    reference.load_state_dict(partial, strict=False)
    assert_models_identical(model, reference)


def test_key_map_for_wrapped_checkpoints(tmp_path: Path) -> None:
    reference = nn.Linear(4, 3)
    wrapped = nn.ModuleDict({"module": reference})
    tl.save(wrapped, tmp_path / "w.safetensors")
    for key_map in ({"module.": ""}, lambda k: k.removeprefix("module.")):
        model = tl.materialize(
            deferred(lambda: nn.Linear(4, 3)), checkpoint=tmp_path / "w.safetensors", key_map=key_map
        )
        assert_models_identical(model, reference)
    # without key_map the wrapper's prefix is found (every key of the model under one prefix)
    found = tl.materialize(deferred(lambda: nn.Linear(4, 3)), checkpoint=tmp_path / "w.safetensors")
    assert_models_identical(found, reference)
    with pytest.raises(tl.CheckpointError, match=r"missing from the checkpoint: `weight`, `bias`"):
        tl.materialize(deferred(lambda: nn.Linear(4, 3)), checkpoint=tmp_path / "w.safetensors", key_map={"x.": ""})
    # two keys renamed onto one: refused, naming both (the file's order picked one silently, even with strict)
    both = {"bias": torch.zeros(3), "module.bias": torch.ones(3), "weight": torch.zeros(3, 4)}
    model = deferred(lambda: nn.Linear(4, 3))
    with pytest.raises(tl.CheckpointError, match=r"`bias` and `module.bias` both map to the model's `bias`"):
        tl.materialize(model, checkpoint=both, key_map={"module.": ""})
    assert tl.is_deferred(model.weight) and tl.is_deferred(model.bias)


def test_unbuilt_lazy_model_takes_sizes_from_checkpoint(tmp_path: Path) -> None:
    reference = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    tl.save(reference, tmp_path / "cnn.safetensors")
    lazy = nn.Sequential(tl.nn.Conv2d(8, 3), tl.nn.BatchNorm2d(), nn.Flatten(), tl.nn.Linear(5))
    with CountRandom() as counter:
        tl.materialize(lazy, checkpoint=tmp_path / "cnn.safetensors")
    assert counter.draws == 0
    assert [type(m) for m in lazy] == [type(m) for m in reference]
    assert_models_identical(lazy, reference)
    deferred_lazy = deferred(lambda: nn.Sequential(tl.nn.Conv2d(8, 3), tl.nn.BatchNorm2d()))
    tl.materialize(deferred_lazy, checkpoint=tmp_path / "cnn.safetensors", strict=False)
    assert deferred_lazy[0].in_channels == 3
    assert_same_tensors(dict(deferred_lazy.state_dict()), dict(reference[:2].state_dict()))


def test_shape_mismatch_names_key_and_leaves_model_deferred(tmp_path: Path) -> None:
    tl.save(nn.Linear(4, 3), tmp_path / "small.safetensors")
    model = deferred(lambda: nn.Linear(5, 3))
    with pytest.raises(tl.ShapeError, match=r"`weight`: the model expects shape \(3, 5\).*\(3, 4\)") as info:
        tl.materialize(model, checkpoint=tmp_path / "small.safetensors")
    assert isinstance(info.value, tl.CheckpointError)
    assert tl.is_deferred(model)
    tl.materialize(model)
    assert not tl.is_deferred(model)


def test_corrupt_truncated_missing_and_unsafe_files(tmp_path: Path) -> None:
    model = deferred(lambda: nn.Linear(64, 64))
    good = tmp_path / "good.safetensors"
    tl.save(nn.Linear(64, 64), good)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    for name in ("truncated.safetensors", "garbage.safetensors", "nothing.safetensors"):
        with pytest.raises(tl.CheckpointError):
            tl.materialize(model, checkpoint=tmp_path / name)
    index = {"metadata": {}, "weight_map": {"weight": "gone.safetensors", "bias": "gone.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    with pytest.raises(tl.CheckpointError, match="does not exist"):
        tl.materialize(model, checkpoint=tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"weight": Evil()}))
    torch.save({"weight": torch.zeros(64, 64), "extra": Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(tl.CheckpointError, match="weights_only|readable"):
            tl.materialize(model, checkpoint=tmp_path / name)
    assert tl.is_deferred(model)


def test_save_refuses_deferred_and_stores_tied_once(tmp_path: Path) -> None:
    from safetensors import safe_open

    with pytest.raises(tl.CheckpointError, match="materialize"):
        tl.save(deferred(lambda: nn.Linear(2, 2)), tmp_path / "x.safetensors")
    model = MODELS["gpt2"]()
    tl.save(model, tmp_path / "g.safetensors")
    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    again = tl.materialize(deferred(MODELS["gpt2"]), checkpoint=tmp_path / "g.safetensors")
    assert_models_identical(again, model)
    assert again.lm_head.weight is again.transformer.wte.weight


def test_sub_module_by_sub_module_from_a_whole_model_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = MODELS["llama"]()
    tl.save(reference, tmp_path / "whole.safetensors")
    model = deferred(MODELS["llama"])
    with pytest.raises(tl.CheckpointError, match="several prefixes"):  # identical layers: which one?
        tl.materialize(model.model.layers[1], checkpoint=tmp_path / "whole.safetensors")
    tl.materialize(
        model.model.layers[1], checkpoint=tmp_path / "whole.safetensors", key_map={"model.layers.1.": ""}, strict=False
    )
    assert tl.deferred_tensors(model)  # walking the root records where each layer is
    tl.materialize(model.model.layers[0], checkpoint=tmp_path / "whole.safetensors")
    tl.materialize(model.model.norm, checkpoint=tmp_path / "whole.safetensors")  # by its recorded path
    tl.materialize(model, checkpoint=tmp_path / "whole.safetensors")
    assert_models_identical(model, reference)


def test_state_dict_in_memory_is_copied_never_taken() -> None:
    """`checkpoint=` a state dict in memory: its tensors are copied into the model, as `load_state_dict` copies.
    They were taken as they were, then swapped: the caller's tensor became the deferred one, and the model's
    parameters shared memory with the caller's dict (an in-place op on the model changed the dict)."""
    source = {k: v + 1 for k, v in nn.BatchNorm1d(3).state_dict().items()}
    kept = {k: v.clone() for k, v in source.items()}
    with tl.deferred():
        model = nn.BatchNorm1d(3)
    tl.materialize(model, checkpoint=source)
    real = nn.BatchNorm1d(3)
    tl.materialize(real, checkpoint=source)  # real tensors load the checkpoint too
    with torch.no_grad():
        model.weight.mul_(0)
        real.weight.mul_(0)
    assert_same_tensors(source, kept)  # the caller's dict untouched, its tensors real
    assert not any(tl.is_deferred(v) for v in source.values())
    assert_same_tensors(model.running_mean, kept["running_mean"])


def test_state_dict_of_deferred_tensors_is_refused() -> None:
    """A state dict of a deferred model (no values) as `checkpoint=`: it 'loaded', leaving the model deferred and
    a second materialize failed with an AttributeError; now a CheckpointError at once, the model unchanged."""
    with tl.deferred():
        source = nn.Linear(2, 2)
        model = nn.Linear(2, 2)
    with pytest.raises(tl.CheckpointError, match=r"`weight` is deferred.*tl\.materialize\(source\)"):
        tl.materialize(model, checkpoint=source.state_dict())
    with pytest.raises(tl.CheckpointError, match="meta device"):
        tl.materialize(model, checkpoint=nn.Linear(2, 2, device="meta").state_dict())
    assert tl.deferred_tensors(model) == ["weight", "bias"]
    tl.materialize(model)  # still materializes from its record
    assert not tl.is_deferred(model)


def test_malformed_indexes_keys_and_paths_get_torchlazy_errors(tmp_path: Path) -> None:
    """Each was a raw AttributeError, TypeError or SafetensorError from inside; the model stays deferred."""
    import json

    with tl.deferred():
        model = nn.Linear(2, 2)
    (tmp_path / "list.index.json").write_text(json.dumps({"weight_map": ["weight"]}))
    (tmp_path / "int.index.json").write_text(json.dumps({"weight_map": {"weight": 3}}))
    torch.save({1: torch.zeros(2)}, tmp_path / "int_keys.pt")
    for name in ("list.index.json", "int.index.json", "int_keys.pt"):
        with pytest.raises(tl.CheckpointError):
            tl.materialize(model, checkpoint=tmp_path / name)
    with pytest.raises(tl.ArgumentError, match="key_map"):
        tl.materialize(model, checkpoint={"weight": torch.zeros(2, 2)}, key_map={1: ""})
    assert tl.deferred_tensors(model) == ["weight", "bias"]
    tl.materialize(model)
    with pytest.raises(tl.ArgumentError, match="folder"):
        tl.save(model, tmp_path)


def test_save_a_buffer_viewing_another(tmp_path: Path) -> None:
    """A buffer registered as a view of another: safetensors refused the shared memory (its own RuntimeError);
    each is now stored with its own bytes, and loads back as eager's values."""

    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("full", torch.arange(6.0))
            self.register_buffer("part", self.full[2:5])

    tl.save(Views(), tmp_path / "v.safetensors")
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "v.safetensors")
    assert_same_tensors(loaded, {"full": torch.arange(6.0), "part": torch.arange(2.0, 5.0)})


def test_save_then_load_round_trips_complex_and_unsigned_tensors(tmp_path: Path) -> None:
    # `tl.save` wrote C64 and U16 entries (safetensors' own names) that the reader refused as dtypes "this
    # PyTorch cannot hold"
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, dtype=torch.complex64))
            self.register_buffer("codes", torch.full((4,), 7, dtype=torch.uint16))

    source = Mixed()
    tl.save(source, tmp_path / "mixed.safetensors")
    loaded = tl.materialize(deferred(Mixed), checkpoint=tmp_path / "mixed.safetensors")
    assert_models_identical(loaded, source)


def test_save_into_an_unwritable_place_is_a_checkpoint_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")  # a file where a folder is needed: neither the file nor the shards can be written
    with pytest.raises(tl.CheckpointError, match="cannot"):
        tl.save(nn.Linear(2, 2), target / "model.safetensors")
    with pytest.raises(tl.CheckpointError, match="cannot create the folder"):
        tl.save(nn.Linear(2, 2), target / "shards", max_shard_size="1KB")


def test_legacy_and_odd_torch_files(tmp_path: Path) -> None:
    reference = nn.Linear(2, 3)
    # a pre-1.6 (zip-less) torch.save file, as many old `pytorch_model.bin` are: it was opened with mmap=True,
    # which only zip files allow, and refused as "truncated or corrupt"
    torch.save(reference.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_models_identical(
        tl.materialize(deferred(lambda: nn.Linear(2, 3)), checkpoint=tmp_path / "legacy.pt"), reference
    )
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(tl.CheckpointError, match="is an empty file"):
        tl.materialize(deferred(lambda: nn.Linear(2, 3)), checkpoint=tmp_path / "empty.pt")
    torch.save({**reference.state_dict(), "step": 3}, tmp_path / "training.pt")
    with pytest.raises(tl.CheckpointError, match="not tensors under `step`"):
        tl.materialize(deferred(lambda: nn.Linear(2, 3)), checkpoint=tmp_path / "training.pt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_loaded_values_are_the_models_own_memory_not_the_files(tmp_path: Path, suffix: str) -> None:
    # with no cast, a loaded tensor was the checkpoint's memory map: rewriting the file changed the model (and a
    # torch.save over it truncated the mapping: a bus error); two keys sharing a storage in a .pt stayed shared
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    if suffix == ".pt":
        source[1].weight = source[0].weight  # saved as one storage under two keys by torch.save
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        tl.save(source, path)
    model = tl.materialize(deferred(lambda: nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))), checkpoint=path)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    zeros = {k: torch.zeros_like(v) for k, v in source.state_dict().items()}
    if suffix == ".pt":
        torch.save(zeros, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in zeros.items()}, str(path))
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model[0].weight.zero_()
    assert torch.equal(model[1].weight, want["1.weight"])  # untied in the model, as eager's load leaves it


def test_a_checkpoint_loads_through_the_models_dtype_before_dtype_is_applied(tmp_path: Path) -> None:
    # eager: load_state_dict copies into the bf16 model (rounding), then `.to(float32)`; the fp32 values were
    # taken as they were
    source = nn.Linear(8, 8)
    tl.save(source, tmp_path / "fp32.safetensors")

    def bf16() -> nn.Module:
        return nn.Linear(8, 8, dtype=torch.bfloat16)

    eager = bf16()
    eager.load_state_dict(source.state_dict())
    eager.to(torch.float32)
    loaded = tl.materialize(deferred(bf16), checkpoint=tmp_path / "fp32.safetensors", dtype=torch.float32)
    assert_models_identical(loaded, eager)


def test_strict_names_the_keys_of_lazy_layers_the_checkpoint_lacks_and_changes_nothing() -> None:
    # unbuilt placeholders were not counted: strict=True returned with the layer still unbuilt
    source = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    partial = {k: v for k, v in source.state_dict().items() if k.startswith("0.")}
    model = deferred(lambda: nn.Sequential(tl.nn.Linear(16), nn.ReLU(), tl.nn.Linear(4)))
    with pytest.raises(tl.CheckpointError, match=r"missing from the checkpoint: `2.weight`, `2.bias`, of lazy layers"):
        tl.materialize(model, checkpoint=partial)
    assert not tl.is_built(model[0]) and not tl.is_built(model[2])  # the first layer's build undone too


def test_a_lazy_sub_module_takes_its_sizes_from_a_whole_models_checkpoint_under_the_found_prefix() -> None:
    # the prefix was found for reading values but not for shaping: nothing loaded, the layers left unbuilt
    source = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    outer = nn.Module()
    outer.enc = source
    with tl.deferred():
        model = nn.Module()
        model.enc = nn.Sequential(tl.nn.Linear(16), nn.ReLU(), tl.nn.Linear(4))
    tl.materialize(model.enc, checkpoint=outer.state_dict())
    assert_models_identical(model.enc, source)


@pytest.mark.parametrize("drop", [None, "2.bias"], ids=["whole", "one_key_missing"])
def test_loading_lazy_layers_leaves_the_generator_where_eager_construction_does(drop: str | None) -> None:
    # with every tensor from the checkpoint nothing was replayed, and the generator was not moved past the lazy
    # layers' construction-order draws (it was with one key missing): data order after loading depended on it
    def eager_net() -> nn.Module:
        return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))

    state = {k: v for k, v in eager_net().state_dict().items() if k != drop}
    torch.manual_seed(9)
    eager_net()
    after_eager = torch.get_rng_state()
    torch.manual_seed(9)
    with tl.deferred():
        model = nn.Sequential(tl.nn.Linear(16), nn.ReLU(), tl.nn.Linear(4))
    tl.materialize(model, checkpoint=state, strict=False)
    assert torch.equal(torch.get_rng_state(), after_eager)


def test_strict_false_with_a_checkpoint_none_of_whose_keys_match_is_refused() -> None:
    # strict=False loaded nothing and said nothing (a sub-module's prefix not found, a wrapper's prefix): every
    # tensor came from the record while the user believed the checkpoint was loaded
    source = nn.ModuleDict({"encoder": nn.Linear(4, 3)})
    model = deferred(lambda: nn.Linear(4, 3))
    with pytest.raises(tl.CheckpointError, match=r"none of the model's tensors is in"):
        tl.materialize(model, checkpoint={f"x.{k}_": v for k, v in source.state_dict().items()}, strict=False)
    assert tl.is_deferred(model.weight)
    partial = {"weight": source["encoder"].weight.detach()}  # one key matching is a partial load, as before
    assert torch.equal(tl.materialize(model, checkpoint=partial, strict=False).weight, partial["weight"])


def test_a_model_built_on_the_meta_device_takes_a_checkpoint_and_nothing_stays_meta() -> None:
    """A model built under `torch.device("meta")` has no record: a checkpoint gives its values (on the CPU, or
    `device=`/`dtype=`); they were 'loaded' into meta tensors and stayed meta, silently. With no value for a
    tensor, a DeferredError names it and the model is unchanged."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))

    source = make().state_dict()
    with torch.device("meta"):
        model = make()
    tl.materialize(model, checkpoint=source)
    assert all(t.device.type == "cpu" and torch.equal(t, source[k]) for k, t in model.state_dict().items())
    with torch.device("meta"):
        model = make()
    with pytest.raises(tl.DeferredError, match=r"\(`0.bias`\) on the meta device"):
        tl.materialize(model, checkpoint={k: v for k, v in source.items() if k != "0.bias"}, strict=False)
    with pytest.raises(tl.DeferredError, match="on the meta device"):
        tl.materialize(model)
    assert all(t.is_meta for t in model.state_dict().values())
    tl.materialize(model, checkpoint=source, dtype=torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16 and torch.equal(model[0].weight, source["0.weight"].bfloat16())
    with torch.device("meta"):
        rotary = make()
        rotary.register_buffer("inv_freq", torch.arange(4.0), persistent=False)  # never in a checkpoint
    with pytest.raises(tl.DeferredError, match=r"Non-persistent buffers \(`inv_freq`\) are never in a checkpoint"):
        tl.materialize(rotary, checkpoint=source)
    rotary.inv_freq = torch.arange(4.0)  # given its values, as the module's init computes them
    tl.materialize(rotary, checkpoint=source)
    assert torch.equal(rotary[0].weight, source["0.weight"]) and torch.equal(rotary.inv_freq, torch.arange(4.0))


def test_key_map_errors_name_the_keys_it_made() -> None:
    """A `key_map` renaming keys to names the model lacks: the error listed the checkpoint's own keys as "not in the
    model" (the model has them); a `key_map` callable that raised, or returned a non-string, let that through raw."""
    state = nn.Sequential(nn.Linear(3, 4)).state_dict()
    with tl.deferred():
        model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(tl.CheckpointError, match=r"not in the model: `0\.weight -> layer0\.weight`"):
        tl.materialize(model, checkpoint=state, key_map={"0.": "layer0."})
    with pytest.raises(tl.ArgumentError, match=r"`key_map` raised ZeroDivisionError .*`0\.weight`"):
        tl.materialize(model, checkpoint=state, key_map=lambda k: k[1 / 0])
    with pytest.raises(tl.ArgumentError, match=r"`key_map` returned 3 \(int\) for `0\.weight`"):
        tl.materialize(model, checkpoint=state, key_map=lambda k: 3)
    assert tl.deferred_tensors(model) == ["0.weight", "0.bias"]


def test_a_checkpoint_that_does_not_fit_a_lazy_layer_is_a_checkpoint_error() -> None:
    """A lazy layer whose sizes no value makes fit the checkpoint raised a plain ShapeError, which
    `except tl.CheckpointError` around a load missed; the model is left unbuilt."""
    net = nn.Sequential(tl.nn.Linear(16), nn.ReLU(), tl.nn.Linear(4))
    bad = {
        "0.weight": torch.zeros(16, 8),
        "0.bias": torch.zeros(16),
        "2.weight": torch.zeros(5, 16),
        "2.bias": torch.zeros(5),
    }
    with pytest.raises(tl.CheckpointError, match="do not fit the lazy layer") as caught:
        tl.materialize(net, checkpoint=bad)
    assert isinstance(caught.value, tl.ShapeError) and "`2.`" in str(caught.value)
    assert not tl.is_built(net)


def test_a_failed_save_leaves_the_files_that_were_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # found by review: a `.pt` write that failed part-way (a full disk) left a truncated file in place of the good
    # one; a sharded save left its first shards beside another save's index, or an earlier save's extra shards
    from safetensors import torch as st

    from torchlazy._save import save_state_dict

    good = nn.Linear(64, 64)
    save_state_dict(good.state_dict(), tmp_path / "model.pt")
    tl.save(good, tmp_path / "shards", max_shard_size="10KB")  # two shards
    before = {p.name: p.read_bytes() for p in [tmp_path / "model.pt", *(tmp_path / "shards").iterdir()]}

    def fails_midway(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(str(f)).write_bytes(b"part of a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fails_midway)
    monkeypatch.setattr(st, "save_file", fails_midway)
    with pytest.raises(tl.CheckpointError, match="cannot write .*model.pt.*unchanged"):
        save_state_dict(nn.Linear(64, 64).state_dict(), tmp_path / "model.pt")
    with pytest.raises(tl.CheckpointError, match="cannot write"):
        tl.save(nn.Linear(64, 64), tmp_path / "shards", max_shard_size="10KB")
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in [tmp_path / "model.pt", *(tmp_path / "shards").iterdir()]}
    assert after == before  # the same files, the same bytes, no temporary left
    assert_models_identical(tl.materialize(deferred(lambda: nn.Linear(64, 64)), checkpoint=tmp_path / "shards"), good)
    tl.save(nn.Linear(8, 8), tmp_path / "shards", max_shard_size="1GB")  # one shard now: the two old ones go
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "model-00001-of-00001.safetensors").mkdir()  # a folder where a shard goes
    with pytest.raises(tl.CheckpointError, match="is a folder"):
        tl.save(good, tmp_path / "blocked", max_shard_size="1GB")
    assert [p.name for p in (tmp_path / "blocked").iterdir()] == ["model-00001-of-00001.safetensors"]
