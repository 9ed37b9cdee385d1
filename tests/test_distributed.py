"""FSDP2 on 2 CPU processes (gloo): each rank materializes only its shard, exactly."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from exact import assert_same_tensors
from models import MODELS

import torchlazy as tl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(job: str, out: Path, checkpoint: str | None = None) -> list[dict]:
    import dist_worker

    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(dist_worker.run, args=(2, _free_port(), job, str(out), checkpoint), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("job", ["gpt2", "llama", "gpt2-refused", "llama-bf16"])
def test_fsdp2_shards_are_exact_slices_of_eager_init(tmp_path: Path, job: str) -> None:
    """`-refused`: a forward tried before materialize is refused at FSDP's all-gather (a collective on deferred
    tensors), before FSDP swaps in unsharded parameters: the model is left as it was, and materialize, forward
    and backward then give eager's values. `-bf16`: materialized
    as bfloat16, eager's values cast. Without a cast each sharded parameter stays the same object (its local
    values given in place, as FSDP's own re-padding does); a cast swaps a new DTensor into each parameter object."""
    ranks = _spawn(job, tmp_path)
    torch.manual_seed(0)
    reference = MODELS[job.removesuffix("-refused").removesuffix("-bf16")]()
    if job.endswith("-bf16"):
        reference.to(torch.bfloat16)
    eager = {name: p.detach() for name, p in reference.named_parameters()}
    eager_buffers = {name: b.detach() for name, b in reference.named_buffers()}
    for r, result in enumerate(ranks):
        assert_same_tensors(result["full"], eager)  # same keys, dtypes, shapes, bits
        expected = {}
        for name, ref in eager.items():
            chunks = torch.chunk(ref, 2, dim=0)
            expected[name] = (chunks[r] if r < len(chunks) else ref[:0]).contiguous()
        assert_same_tensors(result["local"], expected)
        assert_same_tensors(result["buffers"], eager_buffers)  # no extra, none missing, non-persistent too
        assert result["deferred"] == []
        assert result["kept"] == result["names"]  # the same objects, a cast too (swapped in, as `Module._apply`)
        assert result["tied"] == job.startswith("gpt2")  # GPT-2 ties, this Llama does not
    assert_same_tensors(ranks[0]["loss"], ranks[1]["loss"], "loss")  # same parameters, same batch: same bits


def test_fsdp2_keeps_writes_made_between_fully_shard_and_materialize(tmp_path: Path) -> None:
    """Sharded parameters written after `fully_shard` keep those writes: a scale, a fill, and a draw on the DTensor
    (each rank's local tensor from its own generator), and a write to the parameter `fully_shard` replaced, after
    FSDP copied it, changes nothing, as in eager. Each rank's local tensors equal the same steps run eagerly on that
    rank. (Every shard was made from the replaced parameter's record: the writes were silently lost.)"""
    ranks = _spawn("llama-written", tmp_path)
    for result in ranks:
        assert_same_tensors(result["local"], result["eager_local"])
        assert result["deferred"] == []
    scaled = "lm_head.weight"
    assert not torch.equal(ranks[0]["local"][scaled], ranks[1]["local"][scaled])  # each rank its own rows


def test_fsdp2_odd_sizes_each_rank_exact(tmp_path: Path) -> None:
    """Small parameters of odd sizes (see `dist_worker.odd_shapes`): each rank's local tensors equal eager's on that
    rank. A shard ending among the last 16 elements of a `normal_` draw of n % 16 != 0 elements lacked the
    kernel's redraw of those 16 (rank 0 of a (3, 7) embedding differed from element 5 on). Every rank makes only
    its rows, also the last one, whose shard FSDP pads (odd row counts: it made the whole tensor, found by review),
    and also from `trunc_normal_`."""
    ranks = _spawn("odd", tmp_path)
    for result in ranks:
        assert_same_tensors(result["local"], result["eager_local"])
        assert len(result["rows_alone"]) == 27 and all(result["rows_alone"].values()), result["rows_alone"]
        # `trunc_normal_` (an initializer whose law exact=False samples by counter) made every shard from a full
        # tensor (found by review): exact, eager's rows; exact=False, the unsharded model's rows
        truncated = result["truncated"]
        assert_same_tensors(truncated["exact=True"], truncated["eager"])
        assert_same_tensors(truncated["exact=False"], truncated["whole, exact=False"])
        assert not torch.equal(truncated["exact=False"]["1.weight"], truncated["eager"]["1.weight"])
        # `tl.is_deferred` of a sharded parameter, and `tl.deferred_tensors` once a sub-module of the FSDP root is
        # materialized (FSDP's own record of the old parameter made it list the materialized ones)
        everything = ["0.weight", "0.bias", "1.weight", "1.bias"]
        assert result["steps"] == [(True, True, everything), (False, True, everything[2:]), (False, False, [])]


