"""FLOPs and training memory of a deferred ~0.5B-parameter Llama, with nothing allocated.

    python benchmarks/bench_costs.py

Each variant runs in a fresh process (peak RSS growth measured there with psutil/getrusage):
- deferred construction alone (the baseline),
- construction + `tl.summary(..., flops=True)`,
- construction + `tl.estimate_memory(...)` (AdamW, one steady-state step on fake tensors).
Target: peak RSS growth < 150 MB for each, whatever the model's size.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import child, run, table

import torchlazy as tl

INPUT = tl.Spec(1, 512, dtype=torch.long)


def config() -> object:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return cfg


def construct() -> torch.nn.Module:
    import transformers

    with tl.deferred():
        return transformers.LlamaForCausalLM(config())


def warm() -> None:
    import transformers

    small = config()
    small.hidden_size, small.intermediate_size, small.num_hidden_layers, small.vocab_size = 64, 128, 1, 128
    small.num_attention_heads = small.num_key_value_heads = 4
    with tl.deferred():
        model = transformers.LlamaForCausalLM(small)
    tl.summary(model, tl.Spec(1, 8, dtype=torch.long), flops=True)
    tl.estimate_memory(model, tl.Spec(1, 8, dtype=torch.long))


def only_construct() -> dict[str, object]:
    model = construct()
    return {"params": sum(p.numel() for p in model.parameters())}


def with_flops() -> dict[str, object]:
    s = tl.summary(construct(), INPUT, flops=True)
    return {"flops": s.total_flops, "flops_train": s.total_flops_train}


def with_memory() -> dict[str, object]:
    m = tl.estimate_memory(construct(), INPUT)
    return {"peak": m.peak, "breakdown": m.breakdown()}


VARIANTS = {
    "deferred construction": only_construct,
    "+ summary(flops=True)": with_flops,
    "+ estimate_memory": with_memory,
}
for f in VARIANTS.values():
    f.setup = warm  # type: ignore[attr-defined]


if __name__ == "__main__":
    if "--variant" in sys.argv:
        child(VARIANTS)
        raise SystemExit
    results = [(name, run(__file__, name)) for name in VARIANTS]
    params = int(results[0][1]["params"])
    print(
        table(
            f"Costs of a deferred Llama ({params / 1e9:.2f}B parameters, input 1x512)",
            results,
            "deferred construction",
            params * 4,
        )
    )
    flops, memory = results[1][1], results[2][1]
    print(f"\nforward {flops['flops'] / 1e12:.2f} TFLOP, forward+backward {flops['flops_train'] / 1e12:.2f} TFLOP")
    print(
        f"AdamW step peak {memory['peak'] / 2**30:.2f} GiB: "
        + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in memory["breakdown"].items())
    )
