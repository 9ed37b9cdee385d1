"""Real third-party model families built from small configs (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def gpt2() -> object:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def bart() -> object:
    cfg = transformers.BartConfig(
        encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(cfg)


def t5() -> object:
    cfg = transformers.T5Config(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=128)
    return transformers.T5ForConditionalGeneration(cfg)


def llama() -> object:
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def vit() -> object:
    cfg = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=32, patch_size=8
    )
    return transformers.ViTForImageClassification(cfg)


def bert() -> object:
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128
    )
    return transformers.BertForMaskedLM(cfg)


MODELS: dict[str, Callable[[], object]] = {
    "gpt2": gpt2,
    "bart": bart,
    "t5": t5,
    "llama": llama,
    "vit": vit,
    "bert": bert,
}
