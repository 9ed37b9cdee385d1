"""Sharded materialization on FSDP2, 1 and 2 CPU ranks (gloo): per-rank time and peak memory vs the full model.

    python benchmarks/bench_fsdp.py [--runs N]

Medians over N runs (each run spawns its own ranks, 1 thread each). A rank generates only the rows of its
shard (exact: each draw jumped to the slice's first word; exact=False: the counter-based stream at the
slice's offset), so per-rank time and memory fall as ranks are added; tensors whose init is not
elementwise fall back to one full tensor at a time. The time includes deferred construction.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _harness import machine, median_of, run, runs
from bench_materialize import make, warm_up

import torchlazy as tl


def rank_main(rank: int, world: int, port: int, out: str, exact: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warm_up()
    mesh = init_device_mesh("cpu", (world,))
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tl.materialize(model, exact=exact)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    local = sum(p._local_tensor.numel() * p.element_size() for p in model.parameters())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"seconds": seconds, "peak": peak, "local": local}, f)
    dist.destroy_process_group()


def ranks(exact: bool, world: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(rank_main, args=(world, port, out, exact), nprocs=world, join=True)
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


if __name__ == "__main__":
    full = run(os.path.join(os.path.dirname(__file__), "bench_materialize.py"), "tl.deferred + tl.materialize (exact)")
    eager = run(os.path.join(os.path.dirname(__file__), "bench_materialize.py"), "eager construction")
    params = eager["params"]
    print(f"FSDP2, ranks x 1 thread, Llama {params / 4 / 1e6:.0f}M float32  ({machine()})\n")
    head = f"{'variant':<58} {'time (s)':>9} {'vs full':>8} {'peak RSS growth':>16} {'/ full params':>14}"
    print(head + "\n" + "-" * len(head))
    print(
        f"{'single process, full model (tl.materialize)':<58} {full['seconds']:>9.3f} {1:>7.2f}x {full['peak_growth'] / 2**20:>12.0f} MiB {full['peak_growth'] / params:>13.2f}x"
    )
    for exact in (True, False):
        for world in (1, 2):
            tries = [ranks(exact, world) for _ in range(runs())]
            per_rank = [median_of([t[r] for t in tries]) for r in range(world)]
            for r, res in enumerate(per_rank):
                name = f"{world} rank(s): rank {r}, exact={exact} (shard {res['local'] / 2**20:.0f} MiB)"
                print(
                    f"{name:<58} {res['seconds']:>9.3f} {res['seconds'] / full['seconds']:>7.2f}x {res['peak'] / 2**20:>12.0f} MiB {res['peak'] / params:>13.2f}x"
                )