def test_fsdp2_refuses_collectives_on_deferred_shards(tmp_path: Path) -> None:
    """A write to sharded deferred parameters that needs communication (see `dist_worker.collectives`) is refused
    at once, naming the collective, and leaves the model as it was: materialize then gives eager's values. A write
    to parameters sharded inside the block is refused as such. A materialize refused for a held view leaves the
    sharded parameters deferred too (they were installed before the refusal)."""
    ranks = _spawn("collectives", tmp_path)
    for result in ranks:
        assert len(result["errors"]) == 6, result["errors"]
        assert "none of the model's tensors is in" in result["errors"][5]
        assert "cannot take their values in place" in result["errors"][4] and result["untouched"]
        assert "_c10d_functional.all_reduce" in result["errors"][0]
        assert "c10d.scatter_" in result["errors"][1] or "c10d.broadcast_" in result["errors"][1]
        assert "writes into a sharded tensor" in result["errors"][3] and "Shard after the block" in result["errors"][3]
        assert all("tl.materialize(model)" in e for e in result["errors"][:4])
        assert_same_tensors(result["local"], result["eager_local"])


def test_shape_only_forwards_on_a_sharded_model_are_refused(tmp_path: Path) -> None:
    """`tl.summary`/`estimate_memory`/`build` with example inputs on a model sharded by `fully_shard`: refused up
    front (found by review: before its first forward they started FSDP's lazy initialization on fake tensors,
    failed with a misleading shape error and left FSDP half-initialized; after it a summary or build left FSDP's
    parameter groups unsharded; either way the next forward or materialize raised a raw error). The model then
    materializes, trains and runs as eager's."""
    ranks = _spawn("shapes", tmp_path)
    tools = ["summary", "flops", "memory", "build"]
    for result in ranks:
        expected = {*tools, "summary, materialized", *(f"{t}, after a forward" for t in tools)}
        assert set(result["refusals"]) == expected
        for tool, message in result["refusals"].items():
            assert "is sharded by `fully_shard`" in message and "before `fully_shard`" in message, (tool, message)
        assert_same_tensors(result["outputs"][0], result["eager"], "first forward")
        assert_same_tensors(result["outputs"][1], result["eager"], "second forward")
        assert result["rows"] == 4


def test_fsdp2_reads_only_its_slices_from_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(99)
    source = MODELS["gpt2"]()
    tl.save(source, tmp_path / "ckpt.safetensors")
    ranks = _spawn("gpt2", tmp_path, str(tmp_path / "ckpt.safetensors"))
    eager = {name: p.detach() for name, p in source.named_parameters()}
    for r, result in enumerate(ranks):
        assert_same_tensors(result["full"], eager)
        assert_same_tensors(result["local"], {k: torch.chunk(v, 2, dim=0)[r].contiguous() for k, v in eager.items()})


def test_fsdp2_not_exact_generates_local_slices_reproducibly(tmp_path: Path) -> None:
    """exact=False is layout-independent: 2 ranks' gathered shards == the whole model in one process."""
    one = _spawn("gpt2-fast", tmp_path / "a")
    two = _spawn("gpt2-fast", tmp_path / "b")
    torch.manual_seed(0)
    with tl.deferred():
        whole = MODELS["gpt2"]()
    tl.materialize(whole, exact=False)
    torch.manual_seed(0)
    eager = dict(MODELS["gpt2"]().named_parameters())
    for r in range(2):
        assert one[r]["deferred"] == [] and one[r]["tied"]
        for name, ref in whole.named_parameters():
            local = one[r]["local"][name]
            assert_same_tensors(local, torch.chunk(ref.detach(), 2, dim=0)[r], name)  # the whole tensor's rows
            assert_same_tensors(local, two[r]["local"][name], name)  # reproducible
            assert_same_tensors(one[r]["full"][name], ref.detach(), name)  # gathered == whole
    weight = one[0]["full"]["transformer.h.0.mlp.c_fc.weight"]
    assert abs(weight.std().item() - eager["transformer.h.0.mlp.c_fc.weight"].std().item()) < 0.005
    assert not torch.equal(weight, eager["transformer.h.0.mlp.c_fc.weight"])  # not eager's bits


