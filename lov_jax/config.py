"""Frozen model configs, named presets, and HF `config.json` round trip.

Every size lives here (docs/style.md 5). Values follow docs/reference.md 1.1-1.4; the
presets use the llava-hf vocab sizes (Qwen vocab + 2, padded to a multiple of
64), but loaders must trust tensor shapes over these numbers (docs/reference.md 1.3).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from lov_jax.token_ids import TokenIds

if TYPE_CHECKING:
    from lov_jax.models.rope import RopeScaling

# 36 (h, w) pairs: outer loop over heights, inner over widths, multiples of 384.
_GRID_SIDES = (384, 768, 1152, 1536, 1920, 2304)
ANYRES_GRID_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (h, w) for h in _GRID_SIDES for w in _GRID_SIDES
)

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# The model class a config is (HF `model_type`): LLaVA-1.5 has no image_newline and one
# crop per image; LLaVA-NeXT adds anyres crops and one newline per grid row; OneVision
# adds anyres_max_N downsampling, multi-image and video.
# LLaVA-NeXT-Video is NeXT for images plus frames pooled before the projector, no newline.
ARCHITECTURES = ("llava", "llava_next", "llava_onevision", "llava_next_video", "llava_mini")
# Which tower outputs become visual tokens (HF `vision_feature_select_strategy`):
# "default" drops the first (CLS) position, "full" keeps all.
FEATURE_SELECTS = ("default", "full")
# Attention kernels (lov_jax/models/attention.py); "auto" picks one per backend and call.
ATTENTION_IMPLS = ("xla", "chunked", "splash", "pallas_gpu", "cudnn", "auto")
# Vision-tower MLP activations (HF `hidden_act`): SigLIP's tanh GELU, CLIP's x*sigmoid(1.702x).
VISION_ACTS = ("gelu_pytorch_tanh", "quick_gelu", "gelu")
# How an image becomes crops, per architecture (data_pipelines/image_processing.py does it):
# "pad" = original LLaVA-1.5 expand2square with the mean colour, "center_crop" = llava-hf
# LLaVA-1.5 (CLIPImageProcessor), "anyres" = LLaVA-NeXT (grid crops, no downsample),
# "anyres_max_N" = OneVision (bilinear downsample above N crops' worth of patches).
ASPECT_RATIOS = {
    "llava": ("pad", "center_crop"),
    "llava_next": ("anyres",),
    "llava_onevision": ("anyres_max_N",),
    "llava_next_video": ("anyres",),
    "llava_mini": ("center_crop", "pad"),  # CLIPImageProcessor 'square' / expand2square
}
_ANYRES_MAX = re.compile(r"anyres_max_([1-9][0-9]*)")
# Pixel normalisation (HF image processors' image_mean / image_std): SigLIP maps to [-1, 1],
# CLIP uses OpenAI's dataset statistics (transformers OPENAI_CLIP_MEAN / _STD).
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower: SigLIP (OV drops the last of SO400M's 27 layers) or CLIP.

    `kind` names the tower's family (lov_jax/models/families.py). `num_layers` is the
    number of layers RUN and stored: the feature layer's depth (HF
    `hidden_states[vision_feature_layer]`), e.g. 23 of CLIP-L's 24 for LLaVA's -2.
    `image_mean` / `image_std` normalise uint8 pixels in-model (and give the pad colour)."""

    kind: str = "siglip"
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    feature_select: str = "full"  # one of FEATURE_SELECTS
    hidden_act: str = "gelu_pytorch_tanh"  # one of VISION_ACTS
    image_mean: tuple[float, float, float] = SIGLIP_MEAN
    image_std: tuple[float, float, float] = SIGLIP_STD

    def __post_init__(self):
        if self.feature_select not in FEATURE_SELECTS:
            raise ValueError(f"feature_select {self.feature_select!r} not in {FEATURE_SELECTS}")
        if self.hidden_act not in VISION_ACTS:
            raise ValueError(f"vision hidden_act {self.hidden_act!r} not in {VISION_ACTS}")
        if self.num_layers < 1:
            raise ValueError(f"vision num_layers {self.num_layers}: the tower runs >= 1 layer")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != self.num_channels or (name == "image_std" and min(value) <= 0):
                raise ValueError(f"vision {name} {value}: {self.num_channels} values (std > 0)")

    @property
    def has_cls(self) -> bool:
        """Whether the tower prepends a class token (CLIP) to its patch sequence."""
        return self.kind == "clip"

    @property
    def num_features(self) -> int:
        """Visual tokens per crop after feature selection: the feature bank's stride."""
        return self.num_patches + int(self.has_cls) - int(self.feature_select == "default")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        # VALID conv: 384 // 14 = 27; the last 6 pixel rows/cols are never seen.
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2


