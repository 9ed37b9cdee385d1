"""Shape inference from a Spec vs a real dry run, build vs initialization alone, and cold start.

    python benchmarks/bench_build.py

The model is a 107M-parameter VGG-style CNN whose sizes are all lazy.
- summary from tl.Spec vs a dry run of torch's own Lazy* layers at batch 8, 224x224 (target >= 100x faster)
- tl.build from a Spec of batch 64 vs initializing the same parameters alone (eager, explicit sizes;
  target <= 1.2x, peak RSS growth ~ the parameters)
- cold start: the first tl.build in a fresh process, vs a first forward under PyTorch's FakeTensorMode
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import child, machine, run, table
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


def summary_spec():
    tl.summary(lazy_cnn(), tl.Spec(8, 3, 224, 224))


def eager_init():
    model = eager_cnn()
    return {"params": sum(p.numel() * p.element_size() for p in model.parameters())}


def build_spec():
    tl.build(lazy_cnn(), tl.Spec(64, 3, 224, 224))


def build_deferred():
    with tl.deferred():
        model = lazy_cnn()
    tl.build(model, tl.Spec(64, 3, 224, 224))


VARIANTS = {
    "torch Lazy* dry run, batch 8": dry_run,
    "tl.summary from tl.Spec(8, 3, 224, 224)": summary_spec,
    "eager init, explicit sizes": eager_init,
    "tl.build(lazy, tl.Spec(64, ...))": build_spec,
    "tl.deferred + tl.build(tl.Spec(64, ...))": build_deferred,
}
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
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", COLD.format(body=body)], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return min(times)


if __name__ == "__main__":
    if "--variant" in sys.argv:
        child(VARIANTS)
        raise SystemExit
    rows = [(name, run(__file__, name, repeat=2)) for name in VARIANTS]
    results = dict(rows)
    params = results["eager init, explicit sizes"]["params"]
    print(table("Shape inference: 107M-parameter CNN", rows[:2], "torch Lazy* dry run, batch 8"))
    print()
    print(table("Build from a Spec of batch 64", rows[2:], "eager init, explicit sizes", params))
    start = time.perf_counter()
    ours, plain = cold(COLD_TL), cold(COLD_FAKE)
    print(f"\nCold start in a fresh process ({machine()}), after `import torch`:")
    print(f"  first tl.build (import torchlazy + shape inference + materialize): {ours:.3f} s")
    print(f"  first forward under PyTorch's FakeTensorMode, for comparison:  {plain:.3f} s  ({plain / ours:.1f}x ours)")
