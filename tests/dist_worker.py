"""Runs in each spawned rank of the FSDP2 tests (gloo, CPU).

Exit path. A rank once died with SIGABRT ("terminate called without an active exception") after its
results were written. The gloo process group's C++ threads (two `pt_gloo_runloop` workers, the
`gloo_tcp_loop` and, on rank 0, the TCPStore server `pt_tcpstore_uv`) are still running after
`dist.destroy_process_group()`: FSDP2's mesh info, the model's DTensors and c10d's own registry keep the
group alive (measured: the thread count is the same before and after destroy). They are torn down during
interpreter finalization and C++ static destruction at exit, where a gloo thread that releases a tensor
with a Python object must take the GIL from a finalizing interpreter and is force-unwound, which ends in
std::terminate (see pytorch/pytorch#179291). And rank 0, which owns the store, could exit while rank 1
was still tearing down. So each rank: does its work in a function (every model, mesh and DTensor
reference dies with it), waits at a barrier until both ranks are done with every collective, collects
garbage, destroys the group, and then leaves with `os._exit(0)`, skipping interpreter finalization
altogether. Failures still raise normally, so `mp.spawn` reports the traceback.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def work(rank: int, world: int, job: str, out: str, checkpoint: str | None) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from models import MODELS
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torchlazy as tl

    mesh = init_device_mesh("cpu", (world,))
    if job == "odd":
        return odd_shapes(rank, mesh, out)
    if job == "collectives":
        return collectives(rank, mesh, out)
    if job == "again":
        return again(rank, mesh, out)
    if job == "hsdp":
        return hsdp(rank, world, out)
    if job == "shapes":
        return shape_tools(rank, mesh, out)
    exact = not job.endswith("-fast")
    refused = job.endswith("-refused")  # a forward tried (and refused) before materialize
    dtype = torch.bfloat16 if job.endswith("-bf16") else None  # a cast: a new DTensor swapped into each parameter
    written = job.endswith("-written")  # sharded parameters written before materialize (see `write`)
    job = job.removesuffix("-fast").removesuffix("-refused").removesuffix("-bf16").removesuffix("-written")

    def build(deferred: bool = True) -> torch.nn.Module:
        torch.manual_seed(0)
        with tl.deferred() if deferred else contextlib.nullcontext():
            model = MODELS[job]()
        replaced = model.get_input_embeddings().weight  # the parameter object `fully_shard` replaces
        for block in model.model.layers if job == "llama" else model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if written:
            write(model, replaced)
        return model

    def write(model: torch.nn.Module, replaced: torch.Tensor) -> None:
        """What a user may do between `fully_shard` and materialize: write the sharded parameters (FSDP copied
        the values: these writes count; a draw on a DTensor on a CPU mesh draws each local tensor from the
        rank's generator), and write the parameter `fully_shard` replaced (after FSDP's copy: no effect)."""
        with torch.no_grad():
            model.lm_head.weight.mul_(0.5)
            model.model.norm.weight.fill_(2.0)
            torch.nn.init.normal_(model.model.layers[0].mlp.up_proj.weight, std=0.02)
            replaced.fill_(7.0)

    if written:  # the same steps in eager PyTorch on this rank: what its local tensors must hold
        eager_local = {name: p.to_local().detach().clone() for name, p in build(deferred=False).named_parameters()}
    model = build()
    if refused:
        try:
            model(input_ids=torch.randint(0, 128, (2, 8)))
        except tl.DeferredError as e:
            # FSDP's all-gather, the forward's first collective, is refused before it swaps in unsharded parameters
            assert "tl.materialize(model)" in str(e), e
        else:
            raise AssertionError("a forward of the deferred model was not refused")
        assert tl.deferred_tensors(model), "the refused forward hid the deferred parameters"
        # the model as it was: materialize, and the forward and backward below, proceed as without the refusal
    torch.randn(7)  # RNG used in between
    before = {name: id(p) for name, p in model.named_parameters()}
    tl.materialize(model, checkpoint=checkpoint, exact=exact, dtype=dtype)
    kept = [name for name, p in model.named_parameters() if id(p) == before[name]]
    local = {}
    for name, p in model.named_parameters():
        local[name] = (p._local_tensor if hasattr(p, "_local_tensor") else p).detach().clone()
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # non-persistent ones too
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 128, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.save(
        {
            "local": local,
            "full": full,
            "buffers": buffers,
            "tied": tied,
            "loss": loss.detach().clone(),
            "deferred": tl.deferred_tensors(model),
            "kept": kept,  # parameters that stayed the same objects (their local values given in place)
            "names": list(before),
            "eager_local": eager_local if written else None,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


def odd_shapes(rank: int, mesh: object, out: str) -> None:
    """Small parameters of odd sizes, each sharded: `normal_` on n >= 16 elements, n not a multiple of 16,
    draws the last 16 elements again at the end, so a shard that ends among them (the last rank holding fewer
    than 16) needs that redraw; `uniform_` (Linear) has no such tail. Saves each rank's local tensors and those
    of the same steps run eagerly on the rank."""
    from torch.distributed.fsdp import fully_shard

    import torchlazy as tl

    def unsharded(truncated: bool = False) -> torch.nn.Module:
        torch.manual_seed(0)
        shapes = [(3, 7), (31, 1), (15, 2), (8, 3), (5, 4), (2, 16), (40, 1)]
        model = torch.nn.Sequential(*[torch.nn.Embedding(*s) for s in shapes], torch.nn.Linear(7, 5))
        if truncated:  # `trunc_normal_`, an initializer with a law (exact=False samples it by counter)
            torch.nn.init.trunc_normal_(model[1].weight, std=0.02)
            torch.nn.init.trunc_normal_(model[7].weight, std=0.02)
        return model

    def build(truncated: bool = False) -> torch.nn.Module:
        model = unsharded(truncated)
        for child in model:
            fully_shard(child, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def local_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.to_local().detach().clone() for name, p in model.named_parameters()}

    eager_local = local_of(build())
    with tl.deferred():
        model = build()
    rows_alone: dict[str, bool] = {}  # parameter -> its local rows made alone (no full tensor made)
    with _rows_alone_noted(rows_alone):
        tl.materialize(model)
    local = local_of(model)
    # with `trunc_normal_`: exact (eager's rows) and exact=False (the unsharded model's rows), each rank's rows alone
    truncated = {"eager": local_of(build(truncated=True))}
    with tl.deferred():
        whole = unsharded(truncated=True)
    tl.materialize(whole, exact=False)
    world = torch.distributed.get_world_size()
    truncated["whole, exact=False"] = {
        name: torch.chunk(p.detach(), world)[rank].clone() for name, p in whole.named_parameters()
    }
    for exact in (True, False):
        with tl.deferred():
            model = build(truncated=True)
        with _rows_alone_noted(rows_alone, f"exact={exact} "):
            tl.materialize(model, exact=exact)
        truncated[f"exact={exact}"] = local_of(model)

    # a sub-module of an FSDP root materialized first, then the root: what is still deferred, said at each step
    with tl.deferred():
        pair = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fully_shard(pair, mesh=mesh)
    steps = [(tl.is_deferred(pair[0].weight), tl.is_deferred(pair[1].weight), tl.deferred_tensors(pair))]
    tl.materialize(pair[0])
    steps.append((tl.is_deferred(pair[0].weight), tl.is_deferred(pair[1].weight), tl.deferred_tensors(pair)))
    tl.materialize(pair)
    steps.append((tl.is_deferred(pair[0].weight), tl.is_deferred(pair[1].weight), tl.deferred_tensors(pair)))
    result = {"local": local, "eager_local": eager_local, "steps": steps, "rows_alone": rows_alone}
    result["truncated"] = truncated
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


@contextlib.contextmanager
def _rows_alone_noted(noted: dict[str, bool], prefix: str = "") -> Iterator[None]:
    """Note, for each sharded parameter materialized meanwhile, whether its local rows were made alone (True) or
    cut from a full tensor (False)."""
    import torchlazy._distributed as shards

    originals = {name: getattr(shards, name) for name in ("_local_exact", "_local_only")}

    def spy(original: Any) -> Any:
        def local(record: Any, shard: Any, *rest: Any) -> Any:
            value = original(record, shard, *rest)
            noted[prefix + shard.path] = value is not None
            return value

        return local

    for name, original in originals.items():
        setattr(shards, name, spy(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(shards, name, original)


def collectives(rank: int, mesh: object, out: str) -> None:
    """Writes to sharded deferred parameters that need communication (a norm, a scatter of a deferred tensor):
    each is refused at once with a DeferredError, the model left as it was (materialize then gives eager's
    values). Recorded, the first crashed materialize and the second left garbage."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    import torchlazy as tl

    def build() -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 6)
        replaced = model.weight
        return fully_shard(model, mesh=mesh), replaced

    eager_local = {name: p.to_local().detach().clone() for name, p in build()[0].named_parameters()}
    with tl.deferred():
        model, replaced = build()
    errors = []
    writes = [
        lambda: model.weight.div_(model.weight.norm()),
        lambda: model.weight.add_(distribute_tensor(replaced.detach(), mesh, [Shard(0)])),
        lambda: model.weight.full_tensor(),
    ]
    for write in writes:
        try:
            with torch.no_grad():
                write()
        except tl.DeferredError as e:
            errors.append(str(e))
    try:  # `fully_shard` inside the block, then a write: DTensor dispatches below the recorder (was a message
        with tl.deferred():  # about a "real tensor")
            inside, _ = build()
            with torch.no_grad():
                torch.nn.init.constant_(inside.weight, 3.0)
    except tl.DeferredError as e:
        errors.append(str(e))
    # a refusal found after the shards were installed left them materialized, the rest deferred
    torch.manual_seed(0)
    with tl.deferred():
        pair = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(6, 2))
    fully_shard(pair[0], mesh=mesh)
    held = pair[1].weight[0]
    try:
        tl.materialize(pair)
    except tl.DeferredError as e:
        errors.append(str(e))
    untouched = tl.is_deferred(pair[0].weight) and tl.is_deferred(pair[1].weight)
    del held
    tl.materialize(pair)
    tl.materialize(model)
    local = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    local.update({f"pair.{name}": _local_of(p) for name, p in pair.named_parameters()})
    torch.manual_seed(0)
    eager_pair = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(6, 2))
    fully_shard(eager_pair[0], mesh=mesh)
    eager_local.update({f"pair.{name}": _local_of(p) for name, p in eager_pair.named_parameters()})
    # every parameter sharded, the checkpoint holding only them, strict=False: the buffers (replayed) were the
    # only targets read up front, so "none of the model's tensors is in the checkpoint" was raised
    torch.manual_seed(1)
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = {k: v.detach().clone() for k, v in source.named_parameters()}
    with tl.deferred():
        normed = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fully_shard(normed, mesh=mesh)
    with tl.deferred():
        unrelated = torch.nn.Sequential(torch.nn.Linear(3, 4))
    fully_shard(unrelated, mesh=mesh)  # every parameter sharded, no buffer: nothing matching went unnoticed
    try:
        tl.materialize(unrelated, checkpoint={"foo.weight": torch.zeros(2)}, strict=False)
    except tl.CheckpointError as e:
        errors.append(str(e))
    tl.materialize(normed, checkpoint=params, strict=False)
    local.update({f"normed.{name}": _local_of(p) for name, p in normed.named_parameters()})
    eager_local.update({f"normed.{k}": torch.chunk(v, 2)[rank].clone() for k, v in params.items()})
    result = {"local": local, "eager_local": eager_local, "errors": errors, "untouched": untouched}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