# How video frames become tokens (../shared/REFERENCE_VIDEO_POST.md 1.2, 2.2-2.4).
VIDEO_POOL_MODES = ("bilinear", "average", "max")
VIDEO_NEWLINES = ("grid", "frame", "one_token", "no_token")


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """A video frame's P x P features -> visual tokens (lov_jax/video_pool.py has the
    geometry, lov_jax/visual_layout.py the taps).

    pool_mode / pool_stride: LLaVA-Video's `get_2dPool` ("bilinear": torch bilinear to
    ceil(P/s); "average" / "max": s x s windows, floor(P/s)) or HF's
    `LlavaNextVideoPooler` (average / max). `pool_before_projector`: NeXT-Video's
    `vision_resampler` pools the tower's features, then projects; OneVision / LLaVA-Video
    project first. `newline`: `mm_newline_position` ("grid": after every row of every
    frame; "frame": after every frame; "one_token": once after the video; "no_token").
    `faster`: `add_faster_video` (SlowFast, "grid" only): frame i is slow (stride s) when
    i % faster_stride == 0, else fast (stride 2s); every frame ends with `faster_token`.
    """

    pool_mode: str = "bilinear"
    pool_stride: int = 2
    pool_before_projector: bool = False
    newline: str = "one_token"
    faster: bool = False
    faster_stride: int = 10

    def __post_init__(self):
        if self.pool_mode not in VIDEO_POOL_MODES:
            raise ValueError(f"video pool_mode {self.pool_mode!r} not in {VIDEO_POOL_MODES}")
        if self.newline not in VIDEO_NEWLINES:
            raise ValueError(f"video newline {self.newline!r} not in {VIDEO_NEWLINES}")
        if self.pool_stride < 1 or self.faster_stride < 1:
            raise ValueError(
                f"video pool_stride {self.pool_stride} / faster_stride {self.faster_stride}: >= 1"
            )
        if self.pool_before_projector and self.pool_mode == "bilinear":
            raise ValueError(
                "video pool_mode 'bilinear' pools after the projector (get_2dPool); "
                "before it (LlavaNextVideoPooler) only 'average' / 'max'"
            )
        if self.faster and self.newline != "grid":
            raise ValueError(
                f"video faster (add_faster_video) needs newline 'grid', got {self.newline!r} "
                "(the reference uses the faster_token in its grid branch only)"
            )


# LLaVA-NeXT-Video (HF LlavaNextVideoConfig defaults): 2x2 average before the projector.
NEXT_VIDEO = VideoConfig(pool_mode="average", pool_before_projector=True, newline="no_token")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen-2 decoder; `kind` names the LLM's family (lov_jax/models/families.py)."""

    kind: str = "qwen2"
    vocab_size: int = 152000
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 1e6
    rope_scaling: RopeScaling | None = None  # None: default RoPE (lov_jax/models/rope.py)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # q/k/v projection biases (Qwen-2: yes; Llama, Mistral: no)
    sliding_window: int | None = None  # Mistral's causal window W; None = full causal

    def __post_init__(self):
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"text sliding_window {self.sliding_window}: W >= 1 or None")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"text num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads}"
            )


