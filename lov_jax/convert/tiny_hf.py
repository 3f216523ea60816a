"""Tiny random HF LLaVA-OneVision checkpoints, built locally (no downloads).

Used by the parity tests and `lov-jax demo`; needs torch + transformers (extra `hf`).
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_hf(
    out_dir: str | Path,
    *,
    tie_word_embeddings: bool = True,
    num_heads: int = 6,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Save a tiny `LlavaOnevisionForConditionalGeneration` with real patch geometry,
    its tokenizer and processor files: a complete llava-hf checkpoint directory.

    Vision: 2 layers, width 32, 384px / patch 14 (729 patches). Text: 2 layers,
    width 48, GQA num_heads/num_kv_heads. `tokenizer`: a `lov_jax.testing.tokenizers.
    TokenizerSpec` (default: Qwen-2's); its special ids go into config.json and
    generation_config.json as llava-hf writes them. `vocab_size` defaults to the
    tokenizer's size. Returns the directory.
    """
    from data_pipelines.hf_processor import save_processor_configs
    from lov_jax.config import ModelConfig
    from lov_jax.testing import tokenizers as test_tokenizers
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    spec = tokenizer or test_tokenizers.qwen2()
    ids = spec.token_ids
    vocab_size = vocab_size or spec.vocab_size
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=384, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings, rope_theta=1e6,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        bos_token_id=ids.bos, eos_token_id=list(ids.eos), pad_token_id=ids.pad,
    )  # fmt: skip
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=ids.image,
        video_token_index=ids.video, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    # Random init leaves norms at 1/0 and the newline at 0: perturb them so parity
    # tests would notice a missing or misplaced term.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "image_newline" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = list(ids.eos)
    model.generation_config.pad_token_id = ids.pad
    model.generation_config.bos_token_id = ids.bos
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    test_tokenizers.save_tokenizer(spec, out_dir)
    save_processor_configs(out_dir, ModelConfig.from_hf_config(cfg.to_dict()))
    return out_dir
