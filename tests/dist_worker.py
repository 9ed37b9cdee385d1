"""Runs in each spawned rank of the FSDP2 tests (gloo, CPU)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, job: str, out: str, checkpoint: str | None) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from models import MODELS
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torchlazy as tl

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        exact = not job.endswith("-fast")
        job = job.removesuffix("-fast")
        torch.manual_seed(0)
        with tl.deferred():
            model = MODELS[job]()
        for block in model.model.layers if job == "llama" else model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.randn(7)  # RNG used in between
        tl.materialize(model, checkpoint=checkpoint, exact=exact)
        local = {}
        for name, p in model.named_parameters():
            local[name] = p._local_tensor.clone() if hasattr(p, "_local_tensor") else p.detach().clone()
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
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
                "loss": loss.item(),
                "deferred": tl.deferred_tensors(model),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