@dataclasses.dataclass(frozen=True)
class MiniConfig:
    """LLaVA-Mini's compressor and pre-fusion (docs/reference_family.md B.2-B.6).

    compressor_size C: C x C learned queries, so every image (or video frame) costs C^2
    LLM tokens. prefusion_layers: decoder layers (the LLM's shape, own weights) fusing
    vision into the text before the LLM. resolution_ratio r: 1, or r x r crops + the whole
    image per image (HD, r = 2). compressor_heads: the cross-attention's heads over the
    tower width (the reference's 8)."""

    compressor_size: int = 1
    prefusion_layers: int = 4
    resolution_ratio: int = 1
    compressor_heads: int = 8

    def __post_init__(self):
        for name in ("compressor_size", "prefusion_layers", "resolution_ratio", "compressor_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"mini.{name} {getattr(self, name)}: must be >= 1")

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens one image / frame costs: C^2."""
        return self.compressor_size**2

    @property
    def crops_per_image(self) -> int:
        """Crop slots one image / frame occupies: 1, or r^2 + 1 in HD (crops, then whole)."""
        r = self.resolution_ratio
        return 1 if r == 1 else r * r + 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaVA model: vision tower + projector + LLM, of one `architecture` (LLaVA-1.5,
    LLaVA-NeXT, OneVision); `vision_aspect_ratio` is one of that architecture's
    ASPECT_RATIOS.

    `dtype` is the compute dtype, `param_dtype` the master-weight dtype.
    `remat_policy` is one of REMAT_POLICIES, applied to every scanned block.
    `token_ids` come from the checkpoint's or tokenizer's files (lov_jax/token_ids.py),
    never from a preset: a preset is a size, its vocabulary is the tokenizer's.
    """

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    token_ids: TokenIds | None = None
    architecture: str = "llava_onevision"  # one of ARCHITECTURES
    projector: str = "mlp2x_gelu"  # the projector's family: "mlp2x_gelu" | "linear"
    vision_aspect_ratio: str = "anyres_max_9"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ANYRES_GRID_PINPOINTS
    video: VideoConfig = VideoConfig()  # OneVision's: 2x2 bilinear, one newline per video
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "xla"
    mini: MiniConfig | None = None  # LLaVA-Mini's parts: set iff architecture "llava_mini"

    def __post_init__(self):
        if (self.mini is not None) != (self.architecture == "llava_mini"):
            raise ValueError(
                f"architecture {self.architecture!r} with mini={self.mini}: a MiniConfig "
                "is given exactly for architecture 'llava_mini'"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} not in {ARCHITECTURES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        allowed = ASPECT_RATIOS[self.architecture]
        ratio = self.vision_aspect_ratio
        capped = "anyres_max_N" in allowed and _ANYRES_MAX.fullmatch(ratio)
        if ratio not in allowed and not capped:
            raise ValueError(
                f"vision_aspect_ratio {ratio!r} is not one of {self.architecture}'s {allowed}"
            )
        if self.token_ids is not None:
            self.token_ids.check(self.text.vocab_size, "ModelConfig.token_ids")

    @property
    def ids(self) -> TokenIds:
        """The special ids; an error when this config was built without them."""
        if self.token_ids is None:
            raise ValueError(
                "this ModelConfig has no token ids: load it from a checkpoint "
                "(lov_jax.load_pretrained) or give it a tokenizer's "
                "(cfg.replace(token_ids=lov_jax.token_ids.token_ids_from_tokenizer(...)))"
            )
        return self.token_ids

    @property
    def has_image_newline(self) -> bool:
        """LLaVA-NeXT and OneVision learn an `image_newline`; LLaVA-1.5 and Mini have none."""
        return self.architecture not in ("llava", "llava_mini")

    @property
    def video_pool_size(self) -> int:
        """Side of a (slow) video frame after pooling: 27 -> 14 (OneVision), 24 -> 12."""
        from lov_jax import video_pool

        return video_pool.pooled_side(self.vision.patches_per_side, self.video.pool_stride,
                                      self.video.pool_mode)  # fmt: skip

    @property
    def max_num_patches(self) -> int:
        """The N of `anyres_max_N` (downsample threshold in crops)."""
        m = _ANYRES_MAX.fullmatch(self.vision_aspect_ratio)
        if m is None:
            raise ValueError(f"vision_aspect_ratio {self.vision_aspect_ratio!r} has no max crops")
        return int(m.group(1))

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---- HF config.json round trip -------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides: Any) -> ModelConfig:
        """Build from a config.json dict: transformers' Llava / LlavaNext / LlavaOnevision
        configs (any era) or an original LLaVA one (lov_jax/architectures.py).

        Token ids are not read here: they need generation_config.json and the tokenizer
        too (`lov_jax.token_ids.read_token_ids`); pass them as `token_ids=`."""
        from lov_jax import architectures

        return architectures.from_hf_config(hf, **overrides)

    def to_hf_config(self) -> dict:
        """The config.json that current `transformers` loads unchanged (its class:
        `lov_jax.architectures.hf_class_name(self.architecture)`)."""
        from lov_jax import architectures

        return architectures.to_hf_config(self)


# ---- presets ---------------------------------------------------------------------

_SO400M_OV = VisionConfig()
# CLIP ViT-L/14-336 as LLaVA-1.5 / NeXT use it: hidden_states[-2] = 23 of its 24 layers,
# CLS dropped (576 tokens per crop); docs/reference_family.md A.2.
CLIP_L14_336 = VisionConfig(
    kind="clip", hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16,
    patch_size=14, image_size=336, layer_norm_eps=1e-5, feature_select="default",
    hidden_act="quick_gelu", image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
)  # fmt: skip
# LlavaNextConfig's default pinpoints, (h, w) multiples of 336 (docs/reference_family.md A.7).
NEXT_GRID_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008),
)  # fmt: skip


