"""Tiny random HF LLaVA checkpoints (OneVision, LLaVA-1.5, LLaVA-NeXT) and the inputs to
compare them on.

Built locally (no downloads); used by the parity tests, the benchmarks and the demo's
checks. Needs torch + transformers (extra `hf`).

`make_tiny_hf` saves a complete llava-hf OneVision checkpoint directory (weights,
config.json, generation_config.json, tokenizer and processor files); `make_tiny_llava_hf`
a LLaVA-1.5 (`LlavaForConditionalGeneration`) or LLaVA-NeXT
(`LlavaNextForConditionalGeneration`) one: CLIP at the real 336/14 geometry with LLaVA's
`vision_feature_layer=-2`, and a Vicuna-, Llama-3- or Mistral-style LLM on a small BPE
with that family's specials and template (never the Qwen vocabulary). Sizes, vocabulary, tying, GQA,
seed and the placeholder ids are keyword arguments; the special ids default to the
tokenizer's (`lov_jax.testing.tokenizers.qwen2()`: llava-hf OneVision's), never to a
literal here.

The sample builders give the same prompt two ways: our crops + expanded tokens (the
batch contract, lov_jax/batch.py) and the kwargs HF's forward takes.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lov_jax import visual_layout
from lov_jax.config import ModelConfig

# Text sizes of the tiny LLM (vision stays the 2-layer, 32-wide SigLIP with real 384/14
# patch geometry, 729 patches per crop).
TINY_TEXT = {"hidden_size": 48, "intermediate_size": 96, "num_layers": 2, "num_heads": 6,
             "num_kv_heads": 2}  # fmt: skip
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4}


def make_tiny_hf(
    out_dir: str | Path,
    *,
    tie_word_embeddings: bool = True,
    hidden_size: int = TINY_TEXT["hidden_size"],
    intermediate_size: int = TINY_TEXT["intermediate_size"],
    num_layers: int = TINY_TEXT["num_layers"],
    num_heads: int = TINY_TEXT["num_heads"],
    num_kv_heads: int = TINY_TEXT["num_kv_heads"],
    vision: dict | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer=None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
) -> Path:
    """Save a tiny `LlavaOnevisionForConditionalGeneration`; returns the directory.

    Text: `num_layers` Qwen-2 blocks of width `hidden_size`, GQA `num_heads` /
    `num_kv_heads`. Vision: `TINY_VISION` updated by `vision` (same keys). `tokenizer`:
    a `lov_jax.testing.tokenizers.TokenizerSpec` (default Qwen-2's); its special ids go
    into config.json and generation_config.json as llava-hf writes them, and
    `image_token_id` / `video_token_id` (default: the tokenizer's `<image>` / `<video>`)
    into config.json. `vocab_size` defaults to the tokenizer's size; a `vocab_size`
    below Qwen-2's with no `tokenizer` gets a ChatML BPE of that size
    (`tokenizers.small_bpe(vocab_size, style="chatml")`), so every special id lies
    inside the embedding table.
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from data_pipelines.hf_processor import save_processor_configs
    from lov_jax.testing import tokenizers as test_tokenizers

    spec = tokenizer or test_tokenizers.qwen2()
    if tokenizer is None and vocab_size is not None and vocab_size < spec.vocab_size:
        spec = test_tokenizers.small_bpe(vocab_size, style="chatml")
    ids = spec.token_ids
    image_token_id = ids.image if image_token_id is None else image_token_id
    video_token_id = ids.video if video_token_id is None else video_token_id
    v = dict(TINY_VISION, **(vision or {}))
    torch.manual_seed(seed)
    vision_cfg = SiglipVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"],
        image_size=384, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=vocab_size or spec.vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings, rope_theta=1e6,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        bos_token_id=ids.bos, eos_token_id=list(ids.eos), pad_token_id=ids.pad,
    )  # fmt: skip
    cfg = LlavaOnevisionConfig(
        vision_config=vision_cfg, text_config=text, image_token_index=image_token_id,
        video_token_index=video_token_id, vision_feature_layer=-1,
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


# Tiny CLIP with the real CLIP-L/336 patch geometry (24x24 = 576 patches + CLS): 3 layers
# in the file, of which LLaVA's vision_feature_layer -2 uses 2.
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 3, "num_heads": 4}
# LLM flavours: (HF model_type, test tokenizer style, text_config keys). Vicuna: MHA,
# rope 1e4; Llama-3: GQA 8/2, rope 5e5; Mistral: GQA 4/2, rope 1e6, a sliding window.
TINY_LLMS: dict[str, tuple[str, str, dict]] = {
    "vicuna": ("llama", "vicuna", {"num_attention_heads": 4, "num_key_value_heads": 4,
                                   "rope_theta": 1e4}),
    "llama3": ("llama", "llama3", {"num_attention_heads": 8, "num_key_value_heads": 2,
                                   "rope_theta": 5e5}),
    "mistral": ("mistral", "mistral", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                       "rope_theta": 1e6}),
}  # fmt: skip
# LLaVA-NeXT's 5 default pinpoints ((h, w), multiples of 336)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# A Vicuna template that also renders videos (images, then videos, then text), the
# layout of llava-hf LLaVA-NeXT-Video's "USER: <video>\n{question} ASSISTANT:".
NEXT_VIDEO_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def make_tiny_llava_hf(
    out_dir: str | Path,
    *,
    architecture: str = "llava",
    llm: str = "vicuna",
    sliding_window: int | None = 64,
    vision: dict | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_grid_pinpoints: list | None = None,
    hidden_size: int = TINY_TEXT["hidden_size"],
    intermediate_size: int = TINY_TEXT["intermediate_size"],
    num_layers: int = TINY_TEXT["num_layers"],
    tie_word_embeddings: bool = False,
    tokenizer=None,
    vocab_size: int | None = None,
    seed: int = 0,
    spatial_pool_mode: str = "average",
    spatial_pool_stride: int = 2,
) -> Path:
    """Save a tiny `LlavaForConditionalGeneration` (architecture "llava"),
    `LlavaNextForConditionalGeneration` ("llava_next") or
    `LlavaNextVideoForConditionalGeneration` ("llava_next_video": NeXT plus its
    `spatial_pool_mode` / `spatial_pool_stride` video pooler, `NEXT_VIDEO_TEMPLATE`);
    returns the directory. `vision` may set `image_size` (default 336; patch 14).

    llm: a `TINY_LLMS` flavour ("vicuna", "llama3", "mistral"); `sliding_window` is the
    Mistral flavour's window (None: full causal, as Mistral-7B-Instruct-v0.2), ignored
    otherwise. Vision: `TINY_CLIP` updated by `vision`. `tokenizer` defaults to
    `tokenizers.small_bpe(700, style=<the flavour's>)`; the embedding table gets
    `vocab_size` rows (default: the tokenizer's size rounded up to a multiple of 64, as
    llava-hf's converter pads it; the extra rows are never produced by the tokenizer).
    Its special ids go into config.json / generation_config.json as llava-hf writes them.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        MistralConfig,
    )

    from data_pipelines.hf_processor import save_processor_configs
    from lov_jax.testing import tokenizers as test_tokenizers

    if llm not in TINY_LLMS:
        raise ValueError(f"llm {llm!r} not in {sorted(TINY_LLMS)}")
    classes = {"llava": (LlavaConfig, LlavaForConditionalGeneration),
               "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
               "llava_next_video": (LlavaNextVideoConfig,
                                    LlavaNextVideoForConditionalGeneration)}  # fmt: skip
    if architecture not in classes:
        raise ValueError(f"architecture {architecture!r} not in {sorted(classes)}")
    model_type, style, text_kw = TINY_LLMS[llm]
    spec = tokenizer or test_tokenizers.small_bpe(700, style=style)
    if tokenizer is None and architecture == "llava_next_video":
        spec = dataclasses.replace(spec, chat_template=NEXT_VIDEO_TEMPLATE)
    ids = spec.token_ids
    rows = vocab_size or -(-spec.vocab_size // 64) * 64
    v = dict(TINY_CLIP, **(vision or {}))
    torch.manual_seed(seed)
    vision_cfg = CLIPVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"],
        image_size=v.get("image_size", 336), patch_size=14, hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=v["hidden_size"],
    )  # fmt: skip
    rope = text_kw["rope_theta"]
    text_args = dict(
        vocab_size=rows, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=text_kw["num_attention_heads"],
        num_key_value_heads=text_kw["num_key_value_heads"], rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": rope, "rope_type": "default"},
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=4096,
        bos_token_id=ids.bos, eos_token_id=list(ids.eos), pad_token_id=ids.pad,
    )  # fmt: skip
    if model_type == "mistral":
        text = MistralConfig(**text_args, sliding_window=sliding_window)
    else:
        text = LlamaConfig(**text_args)
    config_cls, model_cls = classes[architecture]
    extra = {}
    if architecture in ("llava_next", "llava_next_video"):
        extra["image_grid_pinpoints"] = image_grid_pinpoints or NEXT_PINPOINTS
    if architecture == "llava_next_video":
        extra |= {"video_token_index": ids.video, "spatial_pool_mode": spatial_pool_mode,
                  "spatial_pool_stride": spatial_pool_stride}  # fmt: skip
    cfg = config_cls(
        vision_config=vision_cfg, text_config=text, image_token_index=ids.image,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        tie_word_embeddings=tie_word_embeddings, **extra,
    )  # fmt: skip
    model = model_cls(cfg).eval()
    # Random init leaves norms at 1/0, biases and the newline at 0: perturb them so
    # parity tests would notice a missing or misplaced term.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("norm", "image_newline", "class_embedding")) or (
                name.endswith("bias")
            ):
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = list(ids.eos)
    model.generation_config.pad_token_id = ids.pad
    model.generation_config.bos_token_id = ids.bos
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    test_tokenizers.save_tokenizer(spec, out_dir)
    save_processor_configs(out_dir, ModelConfig.from_hf_config(cfg.to_dict()))
    return out_dir


# ---- the same prompt for HF and for us ------------------------------------------------------


@dataclass
class Sample:
    """One prompt: our crops and tokens plus what HF's forward needs."""

    tokens: np.ndarray  # int32[T]
    crops: np.ndarray  # uint8[n, 384, 384, 3]
    items: list  # list[visual_layout.VisualItem]
    hf_kwargs: dict  # pixel_values / image_sizes / batch_num_images / pixel_values_videos


