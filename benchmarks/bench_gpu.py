"""On a CUDA device: materialize a ~160M-parameter Llama straight to the GPU, vs eager construction.

python benchmarks/bench_gpu.py [--runs N]     (needs CUDA; run on the lent GPU machine, not in CI)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import runs
from bench_materialize import _quiet, make, warm_up

import torchlazy as tl


def timed(fn) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model
    torch.cuda.empty_cache()
    return seconds, peak


def eager_on_cuda():
    torch.manual_seed(0)
    with torch.device("cuda"):
        return make()


def eager_cpu_then_move():
    torch.manual_seed(0)
    return make().to("cuda")


def ours(exact: bool, dtype=None):
    def run():
        torch.manual_seed(0)
        with tl.deferred():
            model = make()
        return tl.materialize(model, device="cuda", exact=exact, dtype=dtype)

    return run


if __name__ == "__main__":
    _quiet()
    warm_up()
    torch.zeros(1, device="cuda")
    rows = [
        ("eager construction on cuda (not CPU-exact)", eager_on_cuda),
        ("eager on CPU, then .to('cuda') (baseline)", eager_cpu_then_move),
        ("tl.materialize(device='cuda') exact", ours(True)),
        ("tl.materialize(device='cuda', exact=False)", ours(False)),
        ("tl.materialize(device='cuda', exact=False, bf16)", ours(False, torch.bfloat16)),
    ]
    results = []
    for name, fn in rows:  # in one process: medians of N runs of each (the first CUDA use is warmed up above)
        times, peaks = zip(*(timed(fn) for _ in range(runs())))
        results.append((name, statistics.median(times), max(peaks)))
    base = results[1][1]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {runs()} runs\n")
    print(f"{'variant':<50} {'time (s)':>9} {'vs baseline':>12} {'peak GPU MiB':>13}")
    for name, seconds, peak in results:
        print(f"{name:<50} {seconds:>9.3f} {seconds / base:>11.2f}x {peak:>13.0f}")