def _llava15(text: TextConfig, kw: dict) -> ModelConfig:
    """LLaVA-1.5: one CLIP crop per image, no image_newline. `center_crop` is how llava-hf
    preprocesses (its logits); the original trained with "pad" (a recipe may set it)."""
    kw = {"vision": CLIP_L14_336, "vision_aspect_ratio": "center_crop",
          "image_grid_pinpoints": NEXT_GRID_PINPOINTS, **kw}  # fmt: skip
    return ModelConfig(text=text, architecture="llava", **kw)


def _llava_next(text: TextConfig, kw: dict) -> ModelConfig:
    """LLaVA-NeXT: anyres over the 5 pinpoints, no downsample, one newline per row."""
    kw = {"vision": CLIP_L14_336, "image_grid_pinpoints": NEXT_GRID_PINPOINTS, **kw}
    return ModelConfig(text=text, architecture="llava_next", vision_aspect_ratio="anyres", **kw)


def _llava_next_video(text: TextConfig, kw: dict) -> ModelConfig:
    """LLaVA-NeXT-Video: NeXT's images, frames 2x2 average-pooled before the projector
    (144 tokens per 336px frame), no video newline."""
    kw = {"vision": CLIP_L14_336, "image_grid_pinpoints": NEXT_GRID_PINPOINTS,
          "video": NEXT_VIDEO, **kw}  # fmt: skip
    return ModelConfig(
        text=text, architecture="llava_next_video", vision_aspect_ratio="anyres", **kw
    )


# The released LLMs (docs/reference_family.md A.11). llava-hf pads Llama vocabularies to
# V + 2 rounded up to 64 (32000 -> 32064, 128256 -> 128320); Qwen-1.5 keeps 152064.
_VICUNA_7B = TextConfig(
    kind="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=1e4, rms_norm_eps=1e-5,
    max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False,
)  # fmt: skip
_VICUNA_13B = dataclasses.replace(
    _VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
    num_kv_heads=40,
)  # fmt: skip
_MISTRAL_7B_V02 = TextConfig(  # Mistral-7B-Instruct-v0.2: no sliding window
    kind="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
    rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False,
    attention_bias=False, sliding_window=None,
)  # fmt: skip
_LLAMA3_8B = dataclasses.replace(
    _MISTRAL_7B_V02, kind="llama", vocab_size=128320, rope_theta=5e5,
    max_position_embeddings=8192,
)  # fmt: skip
_QWEN15_72B = TextConfig(  # Qwen1.5-72B-Chat: MHA (64 kv heads), q/k/v biases
    kind="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=24576,
    num_layers=80, num_heads=64, num_kv_heads=64, head_dim=128, rope_theta=1e6,
    rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
)  # fmt: skip


