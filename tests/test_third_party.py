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


def test_a_summary_leaves_a_model_whose_forward_writes_its_weights_as_it_was() -> None:
    """RWKV's eval-mode forward rescales two weights in place (`weight.div_` under no_grad) and sets a flag. A
    summary with examples did that for real on an eager model (the fake mode runs an op on real tensors alone
    for real), and on a deferred one kept an autograd graph that held the parameters, so materialize refused."""
    from transformers import RwkvConfig, RwkvForCausalLM

    config = RwkvConfig(
        vocab_size=128, context_length=32, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
        intermediate_size=64, rescale_every=1,
    )  # fmt: skip
    ids = torch.randint(0, 128, (1, 8))
    torch.manual_seed(0)
    eager = RwkvForCausalLM(config).eval()
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    tl.summary(eager, input_ids=ids)
    tl.estimate_memory(eager, example_kwargs={"input_ids": ids}, mode="inference")
    assert not eager.rwkv.layers_are_rescaled
    assert all(torch.equal(before[k], v) for k, v in eager.state_dict().items())
    torch.manual_seed(0)
    with tl.deferred():
        model = RwkvForCausalLM(config)
    model.eval()
    tl.summary(model, input_ids=ids)
    tl.materialize(model)
    assert_models_identical(model, eager)