def test_fsdp2_materialize_again_loads_casts_and_keeps_parameter_objects(tmp_path: Path) -> None:
    """A second materialize of a sharded model loads `checkpoint=` into shards already real (ignored before,
    silently, also a bad checkpoint); a cast or a sub-module materialized first keeps each parameter the object
    an optimizer holds, with its attributes and ties (new objects before: the optimizer trained nothing); a model
    built on the meta device and sharded there takes a checkpoint; `tl.save` of shards and a load into FSDP's
    unsharded parameters are refused."""
    ranks = _spawn("again", tmp_path)
    for result in ranks:
        ckpt = result["ckpt"]
        expected = {k: ckpt[k] for k in result["partly, then checkpoint"]}  # the tied head: one parameter
        assert_same_tensors(result["partly, then checkpoint"], expected)
        assert_same_tensors(result["real, then checkpoint"], {k: v * 2 for k, v in expected.items()})
        assert_same_tensors(result["after a refused checkpoint"], {k: v * 2 for k, v in expected.items()})
        assert_same_tensors(result["meta, checkpoint"], expected)
        assert_same_tensors(result["resharded, checkpoint"], expected)
        errors = result["errors"]
        assert len(errors) == 7, errors
        assert "`a.weight`" in errors[0] and "(3, 3)" in errors[0]
        assert "`emb.weight`" in errors[1] and "`b.weight`" in errors[1]  # every missing key named at once
        assert "sharded DTensor" in errors[2] and not result["saved anyway"]
        assert "on the meta device with no record" in errors[3] and "no `checkpoint=` was given" in errors[3]
        assert "m.reshard()" in errors[4] and "5 sharded ones (`emb.weight`" in errors[4]
        assert (
            "is a DTensor" in errors[5] and "full_state_dict=True" in errors[5] and result["unsharded still deferred"]
        )
        assert_same_tensors(result["from a sharded state dict"], {k: v * 3 for k, v in expected.items()})
        assert result["local tensors plain"]
        assert_same_tensors(result["from replicated DTensors"], {k: v * 5 for k, v in expected.items()})
        assert "partial sum" in errors[6] and result["partial refused, still deferred"]
        assert torch.equal(result["resharded, forward"], result["checkpoint, forward"])
        assert torch.equal(result["sub-module loaded, forward"], result["sub-module reference"])
        assert_same_tensors(result["lazy sized in the block"], result["explicit sizes"])
        for name, eager in (("cast", "eager cast"), ("sub-module first", "eager"), ("tied sub-module first", "eager")):
            run = result[name]
            assert run["kept"] == list(result["partly, then checkpoint"]), name
            assert run["attribute"] and run["tied"], name
            assert_same_tensors(run["full"], result[eager]["full"], name)  # trained: the optimizer held them
            assert_same_tensors(run["loss"], result[eager]["loss"], name)


def test_hsdp_meshes_and_a_shard_1_placement_are_exact_and_layout_free(tmp_path: Path) -> None:
    """2-D meshes (replicate, shard) of shapes (1, 2) and (2, 1), and `Shard(1)` on a 1-D mesh: gathered values
    equal eager's (exact) and the checkpoint's; exact=False gives the same values on every layout and alone."""
    ranks = _spawn("hsdp", tmp_path)
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))  # noqa: E731
    eager = {k: p.detach() for k, p in make().named_parameters()}
    torch.manual_seed(0)
    with tl.deferred():
        alone = make()
    fast = {k: p.detach() for k, p in tl.materialize(alone, exact=False).named_parameters()}
    for result in ranks:
        for shape in ("(1, 2)", "(2, 1)", "None"):
            assert_same_tensors(result[f"{shape} exact"], eager, shape)
            assert_same_tensors(result[f"{shape} checkpoint"], result["ckpt"], shape)
            assert_same_tensors(result[f"{shape} fast"], fast, shape)