@functools.cache
def chat_frame(tokenizer=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(head, tail) ids around the visual items: "<|im_start|>user\\n" and
    "\\nWhat is this?<|im_end|>\\n<|im_start|>assistant\\n" in `tokenizer`
    (a `tokenizers.Tokenizer`; default Qwen-2's)."""
    if tokenizer is None:
        from data_pipelines.tokenizer import build_qwen2_tokenizer

        tokenizer = build_qwen2_tokenizer()
    head = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False).ids
    tail = tokenizer.encode(
        "\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    ).ids
    return tuple(head), tuple(tail)


def to_hf_pixels(crops: np.ndarray, vision=None) -> np.ndarray:
    """uint8[n, S, S, 3] -> float32[n, 3, S, S] normalised like HF: (x/255 - mean)/std in
    fp32 with `vision`'s (a VisionConfig) statistics; None: SigLIP's 0.5 / 0.5."""
    mean = np.float32(0.5 if vision is None else vision.image_mean)
    std = np.float32(0.5 if vision is None else vision.image_std)
    x = crops.astype(np.float32) * np.float32(1 / 255)
    return ((x - mean) / std).transpose(0, 3, 1, 2)


def random_image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def expand(items, cfg: ModelConfig, frame=None) -> np.ndarray:
    """Token ids: head, each item's expanded placeholder run (then a newline), tail.

    `frame`: (head, tail) ids, default `chat_frame()`; the newline is the tail's first id.
    """
    head, tail = frame or chat_frame()
    ids = list(head)
    for item in items:
        token = cfg.ids.video if item.kind == "video" else cfg.ids.image
        ids += [token] * visual_layout.num_tokens(item, cfg) + [tail[0]]
    return np.asarray(ids + list(tail), np.int32)


def single_image_sample(
    h: int, w: int, cfg: ModelConfig, seed: int = 0, *, frame=None, kind: str | None = None
) -> Sample:
    """One random HxW image as the architecture's processor takes it (`kind`: default
    `image_processing.image_kind`): LLaVA-1.5 one crop, pixel_values [1, 3, S, S];
    NeXT / OneVision anyres crops, pixel_values [1, n, 3, S, S] with image_sizes."""
    from data_pipelines import image_processing

    kind = kind or image_processing.image_kind(cfg, 1)
    crops, item = image_processing.preprocess(kind, random_image(h, w, seed), cfg)
    pixels = to_hf_pixels(crops, cfg.vision)
    if cfg.architecture == "llava":  # LlavaForConditionalGeneration: one crop per image
        torch_kwargs = {"pixel_values": pixels}
    else:
        torch_kwargs = {"pixel_values": pixels[None], "image_sizes": np.asarray([[h, w]])}
    return Sample(expand([item], cfg, frame), crops, [item], torch_kwargs)


def multi_turn_sample(sizes, cfg: ModelConfig, seed: int = 0, *, frame=None) -> Sample:
    """One image per user turn, turns one after another (each `frame`d like
    `single_image_sample`), as the architecture's processor batches them: LLaVA-1.5
    pixel_values [n, 3, S, S]; NeXT [n, max crops, 3, S, S] zero padded + image_sizes."""
    turns = [single_image_sample(h, w, cfg, seed + i, frame=frame) for i, (h, w) in
             enumerate(sizes)]  # fmt: skip
    crops = np.concatenate([t.crops for t in turns])
    items = [item for t in turns for item in t.items]
    if cfg.architecture == "llava":
        kwargs = {"pixel_values": np.concatenate([t.hf_kwargs["pixel_values"] for t in turns])}
    else:
        most = max(len(t.crops) for t in turns)
        px = np.zeros((len(turns), most, *turns[0].hf_kwargs["pixel_values"].shape[2:]),
                      np.float32)  # fmt: skip
        for i, t in enumerate(turns):
            px[i, : len(t.crops)] = t.hf_kwargs["pixel_values"][0]
        kwargs = {"pixel_values": px, "image_sizes": np.asarray(sizes)}
    return Sample(np.concatenate([t.tokens for t in turns]), crops, items, kwargs)


def multi_image_sample(sizes, cfg: ModelConfig, seed: int = 0) -> Sample:
    from data_pipelines import image_processing

    crops, items = [], []
    for i, (h, w) in enumerate(sizes):
        c, item = image_processing.preprocess("pad", random_image(h, w, seed + i), cfg)
        crops.append(c)
        items.append(item)
    crops = np.concatenate(crops)
    torch_kwargs = {
        "pixel_values": to_hf_pixels(crops)[:, None],  # [num_images, 1 crop, 3, S, S]
        "image_sizes": np.asarray(sizes),
        "batch_num_images": np.asarray([len(sizes)]),
    }
    return Sample(expand(items, cfg), crops, items, torch_kwargs)


def video_sample(num_frames: int, cfg: ModelConfig, seed: int = 0, *, frame=None) -> Sample:
    """One random 240x320 video of `num_frames` frames: pixel_values_videos [1, F, 3, S, S]."""
    from data_pipelines import image_processing

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (num_frames, 240, 320, 3), dtype=np.uint8)
    crops = image_processing.video_frames(frames, cfg)
    item = visual_layout.VisualItem(kind="video", num_frames=num_frames)
    torch_kwargs = {"pixel_values_videos": to_hf_pixels(crops, cfg.vision)[None]}
    return Sample(expand([item], cfg, frame), crops, [item], torch_kwargs)


def text_sample() -> Sample:
    head, tail = chat_frame()
    body = [9707, 11, 1879, 0, 3555]  # ordinary text ids, inside any test vocabulary
    tokens = np.asarray(list(head) + body + list(tail), np.int32)
    return Sample(tokens, np.zeros((0, 384, 384, 3), np.uint8), [], {})


def our_batch(samples, cfg: ModelConfig, length: int, num_crops: int, pack: bool = False):
    """Batch-contract arrays: one sample per row, or all samples packed into one row."""
    rows = [samples] if pack else [[s] for s in samples]
    size = cfg.vision.image_size
    b = len(rows)
    batch = {
        "tokens": np.zeros((b, length), np.int32),
        "positions": np.zeros((b, length), np.int32),
        "segment_ids": np.zeros((b, length), np.int32),
        "pixels": np.zeros((b, num_crops, size, size, 3), np.uint8),
    }
    vis_idx, vis_w = [], []
    for r, row in enumerate(rows):
        t = c = 0
        for seg, s in enumerate(row, start=1):
            n = len(s.tokens)
            batch["tokens"][r, t : t + n] = s.tokens
            batch["positions"][r, t : t + n] = np.arange(n)
            batch["segment_ids"][r, t : t + n] = seg
            batch["pixels"][r, c : c + len(s.crops)] = s.crops
            t, c = t + n, c + len(s.crops)
        items = [item for s in row for item in s.items]
        idx, w = visual_layout.place_taps(batch["tokens"][r], items, cfg, num_crops)
        vis_idx.append(idx)
        vis_w.append(w)
    batch["vis_idx"] = np.stack(vis_idx)
    batch["vis_w"] = np.stack(vis_w)
    return batch


def hf_logits(model, sample: Sample) -> np.ndarray:
    """float32[T, V] logits of the HF model for one unpadded sample."""
    import torch

    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in sample.hf_kwargs.items()}
    ids = torch.from_numpy(sample.tokens.astype(np.int64))[None]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out.logits[0].float().numpy()


def hf_embeds_and_logits(model, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(float32[T, D] merged input embeddings the HF model's LLM receives, float32[T, V]
    logits) for one unpadded sample."""
    seen = {}

    def grab(_, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0].numpy()

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits = hf_logits(model, sample)
    finally:
        hook.remove()
    return seen["embeds"], logits
