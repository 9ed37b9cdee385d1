"""Shape inference from a Spec and build, against the strongest plain-PyTorch way to do each, and cold start.

    python benchmarks/bench_build.py [--runs N]

The model is a 107M-parameter VGG-style CNN whose sizes are all lazy. Each variant runs in N fresh
processes; the tables show medians.
- sizes: tl.summary from tl.Spec against torch's own Lazy* layers run on the meta device (the strongest
  baseline: the same sizes, nothing allocated) and against a real dry run at batch 8, 224x224
- build: tl.build from a Spec of batch 64 against initializing the same parameters eagerly with explicit
  sizes (what exact means), torch Lazy* initialized by a dry run at batch 1, and torch Lazy* shaped on the
  meta device then `to_empty` + `reset_parameters` (other bits than eager construction)
- cold start: the first tl.build in a fresh process, vs a first forward under PyTorch's FakeTensorMode
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import child, machine, run_all, runs, table
from torch import nn

import torchlazy as tl

CHANNELS = (64, 128, 256, 512, 512)


def lazy_cnn() -> nn.Module:
    layers: list[nn.Module] = []
    for c in CHANNELS:
        layers += [tl.nn.Conv2d(c, 3, padding=1), tl.nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), tl.nn.Linear(4096), nn.ReLU(), tl.nn.Linear(1000))


def torch_lazy_cnn() -> nn.Module:
    layers: list[nn.Module] = []
    for c in CHANNELS:
        layers += [nn.LazyConv2d(c, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(4096), nn.ReLU(), nn.LazyLinear(1000))


def eager_cnn() -> nn.Module:
    layers: list[nn.Module] = []
    prev = 3
    for c in CHANNELS:
        layers += [nn.Conv2d(prev, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        prev = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Linear(4096, 1000))


def warm() -> None:
    small = nn.Sequential(tl.nn.Conv2d(4, 3), tl.nn.BatchNorm2d(), nn.Flatten(), tl.nn.Linear(2))
    tl.summary(small, tl.Spec(1, 3, 8, 8))
    tl.build(small, tl.Spec(1, 3, 8, 8))
    torch_lazy_small = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(2))
    torch_lazy_small(torch.randn(1, 3, 8, 8))


def dry_run():
    model = torch_lazy_cnn()
    with torch.no_grad():
        model(torch.randn(8, 3, 224, 224))
    return {"params": sum(p.numel() for p in model.parameters())}


def meta_dry_run():
    with torch.device("meta"):
        model = torch_lazy_cnn()
        model(torch.empty(8, 3, 224, 224))
    return {"params": sum(p.numel() for p in model.parameters())}


def torch_lazy_init_batch1():
    model = torch_lazy_cnn()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))


def torch_lazy_meta_to_empty():
    with torch.device("meta"):
        model = torch_lazy_cnn()
        model(torch.empty(1, 3, 224, 224))
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def summary_spec():
    return {"params": tl.summary(lazy_cnn(), tl.Spec(8, 3, 224, 224)).total_params}


def eager_init():
    model = eager_cnn()
    return {"params": sum(p.numel() * p.element_size() for p in model.parameters())}


def build_spec():
    tl.build(lazy_cnn(), tl.Spec(64, 3, 224, 224))


def build_deferred():
    with tl.deferred():
        model = lazy_cnn()
    tl.build(model, tl.Spec(64, 3, 224, 224))


SIZES_BASELINE = "torch Lazy* on the meta device, batch 8"
BUILD_BASELINE = "eager init, explicit sizes"
SIZES = {
    SIZES_BASELINE: meta_dry_run,
    "torch Lazy* real dry run, batch 8": dry_run,
    "tl.summary from tl.Spec(8, 3, 224, 224)": summary_spec,
}
BUILD = {
    BUILD_BASELINE: eager_init,
    "torch Lazy*, dry run at batch 1 (initializes)": torch_lazy_init_batch1,
    "torch Lazy* on meta, to_empty + reset_parameters": torch_lazy_meta_to_empty,
    "tl.build(lazy, tl.Spec(64, ...))": build_spec,
    "tl.deferred + tl.build(tl.Spec(64, ...))": build_deferred,
}
VARIANTS = {**SIZES, **BUILD}
for v in VARIANTS.values():
    v.setup = warm  # type: ignore[attr-defined]

COLD = """
import time, torch
t = time.perf_counter()
{body}
print(time.perf_counter() - t)
"""
COLD_TL = "import torchlazy as tl\nfrom torch import nn\nm = nn.Sequential(tl.nn.Conv2d(8, 3), nn.Flatten(), tl.nn.Linear(10))\ntl.build(m, tl.Spec(1, 3, 32, 32))"
COLD_FAKE = "from torch._subclasses.fake_tensor import FakeTensorMode\nfrom torch import nn\nwith FakeTensorMode():\n    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(7200, 10))\n    m(torch.empty(1, 3, 32, 32))"


def cold(body: str) -> float:
    times = []
    for _ in range(runs()):
        out = subprocess.run([sys.executable, "-c", COLD.format(body=body)], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


if __name__ == "__main__":
    if "--variant" in sys.argv:
        child(VARIANTS)
        raise SystemExit
    rows = run_all(__file__, list(VARIANTS))
    results = dict(rows)
    counts = {results[name]["params"] for name in SIZES}
    assert len(counts) == 1, f"the ways of getting sizes disagree: {counts}"
    params = results[BUILD_BASELINE]["params"]
    print(table("Sizes of a 107M-parameter CNN whose sizes are all lazy", rows[: len(SIZES)], SIZES_BASELINE))
    print()
    print(table("Build from a Spec of batch 64", rows[len(SIZES) :], BUILD_BASELINE, params))
    ours, plain = cold(COLD_TL), cold(COLD_FAKE)
    print(f"\nCold start in a fresh process ({machine()}), after `import torch`, median of {runs()} runs:")
    print(f"  first tl.build (import torchlazy + shape inference + materialize): {ours:.3f} s")
    print(f"  first forward under PyTorch's FakeTensorMode, for comparison:  {plain:.3f} s  ({plain / ours:.1f}x ours)")
