"""torchlazy layers vs PyTorch's own Lazy* layers vs plain torch.nn: first call and steady state.

    python benchmarks/bench_lazy_layers.py [--runs N]

After its first call a torchlazy layer *is* the plain torch.nn class, so the
steady-state ratio against plain torch.nn should be 1.00x; PyTorch's Lazy*
layers also become plain classes (cls_to_become). Timed in one process, median of
N repeats (--runs, default 5; x3 for first calls), same inputs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import machine, runs
from torch import nn

import torchlazy as tl

torch.set_num_threads(1)


def ours() -> nn.Module:
    return nn.Sequential(
        tl.nn.Conv2d(32, 3, padding=1), tl.nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
        tl.nn.Conv2d(64, 3, padding=1), tl.nn.BatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), tl.nn.Linear(256), nn.ReLU(), tl.nn.Linear(10),
    )  # fmt: skip


def theirs() -> nn.Module:
    return nn.Sequential(
        nn.LazyConv2d(32, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
        nn.LazyConv2d(64, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10),
    )  # fmt: skip


def plain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_call(make, x: torch.Tensor) -> float:
    def once() -> None:
        model = make()
        with torch.no_grad():
            model(x)

    return median(once, 3 * runs())


def steady(make, x: torch.Tensor) -> float:
    model = make().eval()
    with torch.no_grad():
        model(x)
        return median(lambda: [model(x) for _ in range(20)], runs()) / 20


def main() -> None:
    x = torch.randn(4, 3, 32, 32)
    for make in (ours, theirs, plain):  # warm-up: imports, kernels, one-off costs
        first_call(make, x)
    rows = [
        ("plain torch.nn (explicit sizes)", first_call(plain, x), steady(plain, x)),
        ("torch.nn.Lazy* layers", first_call(theirs, x), steady(theirs, x)),
        ("torchlazy tl.nn layers", first_call(ours, x), steady(ours, x)),
    ]
    base_first, base_steady = rows[0][1], rows[0][2]
    print(f"Lazy CNN, batch 4x3x32x32, CPU 1 thread, medians  ({machine()})\n")
    head = f"{'layers':<34} {'construct+1st call (ms)':>24} {'vs plain':>9} {'per call after (ms)':>20} {'vs plain':>9}"
    print(head + "\n" + "-" * len(head))
    for name, first, per_call in rows:
        print(
            f"{name:<34} {first * 1e3:>24.2f} {first / base_first:>8.2f}x {per_call * 1e3:>20.3f} {per_call / base_steady:>8.2f}x"
        )
    model = ours()
    model(x)
    print(
        "\nafter the first call:",
        {type(m).__module__.split(".")[0] for m in model.modules()},
        "modules, no hooks:",
        not any(m._forward_pre_hooks for m in model.modules()),
    )


if __name__ == "__main__":
    main()
