"""`lov-jax check-parity`: HF processor + PyTorch model vs our preprocessing + JAX model.

The HF class compared against is the one config.json's `model_type` names
(`lov_jax.architectures.hf_class`: Llava, LlavaNext, LlavaOnevision or LlavaNextVideo
...ForConditionalGeneration).

Both sides start from the same raw inputs (prompt text, image files, a video
file). HF's video processor needs torchvision, which we never install, so for
video both models get the frames from our preprocessing (docs/reference.md 5.2: a
plain bicubic resize per frame) and HF's `<video>` placeholder is expanded here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import video
from lov_jax import visual_layout
from lov_jax.config import ModelConfig
from lov_jax.models.llava_onevision import LlavaOnevision


@dataclass
class ParityReport:
    num_tokens: int
    tokens_equal: bool
    pixels_max_abs_diff: float
    logits_max_abs_diff: float
    top1_agreement: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.tokens_equal and self.logits_max_abs_diff <= self.atol

    def lines(self) -> list[str]:
        return [
            f"tokens: {self.num_tokens}, ids equal: {self.tokens_equal}",
            f"pixels max-abs-diff: {self.pixels_max_abs_diff:.3g}",
            f"logits max-abs-diff: {self.logits_max_abs_diff:.3g} (atol {self.atol:g})",
            f"top-1 agreement: {self.top1_agreement:.4f}",
            f"parity: {'PASS' if self.passed else 'FAIL'}",
        ]


def _load_images(paths):
    from PIL import Image

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {p}: {err}") from err
    return images


def load_request(question, image_paths, video_path, num_frames, messages=None):
    """The request both sides render, its media loaded: (question, images, videos), or
    chat `messages` (several turns; image / video parts name files, as in `generate`)."""
    if messages is None:
        videos = [video.read_video(video_path, num_frames)] if video_path else []
        return (question, _load_images(image_paths), videos)
    if image_paths or video_path:
        raise ValueError("give the images and video inside the messages, or as paths: not both")
    from lov_jax.inference.prompting import load_frames

    def load(part):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("image", "video"):
            return part  # text, or not a part at all (the Prompter names the problem)
        ref = next((part[k] for k in (kind, "path", "url") if part.get(k) is not None), None)
        if not isinstance(ref, (str, Path)):
            return part  # already loaded
        loaded = _load_images([ref])[0] if kind == "image" else load_frames(ref, num_frames)
        return {**part, kind: loaded}

    out = []
    for msg in messages:
        content = msg.get("content", "")
        if isinstance(content, list):
            content = [load(part) for part in content]
        out.append({**msg, "content": content})
    return out


def our_inputs(cfg: ModelConfig, prompter, request):
    """Token ids int32[T], crops uint8[N, S, S, 3] and visual items, from raw inputs:
    the checkpoint's chat template and tokenizer (lov_jax/inference/prompting.py)."""
    inputs = prompter.encode(cfg, request)
    return inputs.tokens, inputs.crops, inputs.items


def hf_inputs(processor, cfg: ModelConfig, request, frame_crops):
    """HF processor outputs (torch tensors) with the video placeholder expanded by hand.

    The prompt is the same request rendered by HF's own `apply_chat_template` (typed
    `<image>` / `<video>` stay where they were typed, else the items go first)."""
    import torch

    from lov_jax.inference.prompting import to_messages

    messages, images, _ = to_messages(request)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image_arg = None
    if len(images) == 1:
        image_arg = images
    elif images:
        image_arg = [images]  # nested: one sample with several images -> pad path
    if frame_crops is None:
        return dict(processor(text=text, images=image_arg, return_tensors="pt"))
    # Without a video processor HF refuses `<video>`: a special token that the text does
    # not hold stands in for it (special tokens split BPE, so the ids around it are the
    # ones `<video>` would give), the images are expanded by HF, and the stand-in's id
    # becomes the video run HF's own `replace_video_token` gives for these frames
    # (OneVision 196 * F + 1; NeXT-Video (S/p)^2 // 4 * F).
    tok = processor.tokenizer
    stand_in = next(t for t in tok.all_special_tokens if t not in text and t != "<image>")
    inputs = dict(processor(text=text.replace("<video>", stand_in, 1), images=image_arg,
                            return_tensors="pt"))  # fmt: skip
    ids = inputs["input_ids"][0].tolist()
    at = ids.index(tok.convert_tokens_to_ids(stand_in))
    x = frame_crops.astype(np.float32) * np.float32(1 / 255)
    mean, std = (np.float32(v) for v in (cfg.vision.image_mean, cfg.vision.image_std))
    videos = ((x - mean) / std).transpose(0, 3, 1, 2)[None]  # [1, F, 3, S, S]
    run = processor.replace_video_token({"pixel_values_videos": videos}, 0)
    ids[at : at + 1] = [cfg.ids.video] * run.count(processor.video_token)
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["pixel_values_videos"] = torch.from_numpy(videos)
    return inputs


