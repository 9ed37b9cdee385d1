"""Third-party model code that never heard of torchlazy: exact, tied, runnable."""

from __future__ import annotations

import pytest
import torch
from exact import assert_models_identical
from models import MODELS

import torchlazy as tl


@pytest.mark.parametrize("name", MODELS)
def test_transformers_models_are_exact(name: str) -> None:
    make = MODELS[name]
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    torch.randn(100)
    tl.materialize(model)
    torch.manual_seed(0)
    reference = make()
    assert_models_identical(model, reference)
    assert tl.deferred_tensors(model) == []
    if name in ("gpt2", "bart", "t5", "llama", "bert"):
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        tied = reference.get_input_embeddings().weight is reference.get_output_embeddings().weight
        assert (emb is head) == tied


def test_gpt2_runs_and_trains_after_materialize_in_bf16() -> None:
    with tl.deferred():
        model = MODELS["gpt2"]()
    tl.materialize(model, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert model.transformer.wte.weight.grad is not None
    assert model.lm_head.weight is model.transformer.wte.weight


def test_sub_module_streaming_of_a_real_model_is_exact() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        model = MODELS["llama"]()
    for layer in reversed(model.model.layers):
        tl.materialize(layer)
    tl.materialize(model)
    torch.manual_seed(0)
    assert_models_identical(model, MODELS["llama"]())