def llava15_7b(**kw: Any) -> ModelConfig:
    return _llava15(_VICUNA_7B, kw)


def llava15_13b(**kw: Any) -> ModelConfig:
    return _llava15(_VICUNA_13B, kw)


def llava_next_mistral_7b(**kw: Any) -> ModelConfig:
    return _llava_next(_MISTRAL_7B_V02, kw)


def llava_next_vicuna_7b(**kw: Any) -> ModelConfig:
    return _llava_next(_VICUNA_7B, kw)


def llava_next_llama3_8b(**kw: Any) -> ModelConfig:
    return _llava_next(_LLAMA3_8B, kw)


def llava_next_72b(**kw: Any) -> ModelConfig:
    return _llava_next(_QWEN15_72B, kw)


def llava_next_video_7b(**kw: Any) -> ModelConfig:
    """LLaVA-NeXT-Video-7B (Vicuna-7B); a long clip's rope scaling comes from the
    checkpoint's text_config."""
    return _llava_next_video(_VICUNA_7B, kw)


_TINY_CLIP = dataclasses.replace(
    CLIP_L14_336, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
)  # the real 336/14 geometry: 576 features per crop


_TINY_VICUNA = dataclasses.replace(
    _VICUNA_7B, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=4, head_dim=12,
)  # fmt: skip  # a 2-layer Llama (MHA)


def tiny_llava15(**kw: Any) -> ModelConfig:
    """Tiny LLaVA-1.5 (tests): CLIP 32 wide + a 2-layer Llama (MHA)."""
    return _llava15(_TINY_VICUNA, {"vision": _TINY_CLIP, **kw})


def tiny_llava_next(**kw: Any) -> ModelConfig:
    """Tiny LLaVA-NeXT (tests): CLIP 32 wide + a 2-layer Mistral (GQA 4/2, window 64)."""
    text = dataclasses.replace(
        _MISTRAL_7B_V02, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=12, sliding_window=64,
    )  # fmt: skip
    return _llava_next(text, {"vision": _TINY_CLIP, **kw})


def tiny_llava_next_video(**kw: Any) -> ModelConfig:
    """Tiny LLaVA-NeXT-Video (tests): tiny LLaVA-NeXT's CLIP and Vicuna-style LLM."""
    return _llava_next_video(_TINY_VICUNA, {"vision": _TINY_CLIP, **kw})


def _llava_mini(text: TextConfig, mini: MiniConfig, kw: dict) -> ModelConfig:
    """LLaVA-Mini (docs/reference_family.md B): CLIP-L/336 hs[-2], CLS dropped, the
    CLIPImageProcessor's center crop, mlp2x_gelu, C^2 tokens per image."""
    kw = {"vision": CLIP_L14_336, "vision_aspect_ratio": "center_crop", **kw}
    return ModelConfig(text=text, architecture="llava_mini", mini=mini, **kw)


def llava_mini_llama31_8b(**kw: Any) -> ModelConfig:
    """ICTNLP/llava-mini-llama-3.1-8b (B.9): Llama-3.1-8B (vocab 128256 unpadded, llama3
    RoPE scaling), C = 1, 4 pre-fusion layers; `mini=` picks HD (resolution_ratio 2)."""
    from lov_jax.models.rope import RopeScaling

    text = dataclasses.replace(
        _LLAMA3_8B, vocab_size=128256, max_position_embeddings=131072,
        rope_scaling=RopeScaling("llama3", 8.0, 8192, 1.0, 4.0),
    )  # fmt: skip
    return _llava_mini(text, kw.pop("mini", MiniConfig()), kw)