def check_parity(
    hf_dir: str | Path,
    question: str = "What is shown here?",
    image_paths: tuple[str, ...] = (),
    video_path: str | None = None,
    num_frames: int = 8,
    atol: float = 1e-4,
    save_logits: str | None = None,
    messages: list[dict] | None = None,
) -> ParityReport:
    """HF vs ours on one request: `question` with `image_paths` / `video_path`, or chat
    `messages` (several turns; their image / video parts name files)."""
    import torch

    from data_pipelines.hf_processor import load_hf_processor
    from lov_jax import architectures
    from lov_jax.convert.safetensors_io import load_hf_checkpoint
    from lov_jax.inference.prompting import Prompter

    jax.config.update("jax_default_matmul_precision", "highest")
    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    if architectures.is_original(hf_config):
        raise ValueError(
            f"{hf_dir / 'config.json'}: an original LLaVA checkpoint, which transformers cannot "
            "load: convert it (lov-jax convert hf-to-orbax, then orbax-to-hf) and compare that"
        )
    cfg, params = load_hf_checkpoint(hf_dir, dtype="float32")
    request = load_request(question, image_paths, video_path, num_frames, messages)

    prompter = Prompter.from_checkpoint(hf_dir)
    tokens, crops, items = our_inputs(cfg, prompter, request)
    video_at = next((k for k, it in enumerate(items) if it.kind == "video"), None)
    frame_crops = None
    if video_at is not None:  # the video's crops: after those of the items before it
        start = sum(visual_layout.num_crops(it, cfg) for it in items[:video_at])
        frame_crops = crops[start : start + items[video_at].num_frames]
    inputs = hf_inputs(load_hf_processor(hf_dir), cfg, request, frame_crops)

    hf_ids = inputs["input_ids"][0].numpy()
    tokens_equal = hf_ids.shape == tokens.shape and bool(np.all(hf_ids == tokens))
    pixels_diff = _pixel_diff(crops, inputs.get("pixel_values"), items, cfg)

    model = LlavaOnevision(cfg)
    n = len(tokens)
    idx, w = visual_layout.place_taps(tokens, items, cfg, len(crops))
    batch = {
        "tokens": tokens[None], "positions": np.arange(n, dtype=np.int32)[None],
        "segment_ids": np.ones((1, n), np.int32), "pixels": crops[None],
        "vis_idx": idx[None], "vis_w": w[None],
    }  # fmt: skip
    ours = jax.jit(lambda p, b: model.apply({"params": p}, **b))(
        jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, batch)
    )
    ours = np.asarray(ours)[0]

    hf_class = architectures.hf_class(cfg.architecture)
    hf_model = hf_class.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf_model.eval()(**inputs).logits[0].float().numpy()

    report = ParityReport(
        num_tokens=n,
        tokens_equal=tokens_equal,
        pixels_max_abs_diff=pixels_diff,
        logits_max_abs_diff=float(np.max(np.abs(ours - ref)))
        if ours.shape == ref.shape
        else np.inf,
        top1_agreement=float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
        if ours.shape == ref.shape
        else 0.0,
        atol=atol,
    )
    if save_logits:
        np.savez(save_logits, logits=ours, input_ids=tokens, report=json.dumps(asdict(report)))
    return report


def _pixel_diff(our_crops, hf_pixels, items, cfg: ModelConfig) -> float:
    """Max |ours - HF| over the real (unpadded) crops of every image, in item order."""
    if hf_pixels is None:
        return 0.0
    hf = hf_pixels.numpy()  # [num_images, max_crops, 3, S, S], the images in prompt order
    if hf.ndim == 4:  # LLaVA-1.5: one crop per image, [num_images, 3, S, S]
        hf = hf[:, None]
    # normalised as the tower does it in-model (lov_jax/models/vit.py)
    mean, std = np.asarray(cfg.vision.image_mean), np.asarray(cfg.vision.image_std)
    ours = ((np.asarray(our_crops, np.float64) / 255.0 - mean) / std).astype(np.float32)
    diff, start, image = 0.0, 0, 0
    for item in items:
        n = visual_layout.num_crops(item, cfg)
        if item.kind != "video":
            ref = hf[image, :n].transpose(0, 2, 3, 1)
            diff = max(diff, float(np.max(np.abs(ours[start : start + n] - ref))))
            image += 1
        start += n
    return diff
