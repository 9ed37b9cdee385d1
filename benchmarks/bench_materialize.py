"""Materialization vs eager construction: a ~160M and a ~0.5B transformer (Llama), and a plain Linear stack.

    python benchmarks/bench_materialize.py [--runs N] [--only 160m|500m|linear]

The ~0.5B table and the Linear stack measure exact-at-scale: dead draws jumped over (Llama's
`reset_parameters` draws that `_init_weights` redraws) and draws split over `torch.get_num_threads()`
workers; the Linear stack has no dead draws, so it shows the parallel gain alone (and the same with one
thread). The 160M table has `exact=False` next to the first-touch floor of the same bytes (elements/s).

Each variant runs in N fresh processes (the table shows medians); peak RSS growth is measured from just
before construction. What a variant builds is kept until its process ends (`_harness.keep`): the time is
construction's, without freeing the model afterwards, for every variant alike. Targets: exact time <= 1.1x eager, peak RSS <= 1.05x parameter bytes.
Baselines a user could pick instead: eager construction (what exact means), the meta device +
`to_empty` + transformers' `init_weights()` (no exactness, like `exact=False`), and eager construction
under `torch.set_default_dtype(torch.bfloat16)` (bf16 draws: other bits than casting fp32 eager).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _harness import child, keep, run_all, table

import torchlazy as tl


def config(hidden: int = 768, layers: int = 12, heads: int = 12):  # defaults: ~162M parameters
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


def make():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config())


def make_500m():  # ~0.47B parameters
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config(hidden=1024, layers=24, heads=16))


def make_linear():  # ~0.27B parameters, plain nn.Linear: kaiming_uniform_ weights, uniform_ biases, nothing redrawn
    return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(16)])


def _params(model: torch.nn.Module) -> dict:
    return {"params": sum(p.numel() * p.element_size() for p in model.parameters())}


def eager_of(factory):
    def variant():
        torch.manual_seed(0)
        return _params(keep(factory()))

    return variant


def exact_of(factory, threads: int | None = None):
    def variant():
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        with tl.deferred():
            model = keep(factory())
        tl.materialize(model)

    return variant


def first_touch():
    """The floor: fresh memory of the 160M model's float32 bytes, written once."""
    n = 162_000_000
    keep(torch.empty(n)).fill_(0.0)
    return {"elements": n}


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


def eager():
    torch.manual_seed(0)
    model = keep(make())
    return {"params": sum(p.numel() * p.element_size() for p in model.parameters())}


def deferred_exact():
    torch.manual_seed(0)
    with tl.deferred():
        model = keep(make())
    tl.materialize(model)


def deferred_fast():
    torch.manual_seed(0)
    with tl.deferred():
        model = keep(make())
    tl.materialize(model, exact=False)


def deferred_fast_only():
    """exact=False, the materialize step alone (construction outside the timing)."""
    torch.manual_seed(0)
    with tl.deferred():
        model = keep(make())
    import time

    start = time.perf_counter()
    tl.materialize(model, exact=False)
    return {"materialize_seconds": time.perf_counter() - start, **_params(model)}


def meta_init_weights():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = keep(make())
    model.to_empty(device="cpu")
    model.init_weights()


def eager_bf16():
    torch.manual_seed(0)
    keep(make().to(torch.bfloat16))


def eager_default_bf16():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        keep(make())
    finally:
        torch.set_default_dtype(torch.float32)


def deferred_bf16():
    torch.manual_seed(0)
    with tl.deferred():
        model = keep(make())
    tl.materialize(model, dtype=torch.bfloat16)


def deferred_only():
    with tl.deferred():
        make()


VARIANTS_500M = {
    "eager construction (0.5B)": eager_of(make_500m),
    "tl.deferred + tl.materialize (exact) (0.5B)": exact_of(make_500m),
    "tl.deferred + tl.materialize (exact, 1 thread) (0.5B)": exact_of(make_500m, threads=1),
}
VARIANTS_LINEAR = {
    "eager construction (Linear stack)": eager_of(make_linear),
    "tl.deferred + tl.materialize (exact) (Linear stack)": exact_of(make_linear),
    "tl.deferred + tl.materialize (exact, 1 thread) (Linear stack)": exact_of(make_linear, threads=1),
}
VARIANTS = {
    "eager construction": eager,
    "tl.deferred + tl.materialize (exact)": deferred_exact,
    "meta + to_empty + init_weights() (not exact)": meta_init_weights,
    "tl.deferred + tl.materialize(exact=False)": deferred_fast,
    "  ... its materialize step alone": deferred_fast_only,
    "first touch of 162M float32 (the memory floor)": first_touch,
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


ALL = {**VARIANTS, **VARIANTS_500M, **VARIANTS_LINEAR}
for v in ALL.values():
    v.setup = warm_up  # type: ignore[attr-defined]


def _only(name: str) -> bool:
    return "--only" not in sys.argv or sys.argv[sys.argv.index("--only") + 1] == name


if __name__ == "__main__":
    if "--variant" in sys.argv:
        child(ALL)
    else:
        if _only("160m"):
            rows = run_all(__file__, list(VARIANTS))
            params = dict(rows)["eager construction"]["params"]
            print(table(f"Llama {params / 4 / 1e6:.0f}M parameters, float32, CPU", rows, "eager construction", params))
            fast = dict(rows)["  ... its materialize step alone"]
            whole = dict(rows)["tl.deferred + tl.materialize(exact=False)"]
            floor = dict(rows)["first touch of 162M float32 (the memory floor)"]
            eager_s = dict(rows)["eager construction"]["seconds"]
            n = params / 4
            print(
                f"exact=False: deferred construction + materialize {eager_s / whole['seconds']:.2f}x faster than eager "
                f"construction (target >= 5x); its materialize step alone {n / fast['materialize_seconds'] / 1e6:.0f} M "
                f"elements/s ({eager_s / fast['materialize_seconds']:.1f}x); first-touch floor "
                f"{floor['elements'] / floor['seconds'] / 1e6:.0f} M elements/s\n"
            )
        for key, variants in (("500m", VARIANTS_500M), ("linear", VARIANTS_LINEAR)):
            if _only(key):
                rows = run_all(__file__, list(variants))
                base = next(iter(variants))
                params = dict(rows)[base]["params"]
                print(
                    table(f"{base.split('(')[-1][:-1]}: {params / 4 / 1e6:.0f}M parameters", rows, base, params) + "\n"
                )
