"""Nothing in the package runs code from data: no pickle, torch.load, eval / exec, unsafe
yaml, remote code; the server binds to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lov_jax", "data_pipelines")

FORBIDDEN = {
    "pickle import": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b", re.M),
    "pickle call": re.compile(r"\bpickle\.(loads?|dumps?|Unpickler)\b"),
    "torch.load": re.compile(r"\btorch\.load\("),
    "eval(": re.compile(r"(?<![\w.])eval\("),
    "exec(": re.compile(r"(?<![\w.])exec\("),
    "yaml.load(": re.compile(r"\byaml\.(load|unsafe_load|full_load|load_all)\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
}


def scan(text: str) -> list[str]:
    return [name for name, pattern in FORBIDDEN.items() if pattern.search(text)]


def test_scanner_catches_each_pattern():
    bad = {
        "pickle import": "import pickle\n", "pickle call": "x = pickle.loads(b)",
        "torch.load": "sd = torch.load(path)", "eval(": "v = eval(text)",
        "exec(": "  exec(code)", "yaml.load(": "yaml.load(f)",
        "trust_remote_code=True": "from_pretrained(p, trust_remote_code=True)",
        "allow_pickle=True": "np.load(f, allow_pickle=True)",
    }  # fmt: skip
    for name, text in bad.items():
        assert scan(text) == [name], (name, scan(text))
    fine = "model.eval()\nast.literal_eval(s)\nrun_eval(x)\nyaml.safe_load(f)\nno pickles here"
    assert scan(fine) == []


def test_package_has_no_code_from_data():
    hits = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for name in scan(path.read_text()):
                hits.append(f"{path.relative_to(ROOT)}: {name}")
    assert hits == []


def test_pod_join_payload_is_json_and_npz():
    from lov_jax.inference.engine import PromptInputs
    from lov_jax.inference.slots import Knobs
    from lov_jax.serve.multihost import decode_join, encode_join
    from lov_jax.visual_layout import VisualItem

    rng = np.random.default_rng(4)
    prompt = PromptInputs(
        rng.integers(0, 900, 37).astype(np.int32),
        rng.integers(0, 256, (3, 14, 14, 3), dtype=np.uint8),
        [VisualItem("anyres", image_size=(30, 50)), VisualItem("video", num_frames=2)],
    )
    payload = encode_join(prompt, 17, Knobs(0.7, 5, 0.9, 123))
    assert b"pickle" not in payload[:64]
    got, max_new, knobs = decode_join(payload)
    assert max_new == 17 and knobs == Knobs(0.7, 5, 0.9, 123) and got.items == prompt.items
    np.testing.assert_array_equal(got.tokens, prompt.tokens)
    np.testing.assert_array_equal(got.crops, prompt.crops)


def test_server_binds_localhost_and_caps_bodies_by_default():
    from lov_jax.cli import build_parser
    from lov_jax.serve import ServeConfig

    args = build_parser().parse_args(["serve", "--ckpt", "x"])
    assert args.host == "127.0.0.1" and ServeConfig().host == "127.0.0.1"
    assert 0 < ServeConfig().max_body_bytes <= 1 << 30 and 0 < args.max_body_mb <= 1024
