"""Host-side visual token layout: 4-tap gathers that reproduce HF's feature packing.

Every visual token the LLM sees is a fixed linear combination of at most four rows of
a per-row feature bank (docs/design.md 1-2; its rows are `lov_jax.batch`'s):

    bank = concat(projected.reshape(N * F, C), image_newline[None], zeros[1, C])

where N is the number of crop slots of the packed row and F = `cfg.vision.num_features`,
the visual tokens one crop gives after feature selection (SigLIP 729 = 27*27; CLIP
"default" 576 = 24*24, CLS dropped; CLIP "full" 577, CLS first). Feature f of crop slot
c sits at bank row c*F + f (a patch p = y*P + x when F = P*P); the newline is row `N*F`
and a zero row is `N*F + 1`. A visual token is `sum_i vis_w[i] * bank[vis_idx[i]]`.

That covers all of docs/reference.md 3-5 and the LLaVA family: anyres re-assembly and
unpadding are index arithmetic, the anyres_max_N downsample and the 27->14 video pool are
PyTorch bilinear (align_corners=False, antialias=False) i.e. separable 2-tap per axis, and
the newline is one bank row. Everything depends only on image sizes and frame counts, so
it lives here in numpy (no jax) and runs in the data pipeline.

Per architecture (`cfg.architecture`), as HF's model packs features:
  llava            one crop per image ("center_crop" or "pad"): F tokens, no newline
                   (LlavaModel has no image_newline).
  llava_next       "anyres" (LlavaNextModel.pack_image_features): base crop, then the
                   unpadded grid with one newline per row; no downsample
                   (`vision_aspect_ratio="anyres"`). Every image of a prompt is anyres.
                   Every NeXT preset follows HF where HF and the original LLaVA-1.6
                   disagree (images with H, W <= S; unpad rounding; `_anyres_geometry`).
  llava_onevision  "anyres" with the anyres_max_N downsample; "pad" multi-image members;
                   "video"; "square" for stage 1.
  llava_next_video NeXT's images; "video" frames pooled before the projector, no newline.
Video items follow `cfg.video` whatever the architecture (lov_jax/video_pool.py): bilinear
pools are 4 taps, average / max pools copy rows the device pooled into the bank.

Tap conventions: a plain copy is (p, p, p, p) with weights (1, 0, 0, 0); a bilinear
output is (y0x0, y0x1, y1x0, y1x1) with weights (wy0*wx0, wy0*wx1, wy1*wx0, wy1*wx1);
text positions are (zero_index,)*4 with weights 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from lov_jax import batch, mini_layout, video_pool
from lov_jax.config import ModelConfig

KINDS = ("anyres", "square", "pad", "center_crop", "video")


@dataclasses.dataclass(frozen=True)
class VisualItem:
    """One image or video of a sample, as the layout needs it.

    kind (F = cfg.vision.num_features tokens per crop):
      "anyres":      base crop + grid crops (OneVision: anyres_max_N; LLaVA-NeXT: anyres).
      "square":      stage-1 image, one directly resized crop, F tokens, no newline.
      "pad":         one padded-to-square crop: F tokens, + 1 newline where the model has
                     one (OneVision multi-image member; LLaVA-NeXT's single-crop branch,
                     docs/reference_family.md A.7.4); LLaVA-1.5 `image_aspect_ratio=pad`: F.
      "center_crop": llava-hf LLaVA-1.5 (CLIPImageProcessor resize + center crop): F tokens.
      "video":       frames pooled and separated as `cfg.video` says (OneVision: PxP ->
                     14x14 bilinear, one newline at the end; `_video_taps`).
    image_size: original (H, W); required for "anyres".
    num_frames: F for "video".
    """

    kind: str
    image_size: tuple[int, int] | None = None
    num_frames: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"VisualItem.kind {self.kind!r} not in {KINDS}")
        if self.kind == "anyres":
            if self.image_size is None or len(self.image_size) != 2 or min(self.image_size) < 1:
                raise ValueError(f"anyres item needs image_size=(H, W), got {self.image_size}")
        if self.kind == "video" and self.num_frames < 1:
            raise ValueError(f"video item needs num_frames >= 1, got {self.num_frames}")


# ---- sizes ---------------------------------------------------------------------------


def select_best_resolution(
    size_hw: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """HF `select_best_resolution` (docs/reference.md 2.2): max effective, then min wasted area.

    Pinpoints are (h, w); the first candidate wins ties. Returns (best_h, best_w).
    """
    orig_h, orig_w = (int(s) for s in size_hw)
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / orig_w, h / orig_h)
        eff = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        waste = h * w - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ValueError(f"no pinpoint fits image size {size_hw}")
    return best


def anyres_grid(size_hw: tuple[int, int], cfg: ModelConfig) -> tuple[int, int]:
    """(grid_rows, grid_cols) of SxS crops (S = image_size) for an anyres image of (H, W)."""
    best_h, best_w = select_best_resolution(size_hw, cfg.image_grid_pinpoints)
    side = cfg.vision.image_size
    return best_h // side, best_w // side


@dataclasses.dataclass(frozen=True)
class _AnyresGeometry:
    grid: tuple[int, int]  # (gh, gw) crops
    rows: tuple[int, int]  # kept rows [r0, r1) of the (gh*P, gw*P) feature map after unpad
    cols: tuple[int, int]  # kept cols [c0, c1)
    out: tuple[int, int]  # (h', w') after the optional anyres_max_N bilinear downsample


def _patch_grid(cfg: ModelConfig, kind: str) -> int:
    """P, checking that a crop's F features are its P x P patches (no CLS among them).

    HF views each grid crop's features as [P, P] (anyres) or pools them as [P, P]
    (video); a CLS tower with feature_select "full" (577 = 24*24 + 1) cannot do either.
    """
    v = cfg.vision
    if v.num_features != v.num_patches:
        raise ValueError(
            f"{kind} items need one feature per patch, but vision.feature_select="
            f"{v.feature_select!r} on a {v.kind} tower gives {v.num_features} per crop "
            f"(patch grid {v.patches_per_side}x{v.patches_per_side}); use 'default'"
        )
    return v.patches_per_side


def _downsample_max(cfg: ModelConfig) -> int | None:
    """anyres_max_N's N; None for LLaVA-NeXT's plain "anyres" (no downsample)."""
    return None if cfg.vision_aspect_ratio == "anyres" else cfg.max_num_patches


def _anyres_geometry(size_hw: tuple[int, int], cfg: ModelConfig) -> _AnyresGeometry:
    """docs/reference.md 3.2-3.4 on sizes only (Python ints/floats, as HF after `.tolist()`).

    LLaVA-NeXT (docs/reference_family.md A.7.2) is the same without the downsample. Both
    follow HF, not the original LLaVA-1.6 code: pinpoints are (h, w) and unpad rounds
    with round(., 7) (the original reads pinpoints as (w, h), so for images with H, W <= S
    it picks the transposed grid of HF's 5 default pinpoints, and it truncates; A.7.5).
    """
    if not cfg.has_image_newline:
        raise ValueError(f"anyres items need an anyres architecture, not {cfg.architecture!r}")
    p = _patch_grid(cfg, "anyres")
    orig_h, orig_w = (int(s) for s in size_hw)
    gh, gw = anyres_grid((orig_h, orig_w), cfg)
    cur_h, cur_w = gh * p, gw * p
    r0, r1, c0, c1 = 0, cur_h, 0, cur_w
    # HF `unpad_image`: int(round(x, 7)) guards against x = k - 1e-12; kept size is
    # cur - 2*pad, which is new + 1 when cur - new is odd.
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        r0, r1 = pad, cur_h - pad
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        pad = (cur_w - new_w) // 2
        c0, c1 = pad, cur_w - pad
    h, w = r1 - r0, c1 - c0
    out, max_crops = (h, w), _downsample_max(cfg)
    if max_crops is not None:
        ratio = math.sqrt(h * w / (max_crops * p**2))
        out = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
    return _AnyresGeometry(grid=(gh, gw), rows=(r0, r1), cols=(c0, c1), out=out)


def num_crops(item: VisualItem, cfg: ModelConfig) -> int:
    """Crop slots the item occupies: anyres grid + 1 base; square/pad 1; video F frames."""
    if cfg.mini is not None:  # LLaVA-Mini: C^2 tokens per image / frame
        return mini_layout.num_crops(cfg, mini_layout.item_units(item, cfg))
    if item.kind == "anyres":
        gh, gw = anyres_grid(item.image_size, cfg)
        return gh * gw + 1
    if item.kind == "video":
        return item.num_frames
    return 1


def num_tokens(item: VisualItem, cfg: ModelConfig) -> int:
    """Exact placeholder count (docs/reference.md 3.5/3.7/3.8, 4, 5.4;
    docs/reference_family.md A.6: HF's LlavaProcessor / LlavaNextProcessor counts)."""
    if cfg.mini is not None:
        return mini_layout.num_tokens(cfg, mini_layout.item_units(item, cfg))
    n_feat = cfg.vision.num_features
    if item.kind == "anyres":
        out_h, out_w = _anyres_geometry(item.image_size, cfg).out
        return n_feat + out_h * out_w + out_h  # base + grid + one newline per grid row
    if item.kind in ("square", "center_crop"):
        return n_feat
    if item.kind == "pad":
        return n_feat + int(cfg.has_image_newline)
    _patch_grid(cfg, "video")
    return video_pool.video_tokens(cfg, item.num_frames)


# ---- taps ----------------------------------------------------------------------------


def _bilinear_taps_1d_f64(in_size: int, out_size: int):
    scale = in_size / out_size  # size given, no scale_factor: PyTorch uses in/out
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = src - i0
    return i0, i1, 1.0 - lam1, lam1


def bilinear_taps_1d(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch `F.interpolate(mode="bilinear", align_corners=False)` along one axis.

    Returns (i0 int64[out], i1 int64[out], w0 float32[out], w1 float32[out]) with
    out[j] = w0[j]*in[i0[j]] + w1[j]*in[i1[j]]. Computed in float64, weights cast last.
    """
    i0, i1, w0, w1 = _bilinear_taps_1d_f64(in_size, out_size)
    return i0, i1, w0.astype(np.float32), w1.astype(np.float32)


def _identity_1d(size: int):
    i = np.arange(size, dtype=np.int64)
    return i, i, np.ones(size), np.zeros(size)


def _taps_2d(ty, tx, bank_index) -> tuple[np.ndarray, np.ndarray]:
    """Outer product of per-axis taps -> (idx int64[h, w, 4], w float64[h, w, 4]).

    ty/tx: (i0, i1, w0, w1) per axis in source feature-map coordinates;
    bank_index(Y, X) maps source coordinates (broadcast arrays) to bank rows.
    """
    y0, y1, wy0, wy1 = (a[:, None] for a in ty)
    x0, x1, wx0, wx1 = (a[None, :] for a in tx)
    idx = np.stack(
        np.broadcast_arrays(
            bank_index(y0, x0), bank_index(y0, x1), bank_index(y1, x0), bank_index(y1, x1)
        ),
        axis=-1,
    )
    w = np.stack(np.broadcast_arrays(wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), axis=-1)
    return idx, w


def _copy_taps(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain copies of bank rows [start, start + count): idx (p,)*4, weights (1, 0, 0, 0)."""
    idx = np.repeat(np.arange(start, start + count, dtype=np.int64)[:, None], 4, axis=1)
    w = np.zeros((count, 4))
    w[:, 0] = 1.0
    return idx, w


def _video_taps(item: VisualItem, cfg: ModelConfig, crop_offset: int, num_crop_slots: int,
                newline) -> list:  # fmt: skip
    """A video's taps, frames in order (REFERENCE_VIDEO_POST.md 2.2-2.4; video_pool.py).

    Frame f (crop slot crop_offset + f) pooled at its stride s_f to h x h, row-major:
    bilinear = 4 taps into the frame's crop rows (HF `apply_pooling`); average / max =
    a copy of its row in the device-pooled section of stride s_f. Then the newlines of
    `cfg.video.newline` ("grid": after each of the h rows; "frame": after the frame),
    the `faster_token` after each frame (SlowFast), and "one_token": one newline after
    the whole video (OneVision; NeXT-Video: "no_token").
    """
    p, v, nfeat = _patch_grid(cfg, "video"), cfg.video, cfg.vision.num_features
    one = np.array([[1.0, 0.0, 0.0, 0.0]])
    faster = (np.full((1, 4), batch.faster_row(num_crop_slots, cfg)), one) if v.faster else None
    parts = []
    for f, stride in enumerate(video_pool.frame_strides(v, item.num_frames)):
        slot = crop_offset + f
        h = video_pool.pooled_side(p, stride, v.pool_mode)
        if v.pool_mode == "bilinear":
            ty = tx = _bilinear_taps_1d_f64(p, h)
            idx, w = _taps_2d(ty, tx, lambda y, x, off=slot * nfeat: off + y * p + x)
        else:
            start = batch.pooled_start(num_crop_slots, cfg, stride) + slot * h * h
            idx, w = (a.reshape(h, h, 4) for a in _copy_taps(start, h * h))
        if v.newline == "grid":  # one newline column closes every row of the frame
            idx = np.concatenate([idx, np.broadcast_to(newline[0], (h, 1, 4))], axis=1)
            w = np.concatenate([w, np.broadcast_to(newline[1], (h, 1, 4))], axis=1)
        parts.append((idx.reshape(-1, 4), w.reshape(-1, 4)))
        if v.newline == "frame":
            parts.append(newline)
        if faster is not None:
            parts.append(faster)
    if v.newline == "one_token":
        parts.append(newline)
    return parts


def item_taps(
    item: VisualItem,
    cfg: ModelConfig,
    crop_offset: int,
    newline_index: int,
    num_crop_slots: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Taps for one item, in the order HF's model emits its features.

    The item's crops live in bank slots crop_offset, crop_offset+1, ... (anyres: base
    first, then grid crops row-major; video: frames in order). `num_crop_slots` N (the
    row's; default newline_index // F) places the bank's video rows (lov_jax/batch.py).
    Returns (idx int32[T, 4], w float32[T, 4]) with T = num_tokens(item, cfg).
    """
    if cfg.mini is not None:  # its bank: C^2 pre-fusion outputs per unit
        return mini_layout.item_taps(item, cfg, crop_offset)
    nfeat = cfg.vision.num_features  # the bank's per-crop stride
    base = crop_offset * nfeat
    newline = (np.full((1, 4), newline_index, np.int64), np.array([[1.0, 0.0, 0.0, 0.0]]))
    if num_crop_slots is None:
        num_crop_slots = newline_index // nfeat

    if item.kind in ("square", "pad", "center_crop"):
        parts = [_copy_taps(base, nfeat)]  # CLIP "full": CLS first, as HF keeps it
        if item.kind == "pad" and cfg.has_image_newline:
            parts.append(newline)  # HF pack_image_features, single-crop branch
    elif item.kind == "video":
        parts = _video_taps(item, cfg, crop_offset, num_crop_slots, newline)
    else:
        geo = _anyres_geometry(item.image_size, cfg)
        p, gw = cfg.vision.patches_per_side, geo.grid[1]
        (r0, r1), (c0, c1), (out_h, out_w) = geo.rows, geo.cols, geo.out
        h, w_ = r1 - r0, c1 - c0
        ty = _identity_1d(h) if out_h == h else _bilinear_taps_1d_f64(h, out_h)
        tx = _identity_1d(w_) if out_w == w_ else _bilinear_taps_1d_f64(w_, out_w)

        def bank_index(y, x):
            # Unpadded coords -> full (gh*P, gw*P) map -> grid crop (Y//P, X//P), which
            # is slot crop_offset + 1 + (Y//P)*gw + X//P (slot crop_offset is the base).
            yy, xx = y + r0, x + c0
            slot = crop_offset + 1 + (yy // p) * gw + xx // p
            return slot * nfeat + (yy % p) * p + (xx % p)

        idx, w = _taps_2d(ty, tx, bank_index)
        # One newline column at the end of every output row (docs/reference.md 3.5).
        idx = np.concatenate([idx, np.broadcast_to(newline[0], (out_h, 1, 4))], axis=1)
        w = np.concatenate([w, np.broadcast_to(newline[1], (out_h, 1, 4))], axis=1)
        parts = [_copy_taps(base, nfeat), (idx.reshape(-1, 4), w.reshape(-1, 4))]

    idx = np.concatenate([a for a, _ in parts]).astype(np.int32)
    w = np.concatenate([b for _, b in parts]).astype(np.float32)
    return idx, w


def row_layout(
    items: Sequence[VisualItem], cfg: ModelConfig, num_crop_slots: int, crop_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Taps of several items whose crops are placed consecutively from `crop_offset`.

    The bank has `num_crop_slots` crop slots, so newline_index = num_crop_slots*F.
    Returns (idx int32[T_total, 4], w float32[T_total, 4]) concatenated in item order.
    """
    newline_index = batch.newline_row(num_crop_slots, cfg.vision.num_features)
    crops = [num_crops(it, cfg) for it in items]
    if crop_offset + sum(crops) > num_crop_slots:
        raise ValueError(
            f"items need {sum(crops)} crop slots from offset {crop_offset} but the row has "
            f"only {num_crop_slots}"
        )
    parts, off = [], crop_offset
    for it, n in zip(items, crops, strict=True):
        parts.append(item_taps(it, cfg, off, newline_index, num_crop_slots))
        off += n
    if not parts:
        return np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32)
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])


def _placeholder_id(item: VisualItem, cfg: ModelConfig) -> int:
    return cfg.ids.placeholder_id(item.kind)


def place_taps(
    tokens: np.ndarray,
    items: Sequence[VisualItem],
    cfg: ModelConfig,
    num_crop_slots: int,
    crop_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Spread the items' taps over their (already expanded) placeholder tokens.

    tokens: int32[L]; placeholders are cfg.ids.image (anyres/square/pad items) and
    cfg.ids.video (video items), consumed in item order like HF's masked_scatter.
    Each item's placeholders must form one contiguous run.
    Returns (vis_idx int32[L, 4], vis_w float32[L, 4]); text positions point at the zero
    row (num_crop_slots*F + 1) with weight 0.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    zero_index = batch.zero_row(num_crop_slots, cfg.vision.num_features)
    ids = cfg.ids
    is_img = tokens == ids.image
    is_vid = np.zeros_like(is_img) if ids.video is None else tokens == ids.video
    pos = np.flatnonzero(is_img | is_vid)

    counts = [num_tokens(it, cfg) for it in items]
    want_img = sum(c for it, c in zip(items, counts, strict=True) if it.kind != "video")
    want_vid = sum(counts) - want_img
    have_img, have_vid = int(is_img.sum()), int(is_vid.sum())
    if (have_img, have_vid) != (want_img, want_vid):
        raise ValueError(
            f"placeholder count mismatch: tokens hold {have_img} image and {have_vid} video "
            f"placeholders but the {len(items)} items need {want_img} image and {want_vid} "
            f"video tokens ({[(it.kind, c) for it, c in zip(items, counts, strict=True)]})"
        )
    start = 0
    for i, (it, c) in enumerate(zip(items, counts, strict=True)):
        run = pos[start : start + c]
        if not np.all(tokens[run] == _placeholder_id(it, cfg)):
            raise ValueError(
                f"item {i} ({it.kind}) expects {c} placeholders of id "
                f"{_placeholder_id(it, cfg)} but the token stream has other placeholder ids "
                "there: item order does not match the order of <image>/<video> tokens"
            )
        if c and run[-1] - run[0] != c - 1:
            raise ValueError(
                f"item {i} ({it.kind}) placeholders are not contiguous (positions "
                f"{run[0]}..{run[-1]} for {c} tokens): expansion or truncation went wrong"
            )
        start += c

    idx, w = row_layout(items, cfg, num_crop_slots, crop_offset)
    vis_idx = np.full((tokens.shape[0], 4), zero_index, np.int32)
    vis_w = np.zeros((tokens.shape[0], 4), np.float32)
    vis_idx[pos], vis_w[pos] = idx, w
    return vis_idx, vis_w
