"""Time to a model loaded from a checkpoint: torchlazy against every way a user could load it.

    python benchmarks/bench_checkpoint.py [--runs N]

The same ~160M-parameter Llama as bench_materialize.py, saved once as safetensors (and once with
`save_pretrained`), so the file is in the page cache for every run. Each variant runs in N fresh processes;
the table shows medians. Two timings per way of loading:
- "ready": the call returns a model whose tensors hold the checkpoint's values. Memory-mapped loaders
  (torchlazy, safetensors) have not read the pages yet at that point, so RSS is low and time is short;
- "ready + every value read once": then every parameter and buffer is read once (a sum over it), which
  is what the first forward pass or `.to(device)` will do anyway. This is the fair comparison.
Baselines: eager construction + `load_state_dict` (random init, then overwritten), the meta device +
`load_state_dict(assign=True)` (no init at all; non-persistent buffers such as rotary `inv_freq` stay on
meta and must be recomputed by hand), and transformers' own `from_pretrained`.
The RNG check counts random kernels run on real tensors during tl.materialize(checkpoint=).
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import child, run_all, table
from bench_materialize import make, warm_up
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import torchlazy as tl

PATH = os.path.join(tempfile.gettempdir(), "torchlazy-bench-llama.safetensors")
FOLDER = os.path.join(tempfile.gettempdir(), "torchlazy-bench-llama-hf")


class CountRandom(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.draws = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fake = any(isinstance(a, FakeTensor) for a in args)
        if torch.Tag.nondeterministic_seeded in func.tags and not fake:
            self.draws += 1
        return func(*args, **(kwargs or {}))


def read_every_value(model: torch.nn.Module) -> None:
    """Touch every element once (what a first forward or `.to(device)` does); meta tensors have nothing to read."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.device.type != "meta":
                t.sum()


def eager_load():
    model = make()
    model.load_state_dict(load_file(PATH))
    return model


def meta_assign():
    with torch.device("meta"):
        model = make()
    model.load_state_dict(load_file(PATH), assign=True)  # accelerate-style; buffers like inv_freq stay on meta
    return model


def from_pretrained():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(FOLDER)


def torchlazy_load(counter: CountRandom | None = None):
    with tl.deferred():
        model = make()
    if counter is None:
        return tl.materialize(model, checkpoint=PATH)
    with counter:
        return tl.materialize(model, checkpoint=PATH)


def ready(load):
    def variant():
        load()

    return variant


def read_once(load):
    def variant():
        read_every_value(load())

    return variant


def torchlazy_ready_counted():
    counter = CountRandom()
    torchlazy_load(counter)
    return {"draws": counter.draws}


BASELINE = "eager + load_state_dict, read once"
VARIANTS = {
    "eager + load_state_dict, ready": ready(eager_load),
    "meta + load_state_dict(assign=True), ready": ready(meta_assign),
    "transformers from_pretrained, ready": ready(from_pretrained),
    "tl.materialize(checkpoint=), ready": torchlazy_ready_counted,
    BASELINE: read_once(eager_load),
    "meta + load_state_dict(assign=True), read once": read_once(meta_assign),
    "transformers from_pretrained, read once": read_once(from_pretrained),
    "tl.materialize(checkpoint=), read once": read_once(torchlazy_load),
}
for v in VARIANTS.values():
    v.setup = warm_up  # type: ignore[attr-defined]


if __name__ == "__main__":
    if "--variant" in sys.argv:
        child(VARIANTS)
        raise SystemExit
    if not os.path.exists(PATH) or not os.path.exists(FOLDER):
        torch.manual_seed(0)
        source = make()
        tl.save(source, PATH)
        source.save_pretrained(FOLDER)
        del source
    rows = run_all(__file__, list(VARIANTS))
    with tl.deferred():
        params = sum(p.numel() * p.element_size() for p in make().parameters())  # nothing allocated
    print(table(f"Llama {params / 4 / 1e6:.0f}M from safetensors, float32, CPU", rows, BASELINE, params))
    draws = dict(rows)["tl.materialize(checkpoint=), ready"]["draws"]
    print(f"\nrandom kernels run on real tensors during tl.materialize(checkpoint=): {draws:.0f}")