def tiny_llava_mini(**kw: Any) -> ModelConfig:
    """Tiny LLaVA-Mini (tests): tiny CLIP (576 features, width 32), a 2-layer Llama (GQA
    4/2), C = 2 (4 tokens per image), 2 pre-fusion layers, 8 compressor heads."""
    text = dataclasses.replace(
        _VICUNA_7B, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=12,
    )  # fmt: skip
    mini = kw.pop("mini", MiniConfig(compressor_size=2, prefusion_layers=2))
    return _llava_mini(text, mini, {"vision": _TINY_CLIP, **kw})


def ov_0_5b(**kw: Any) -> ModelConfig:
    text = TextConfig(
        vocab_size=152000, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    return ModelConfig(vision=_SO400M_OV, text=text, **kw)


def ov_7b(**kw: Any) -> ModelConfig:
    text = TextConfig(
        vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False,
    )  # fmt: skip
    return ModelConfig(vision=_SO400M_OV, text=text, **kw)


def ov_72b(**kw: Any) -> ModelConfig:
    text = TextConfig(
        vocab_size=152128, hidden_size=8192, intermediate_size=29568, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
    )  # fmt: skip
    return ModelConfig(vision=_SO400M_OV, text=text, **kw)


def tiny(**kw: Any) -> ModelConfig:
    """A few-MB model with the real patch geometry (tests)."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    text = TextConfig(
        vocab_size=152000, hidden_size=48, intermediate_size=96, num_layers=2,
        num_heads=6, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    return ModelConfig(vision=vision, text=text, **kw)


def demo(**kw: Any) -> ModelConfig:
    """`lov-jax demo`'s CPU model: 112px crops (8x8 patches), so a whole OneVision
    curriculum fits in minutes on 2 cores. Same code paths: anyres_max_9 over 36
    pinpoints (multiples of 112), 2x2 bilinear video pooling (8x8 -> 4x4), newlines."""
    vision = VisionConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=112
    )
    text = TextConfig(
        vocab_size=152000, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    pinpoints = tuple((112 * h, 112 * w) for h in range(1, 7) for w in range(1, 7))
    return ModelConfig(vision=vision, text=text, image_grid_pinpoints=pinpoints, **kw)


def llava_video_7b(**kw: Any) -> ModelConfig:
    """LLaVA-Video-7B-Qwen2 (../shared/REFERENCE_VIDEO_POST.md 2.5, 2.7): OneVision-7B whose
    frames end every pooled row with a newline (mm_newline_position "grid"; 2x2 bilinear,
    14 x 15 = 210 tokens per frame, 13440 for 64 frames)."""
    return ov_7b(**{"video": VideoConfig(newline="grid"), **kw})


def tiny_llava_video(**kw: Any) -> ModelConfig:
    """`tiny` with LLaVA-Video's "grid" video newlines (tests)."""
    return tiny(**{"video": VideoConfig(newline="grid"), **kw})


PRESETS = {
    "ov_0_5b": ov_0_5b, "ov_7b": ov_7b, "ov_72b": ov_72b, "tiny": tiny, "demo": demo,
    "llava15_7b": llava15_7b, "llava15_13b": llava15_13b,
    "llava_next_mistral_7b": llava_next_mistral_7b, "llava_next_vicuna_7b": llava_next_vicuna_7b,
    "llava_next_llama3_8b": llava_next_llama3_8b, "llava_next_72b": llava_next_72b,
    "tiny_llava15": tiny_llava15, "tiny_llava_next": tiny_llava_next,
    "llava_next_video_7b": llava_next_video_7b, "tiny_llava_next_video": tiny_llava_next_video,
    "llava_video_7b": llava_video_7b, "tiny_llava_video": tiny_llava_video,
    "llava_mini_llama31_8b": llava_mini_llama31_8b, "tiny_llava_mini": tiny_llava_mini,
}  # fmt: skip


def preset(name: str, **kw: Any) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**kw)
