"""A small synthetic "shapes" dataset in LLaVA format (the demo's data).

Tasks (answers are single words; chance level in brackets):
  color      one shape on an image of varied size/aspect: its colour       [1/4]
  position   one shape in the left or right half: which side               [1/2]
  count      1-3 shapes of equal area: how many                            [1/3]
  compare    two images, one shape each: are they the same colour          [1/2]
  motion     short mp4 of a shape moving left or right: which way          [1/2]
Stage-1 captions ("A red circle.") come from the same single-shape images.
With `multi_turn`, training records ask every question their media supports (colour
and side of a single shape; colour and direction of a moving one), as LLaVA's
conversations do. Test records ask one question each, an equal number per task;
training records follow `TRAIN_MIX`. `train_si.json` holds the
single-image spatial questions (position, count) for the demo's stage 2-SI.
Written as `train.json` / `test.json` (LLaVA records, media paths relative to
the output folder) plus `captions.json` for stage 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
          "yellow": (230, 210, 40)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
# (H, W): varied sizes and aspect ratios -> anyres grids 1x1 (unpadded rows or columns,
# or none), 1x2 and 2x1 at 112px crops; kept small so ~4 samples fit a 512-token row.
SIZES = ((112, 80), (80, 112), (100, 100), (64, 112), (112, 168), (168, 112))
COUNT_WORDS = ("one", "two", "three")
TASKS = ("color", "position", "count", "compare", "motion")
SI_TASKS = ("position", "count")
# Training records per cycle of tasks (test records: one per task per cycle). The
# two-image question is the one the tiny model learns slowest: at equal shares it stayed
# at chance after 150 2-OV steps, and at three shares too (0.48); three shares and 300
# steps learn it (closing note of issue 5).
TRAIN_MIX = {"color": 1, "position": 1, "count": 1, "compare": 3, "motion": 1}
CHANCE = {"color": 1 / 4, "position": 1 / 2, "count": 1 / 3, "compare": 1 / 2, "motion": 1 / 2}


def _draw(canvas: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color):
    """`shape` centred at (cx, cy) with the area of a circle of radius `r`, whatever its
    kind, so that the area covered by shapes says how many there are."""
    if shape == "circle":
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        a = r * np.sqrt(np.pi) / 2  # (2a)^2 = pi r^2
        canvas.rectangle((cx - a, cy - a, cx + a, cy + a), fill=color)
    else:
        a = r * np.sqrt(np.pi / 2)  # base 2a, height 2a: 2a^2 = pi r^2
        canvas.polygon([(cx, cy - a), (cx - a, cy + a), (cx + a, cy + a)], fill=color)


def _image(rng, shapes, size=None, count=False):
    """A grey image with `shapes` = [(shape, color, side or None)]; returns PIL.

    Default: one big shape (the demo model is tiny and trains for minutes), in the left
    or right half when `side` is given. `count`: 1-3 shapes of one size relative to the
    image area, in distinct cells of a 2x2 grid; the base crop sees the whole image
    resized to a square, so the covered tokens grow with the count alone.
    """
    h, w = size or SIZES[rng.integers(len(SIZES))]
    img = Image.new("RGB", (w, h), (128, 128, 128))
    canvas = ImageDraw.Draw(img)
    # count: the largest size whose reach (1.25 r for a triangle, +margin) fits a cell of
    # every image size (the tightest is 64 x 112)
    r = 0.13 * np.sqrt(h * w) if count else min(0.3 * min(h, w), 0.2 * w)
    cells = rng.permutation(4)
    for i, (shape, color, side) in enumerate(shapes):
        if count:
            row, col = divmod(int(cells[i]), 2)
            sx, sy = w / 4 - r * 1.3, h / 4 - r * 1.3  # cell half-size minus the reach
            cx = w * (2 * col + 1) / 4 + rng.uniform(-sx, sx)
            cy = h * (2 * row + 1) / 4 + rng.uniform(-sy, sy)
        else:
            if side == "left":
                cx = rng.uniform(r * 1.2, w / 2 - r * 1.2)
            elif side == "right":
                cx = rng.uniform(w / 2 + r * 1.2, w - r * 1.2)
            else:
                cx = w / 2
            cy = rng.uniform(r * 1.3, h - r * 1.3)
        _draw(canvas, shape, cx, cy, r, COLORS[color])
    return img


def _motion_frames(rng, direction: str, color: str, frames: int = 4, h: int = 192, w: int = 256):
    # From the centre to one side: every later frame shows the side it moves to (the
    # tiny model reads the first frames; from side to side it learned the opposite).
    shape = SHAPES[rng.integers(3)]
    xs = np.linspace(0.5 * w, 0.85 * w, frames)
    if direction == "left":
        xs = w - xs
    cy, out = rng.uniform(0.3 * h, 0.7 * h), []
    for x in xs:
        img = Image.new("RGB", (w, h), (128, 128, 128))
        _draw(ImageDraw.Draw(img), shape, x, cy, 0.15 * h, COLORS[color])
        out.append(np.asarray(img))
    return np.stack(out)


def _record(rid, question, answer, image=None, video=None, more=()):
    """A LLaVA record; `more` = follow-up (question, answer) turns about the same media."""
    turns = [(question, answer), *more]
    convs = [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]
    rec = {"id": rid, "conversations": convs}
    if image is not None:
        rec["image"] = image
    if video is not None:
        rec["video"] = video
    return rec


COLOR_Q = "What color is the shape?"
SIDE_Q = "Is the shape on the left or the right?"


def _first_turn(rng, turns):
    """Shuffle (question, answer) turns; the first question gets the <image> tag."""
    turns = [turns[i] for i in rng.permutation(len(turns))]
    (q, a), more = turns[0], turns[1:]
    return "<image>\n" + q, a, more


def make_example(task: str, rng, out_dir: Path, rid: str, multi_turn: bool = False) -> dict:
    """One record of `task`; with `multi_turn`, every question its media supports."""
    colors, media = list(COLORS), out_dir / "media"
    if task == "motion":
        from data_pipelines.video import write_video

        direction, color = ("left", "right")[rng.integers(2)], colors[rng.integers(4)]
        write_video(media / f"{rid}.mp4", _motion_frames(rng, direction, color), fps=4)
        turns = [("Which way does the shape move, left or right?", direction)]
        if multi_turn:
            turns.append((COLOR_Q, color))
        q, a, more = _first_turn(rng, turns)
        return _record(rid, q, a, video=f"media/{rid}.mp4", more=more)
    if task == "compare":
        # Same colour or not (balanced): a comparison across the two images that needs no
        # binding of a colour to the image order (the 2-layer demo LLM never learned that).
        same = bool(rng.integers(2))
        a, b = rng.choice(4, 2, replace=False)
        for k, c in (("a", a), ("b", a if same else b)):
            _image(rng, [(SHAPES[rng.integers(3)], colors[c], None)]).save(media / f"{rid}{k}.png")
        q = "<image>\n<image>\nAre the two shapes the same color? Answer yes or no."
        return _record(rid, q, "yes" if same else "no",
                       image=[f"media/{rid}a.png", f"media/{rid}b.png"])  # fmt: skip
    if task == "count":
        n = int(rng.integers(1, 4))
        shapes = [(SHAPES[rng.integers(3)], colors[rng.integers(4)], None) for _ in range(n)]
        _image(rng, shapes, count=True).save(media / f"{rid}.png")
        q = "<image>\nHow many shapes are there? Answer one, two or three."
        return _record(rid, q, COUNT_WORDS[n - 1], image=f"media/{rid}.png")
    # color / position: one shape, in the left or right half for the position question
    # (and for both questions of a multi-turn record)
    color, shape = colors[rng.integers(4)], SHAPES[rng.integers(3)]
    side = ("left", "right")[rng.integers(2)] if task == "position" or multi_turn else None
    _image(rng, [(shape, color, side)]).save(media / f"{rid}.png")
    turns = [(COLOR_Q, color), (SIDE_Q, side)] if multi_turn else (
        [(SIDE_Q, side)] if task == "position" else [(COLOR_Q, color)])  # fmt: skip
    q, a, more = _first_turn(rng, turns)
    rec = _record(rid, q, a, image=f"media/{rid}.png", more=more)
    rec["caption"] = f"A {color} {shape}."
    return rec


def make_shapes_dataset(
    out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, multi_turn: bool = False
) -> dict:
    """Write the dataset; returns {"train", "test", "captions", "train_si"} json paths."""
    out_dir = Path(out_dir)
    (out_dir / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    train_cycle = [t for t in TASKS for _ in range(TRAIN_MIX[t])]
    for split, n, cycle in (("train", n_train, train_cycle), ("test", n_test, TASKS)):
        records = []
        for i in range(n):
            task = cycle[i % len(cycle)]
            records.append(make_example(task, rng, out_dir, f"{split}{i:05d}",
                                        multi_turn=split == "train" and multi_turn))  # fmt: skip
            records[-1]["task"] = task
        splits[split] = records
    captions = [
        _record(r["id"] + "c", "<image>", r["caption"], image=r["image"])
        for r in splits["train"] if "caption" in r
    ]  # fmt: skip
    # The demo's stage 2-SI set: the single-image spatial questions (see lov_jax/demo.py).
    train_si = [r for r in splits["train"] if r["task"] in SI_TASKS]
    paths = {}
    for name, records in (*splits.items(), ("captions", captions), ("train_si", train_si)):
        paths[name] = out_dir / f"{name}.json"
        paths[name].write_text(json.dumps(records))
    return paths