class _Tied(torch.nn.Module):
    """An embedding tied to the output head, two layers between: one FSDP unit at the root, one on `a`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(self.emb(ids))))


def again(rank: int, mesh: object, out: str) -> None:
    """Materialize calls on sharded models beyond the first: a checkpoint or a cast for shards already real
    (they were ignored, silently), parameters kept as the objects an optimizer holds (a cast or a sub-module
    first made new ones), a model built on the meta device and sharded there (its values from a checkpoint),
    and what is refused: `tl.save` of shards, a load into FSDP's unsharded parameters, a bad checkpoint."""
    from torch.distributed.fsdp import fully_shard

    import torchlazy as tl

    torch.manual_seed(7)
    ckpt = {k: v.detach().clone() for k, v in _Tied().state_dict().items()}

    def sharded(deferred: bool = True, **options: object) -> torch.nn.Module:
        torch.manual_seed(0)
        with tl.deferred() if deferred else torch.device("meta"):
            model = _Tied()
        fully_shard(model.a, mesh=mesh, **options)
        fully_shard(model, mesh=mesh, **options)
        return model

    def full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()}

    result: dict[str, object] = {"errors": []}
    errors: list[str] = result["errors"]  # type: ignore[assignment]
    model = sharded()
    tl.materialize(model.a)
    tl.materialize(model, checkpoint=ckpt)  # `a` real already: it takes the checkpoint too
    result["partly, then checkpoint"] = full(model)
    tl.materialize(model, checkpoint={k: v * 2 for k, v in ckpt.items()})  # all real: all take it
    result["real, then checkpoint"] = full(model)
    for bad in ({"a.weight": torch.zeros(3, 3), "b.bias": torch.zeros(8)}, {"a.weight": ckpt["a.weight"]}):
        try:
            tl.materialize(model, checkpoint=bad)
        except tl.CheckpointError as e:
            errors.append(str(e))
    result["after a refused checkpoint"] = full(model)
    try:
        tl.save(model, os.path.join(out, f"never{rank}.safetensors"))
    except tl.CheckpointError as e:
        errors.append(str(e))
    result["saved anyway"] = os.path.exists(os.path.join(out, f"never{rank}.safetensors"))

    # a cast, and a sub-module first: the same parameter objects (an optimizer made before holds them), attributes
    # and the tie kept, values eager's
    for name, first in (("cast", None), ("sub-module first", "a"), ("tied sub-module first", "emb")):
        model = sharded()
        model.a.weight.no_decay = True  # type: ignore[attr-defined]
        before = {k: id(p) for k, p in model.named_parameters()}
        if first is not None:
            tl.materialize(getattr(model, first))
        tl.materialize(model, dtype=torch.float64 if first is None else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(torch.arange(10)).square().mean()
        loss.backward()
        optimizer.step()
        result[name] = {
            "kept": [k for k, p in model.named_parameters() if id(p) == before[k]],
            "attribute": getattr(model.a.weight, "no_decay", False),
            "tied": model.head.weight is model.emb.weight,
            "full": full(model),
            "loss": loss.detach(),
        }
    # eager, the same steps: what the values and the loss must be
    for name, cast in (("eager", None), ("eager cast", torch.float64)):
        torch.manual_seed(0)
        model = _Tied()
        fully_shard(model.a, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if cast is not None:
            model.to(cast)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(torch.arange(10)).square().mean()
        loss.backward()
        optimizer.step()
        result[name] = {"full": full(model), "loss": loss.detach()}

    # built on the meta device and sharded there: only a checkpoint can give the values
    model = sharded(deferred=False)
    try:
        tl.materialize(model)
    except tl.DeferredError as e:
        errors.append(str(e))
    tl.materialize(model, checkpoint=ckpt)
    result["meta, checkpoint"] = full(model)

    # FSDP holding the unsharded parameters after a forward: a load would go into tensors it replaces
    model = sharded(reshard_after_forward=False)
    tl.materialize(model)
    model(torch.arange(10))
    try:
        tl.materialize(model, checkpoint=ckpt)
    except tl.ArgumentError as e:
        errors.append(str(e))
    for sub in (model, model.a):
        sub.reshard()  # type: ignore[operator]
    tl.materialize(model, checkpoint=ckpt)
    result["resharded, checkpoint"] = full(model)
    result["resharded, forward"] = model(torch.arange(10)).detach()  # the checkpoint's values, all-gathered
    reference = _Tied()
    reference.load_state_dict(ckpt)
    result["checkpoint, forward"] = reference(torch.arange(10)).detach()
    # after a forward (FSDP set up), a checkpoint into a sub-module that is not an FSDP unit: FSDP's own memory of
    # the shard must take the values (a new local tensor left FSDP's copy stale: the forward ignored the load)
    part = {"weight": ckpt["b.weight"] * 3, "bias": ckpt["b.bias"] * 3}
    tl.materialize(model.b, checkpoint=part)
    result["sub-module loaded, forward"] = model(torch.arange(10)).detach()
    reference.b.load_state_dict(part)
    result["sub-module reference"] = reference(torch.arange(10)).detach()
    # a lazy model sized in the block by a dry run, then sharded: its parameters kept no origin (materialize did
    # nothing, silently); FSDP's copies have records of their own
    torch.manual_seed(0)
    with tl.deferred():
        lazy = torch.nn.Sequential(tl.nn.Linear(8), torch.nn.GELU(), tl.nn.Linear(4))
        lazy(torch.zeros(2, 6))
    fully_shard(lazy, mesh=mesh)
    tl.materialize(lazy)
    result["lazy sized in the block"] = full(lazy)
    torch.manual_seed(0)
    explicit = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    result["explicit sizes"] = {k: p.detach().clone() for k, p in explicit.named_parameters()}
    # a sharded model's own state dict (DTensors, each rank its slice) as the checkpoint: shard to shard, as
    # `load_state_dict` copies them (each local tensor became a DTensor itself before, a broken model); into a
    # model not sharded so, refused (a raw torch error before)
    teacher = _Tied()
    teacher.load_state_dict({k: v * 3 for k, v in ckpt.items()})
    fully_shard(teacher.a, mesh=mesh)
    fully_shard(teacher, mesh=mesh)
    model = sharded()
    tl.materialize(model, checkpoint=teacher.state_dict())
    result["from a sharded state dict"] = full(model)
    result["local tensors plain"] = all(type(tc_local(p)) is torch.Tensor for p in model.parameters())
    with tl.deferred():
        plain = _Tied()
    try:
        tl.materialize(plain, checkpoint=teacher.state_dict())
    except tl.CheckpointError as e:
        errors.append(str(e))
    result["unsharded still deferred"] = all(tl.is_deferred(t) for t in plain.state_dict().values())
    # replicated DTensors (every rank holds the whole): each rank takes its rows (refused as "other rows" before)
    from torch.distributed.tensor import Replicate, distribute_tensor

    replicated = {k: distribute_tensor(v * 5, mesh, [Replicate()]) for k, v in ckpt.items()}
    model = sharded()
    tl.materialize(model, checkpoint=replicated)
    result["from replicated DTensors"] = full(model)
    # partial sums: a rank's local tensor is a summand, not its rows (loaded as if replicated, silently, at first)
    from torch.distributed.tensor import DTensor, Partial

    model = sharded()
    partial = {k: DTensor.from_local(v / 2, mesh, [Partial()]) for k, v in ckpt.items()}
    try:
        tl.materialize(model, checkpoint=partial)
    except tl.CheckpointError as e:
        errors.append(str(e))
    result["partial refused, still deferred"] = tl.is_deferred(model)
    result["ckpt"] = ckpt
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def hsdp(rank: int, world: int, out: str) -> None:
    """HSDP: 2-D meshes (replicate, shard) of both shapes 2 ranks allow, and a `Shard(1)` placement: the gathered
    parameters are eager's, exact and checkpointed, and `exact=False` gives the same values on every layout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    import torchlazy as tl

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))

    result: dict[str, dict[str, torch.Tensor]] = {}
    torch.manual_seed(3)
    ckpt = {k: v.detach().clone() for k, v in make().state_dict().items()}
    for shape in ((1, world), (world, 1), None):
        mesh = init_device_mesh("cpu", shape or (world,), mesh_dim_names=("replicate", "shard") if shape else None)
        options: dict[str, object] = {} if shape else {"shard_placement_fn": lambda p: Shard(p.dim() - 1)}
        for how in ("exact", "fast", "checkpoint"):
            torch.manual_seed(0)
            with tl.deferred():
                model = make()
            fully_shard(model[0], mesh=mesh, **options)
            fully_shard(model, mesh=mesh, **options)
            tl.materialize(model, exact=how != "fast", checkpoint=ckpt if how == "checkpoint" else None)
            result[f"{shape} {how}"] = {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()}
    result["ckpt"] = ckpt
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def shape_tools(rank: int, mesh: object, out: str) -> None:
    """Shape-only forwards (summary, FLOPs, memory estimate, build) on a sharded model, before and after its first
    forward: refused before anything runs, the model left as it was (materialize, a forward, a backward, another
    forward then give eager's values). Saves the refusals and the outputs."""
    from torch.distributed.fsdp import fully_shard

    import torchlazy as tl

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(7, 10), torch.nn.GELU(), torch.nn.Linear(10, 4))

    x = torch.ones(4, 7)
    spec = tl.Spec(4, 7)
    tools = {
        "summary": lambda m: tl.summary(m, spec),
        "flops": lambda m: tl.summary(m, spec, flops=True),
        "memory": lambda m: tl.estimate_memory(m, spec),
        "build": lambda m: tl.build(m, spec),
    }
    refusals: dict[str, str] = {}
    with tl.deferred():
        model = make()
    fully_shard(model, mesh=mesh)
    for name, tool in tools.items():
        try:
            tool(model)
        except tl.ArgumentError as e:
            refusals[name] = str(e)
    tl.materialize(model)
    try:
        tools["summary"](model)
    except tl.ArgumentError as e:
        refusals["summary, materialized"] = str(e)
    first = model(x)
    first.sum().backward()
    for name, tool in tools.items():  # after a forward and a backward: FSDP's state would be left unsharded
        try:
            tool(model)
        except tl.ArgumentError as e:
            refusals[f"{name}, after a forward"] = str(e)
    with torch.no_grad():
        second = model(x)
        eager = make()(x)
    rows = len(tl.summary(make(), spec).rows)  # an unsharded model: no refusal
    result = {"refusals": refusals, "outputs": [first.detach(), second], "eager": eager, "rows": rows}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def tc_local(p: torch.Tensor) -> torch.Tensor:
    return p._local_tensor  # type: ignore[attr-defined, no-any-return]


def _local_of(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter, sharded (a DTensor) or not."""
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def run(rank: int, world: int, port: int, job: str, out: str, checkpoint: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work(rank, world, job, out, checkpoint)
        dist.barrier()  # both ranks are past every collective before either tears down
    finally:
        gc.collect()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results are on disk; skip interpreter finalization with gloo's threads still alive
