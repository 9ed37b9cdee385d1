"""Tiny configs of transformers model families for the exactness sweep (no downloads: built from configs)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

T = transformers
DECODER = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64,
)  # fmt: skip
ENCODER = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=128)
VISION = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=32)
SEQ2SEQ = dict(
    encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64,
)  # fmt: skip


FAMILIES: dict[str, Callable[[], object]] = {
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**DECODER, head_dim=8)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**DECODER)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(**{k: v for k, v in DECODER.items() if k != "num_key_value_heads"})
    ),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )  # fmt: skip
    ),
    "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**ENCODER)),
    "distilbert": lambda: T.DistilBertForMaskedLM(
        T.DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=4, vocab_size=128)
    ),
    "electra": lambda: T.ElectraForPreTraining(T.ElectraConfig(**ENCODER, embedding_size=16)),
    "albert": lambda: T.AlbertForMaskedLM(T.AlbertConfig(**ENCODER, embedding_size=16)),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=128)),
    "falcon": lambda: T.FalconForCausalLM(
        T.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128)
    ),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "mamba": lambda: T.MambaForCausalLM(
        T.MambaConfig(num_hidden_layers=2, hidden_size=32, state_size=8, vocab_size=128, use_mambapy=True)
    ),
    "mbart": lambda: T.MBartForConditionalGeneration(T.MBartConfig(**SEQ2SEQ)),
    "whisper": lambda: T.WhisperForConditionalGeneration(
        T.WhisperConfig(
            **{k: v for k, v in SEQ2SEQ.items() if k != "max_position_embeddings"},
            num_mel_bins=8,
            max_source_positions=32,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            decoder_start_token_id=0,
        )  # fmt: skip
    ),
    "clip": lambda: T.CLIPModel(
        T.CLIPConfig(
            text_config=dict(**ENCODER, max_position_embeddings=32),
            vision_config=dict(**VISION, patch_size=8),
            projection_dim=16,
        )
    ),
    "swin": lambda: T.SwinForImageClassification(
        T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    ),
    "convnext": lambda: T.ConvNextForImageClassification(
        T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], drop_path_rate=0.1)
    ),
    "deit": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**VISION, patch_size=8)),
    "resnet": lambda: T.ResNetForImageClassification(
        T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ),
}
