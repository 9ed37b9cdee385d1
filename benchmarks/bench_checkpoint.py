"""Time to a ready model from a checkpoint: eager construction + load_state_dict vs tl.materialize(checkpoint=).

    python benchmarks/bench_checkpoint.py

The same ~160M-parameter Llama as bench_materialize.py, saved once as safetensors.
Targets: >= 5x faster than eager + load_state_dict, peak RSS <= 1.1x the model.
The RNG check counts random kernels run on real tensors during materialization.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import child, run, table
from bench_materialize import make, warm_up
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import torchlazy as tl

PATH = os.path.join(tempfile.gettempdir(), "torchlazy-bench-llama.safetensors")


class CountRandom(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.draws = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fake = any(isinstance(a, FakeTensor) for a in args)
        if torch.Tag.nondeterministic_seeded in func.tags and not fake:
            self.draws += 1
        return func(*args, **(kwargs or {}))


def eager_load():
    model = make()
    model.load_state_dict(load_file(PATH))
    return {"params": sum(p.numel() * p.element_size() for p in model.parameters())}


def eager_load_assign():
    with torch.device("meta"):
        model = make()
    model.load_state_dict(load_file(PATH), assign=True)  # accelerate-style; buffers like inv_freq stay wrong
    return {}


def torchlazy_load():
    with tl.deferred():
        model = make()
    with CountRandom() as counter:
        tl.materialize(model, checkpoint=PATH)
    return {"draws": counter.draws}


VARIANTS = {
    "eager construction + load_state_dict": eager_load,
    "meta + load_state_dict(assign=True)": eager_load_assign,
    "tl.deferred + tl.materialize(checkpoint=)": torchlazy_load,
}
for v in VARIANTS.values():
    v.setup = warm_up  # type: ignore[attr-defined]


if __name__ == "__main__":
    if "--variant" in sys.argv:
        child(VARIANTS)
        raise SystemExit
    if not os.path.exists(PATH):
        torch.manual_seed(0)
        tl.save(make(), PATH)
    rows = [(name, run(__file__, name, repeat=2)) for name in VARIANTS]
    params = dict(rows)["eager construction + load_state_dict"]["params"]
    print(
        table(
            f"Llama {params / 4 / 1e6:.0f}M from safetensors, float32, CPU",
            rows,
            "eager construction + load_state_dict",
            params,
        )
    )
    draws = dict(rows)["tl.deferred + tl.materialize(checkpoint=)"]["draws"]
    print(f"\nrandom kernels run on real tensors during tl.materialize(checkpoint=): {draws}")
