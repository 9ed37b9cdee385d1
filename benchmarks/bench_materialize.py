"""Materialization vs eager construction of a ~160M-parameter transformer (Llama architecture).

    python benchmarks/bench_materialize.py [--runs N]

Each variant runs in N fresh processes (the table shows medians); peak RSS growth is measured from just
before construction. Targets: exact time <= 1.1x eager, peak RSS <= 1.05x parameter bytes.
Baselines a user could pick instead: eager construction (what exact means), the meta device +
`to_empty` + transformers' `init_weights()` (no exactness, like `exact=False`), and eager construction
under `torch.set_default_dtype(torch.bfloat16)` (bf16 draws: other bits than casting fp32 eager).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import child, run_all, table

import torchlazy as tl


def config():  # ~162M parameters
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


def make():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config())


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


def eager():
    torch.manual_seed(0)
    model = make()
    return {"params": sum(p.numel() * p.element_size() for p in model.parameters())}


def deferred_exact():
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    tl.materialize(model)


def deferred_fast():
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    tl.materialize(model, exact=False)


def meta_init_weights():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = make()
    model.to_empty(device="cpu")
    model.init_weights()


def eager_bf16():
    torch.manual_seed(0)
    make().to(torch.bfloat16)


def eager_default_bf16():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        make()
    finally:
        torch.set_default_dtype(torch.float32)


def deferred_bf16():
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    tl.materialize(model, dtype=torch.bfloat16)


def deferred_only():
    with tl.deferred():
        make()


VARIANTS = {
    "eager construction": eager,
    "tl.deferred + tl.materialize (exact)": deferred_exact,
    "meta + to_empty + init_weights() (not exact)": meta_init_weights,
    "tl.deferred + tl.materialize(exact=False)": deferred_fast,
    "eager construction, then .to(bfloat16)": eager_bf16,
    "eager under set_default_dtype(bfloat16) (not exact)": eager_default_bf16,
    "tl.materialize(dtype=torch.bfloat16) (exact)": deferred_bf16,
    "tl.deferred alone (nothing allocated)": deferred_only,
}


def warm_up() -> None:
    """Imports and one-off costs, outside the measurement (a tiny model, nothing big allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    tiny = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    LlamaForCausalLM(tiny)
    with tl.deferred():
        small = LlamaForCausalLM(tiny)
    tl.materialize(small)


for v in VARIANTS.values():
    v.setup = warm_up  # type: ignore[attr-defined]


if __name__ == "__main__":
    if "--variant" in sys.argv:
        child(VARIANTS)
    else:
        rows = run_all(__file__, list(VARIANTS))
        params = dict(rows)["eager construction"]["params"]
        print(table(f"Llama {params / 4 / 1e6:.0f}M parameters, float32, CPU", rows, "eager construction", params))
