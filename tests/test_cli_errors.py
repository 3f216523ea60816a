"""Every command fails the same way on a bad input: one `error: <what>, <where>` on stderr,
a non-zero exit, no traceback (the traceback only with --debug)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lov_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (argv, the culprit the message must name)}."""
    missing = tmp / "no_such_ckpt"
    bad_cfg = tmp / "no_such_config.py"
    not_ckpt = tmp / "just_a_dir"
    not_ckpt.mkdir(exist_ok=True)
    (not_ckpt / "readme.txt").write_text("hello")
    records = tmp / "r.jsonl"
    records.write_text(json.dumps({"id": 1, "conversations": []}) + "\n")
    stage1 = f"{ROOT}/configs/stage1.py"
    return {
        "train": (["train", "--config", f"{bad_cfg}:tiny", "--workdir", str(tmp / "w")],
                  str(bad_cfg)),
        "train_preset": (["train", "--config", f"{stage1}:no_such_preset", "--workdir",
                          str(tmp / "w")], "no_such_preset"),
        "hf-to-orbax": (["convert", "hf-to-orbax", "--hf", str(not_ckpt), "--out",
                         str(tmp / "o")], str(not_ckpt)),
        "orbax-to-hf": (["convert", "orbax-to-hf", "--ckpt", str(not_ckpt), "--out",
                         str(tmp / "o")], str(not_ckpt)),
        "eval": (["eval", "--ckpt", str(missing), "--task", str(records), "--out",
                  str(tmp / "e")], str(missing)),
        "generate": (["generate", "--ckpt", str(missing), "--prompt", "hi"], str(missing)),
        "judge": (["judge", "--ckpt", str(missing), "--pairs", str(records), "--out",
                   str(tmp / "j")], f"{records}:1"),  # the records are read first
        "serve": (["serve", "--ckpt", str(missing), "--port", "0"], str(missing)),
        "plan": (["plan", "--config", f"{stage1}:no_such_preset", "--topology", "v5e-4"],
                 ("no_such_preset", "libtpu is not installed")),  # without libtpu: that
        "dpo": (["dpo", "--config", f"{bad_cfg}:tiny", "--workdir", str(tmp / "d")], str(bad_cfg)),
        "dpo-loop": (["dpo-loop", "--config", f"{bad_cfg}:tiny", "--workdir", str(tmp / "l"),
                      "--prompts", str(records)], str(bad_cfg)),
        "data-build": (["data", "build", str(tmp / "none.jsonl"), "--out", str(tmp / "b")],
                       str(tmp / "none.jsonl")),
        "check-parity": (["check-parity", "--hf", str(missing)], str(missing)),
    }  # fmt: skip


CASES = [
    "train", "train_preset", "hf-to-orbax", "orbax-to-hf", "eval", "generate", "judge",
    "serve", "plan", "dpo", "dpo-loop", "data-build", "check-parity",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_every_command_one_error_line(case, tmp_path, capsys):
    argv, culprit = _bad_inputs(tmp_path)[case]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc != 0, (rc, out, err)
    culprits = culprit if isinstance(culprit, tuple) else (culprit,)
    assert len(errors) == 1 and any(c in errors[0] for c in culprits), err
    assert "Traceback" not in err and "Traceback" not in out


def test_debug_raises_with_traceback(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        cli.main(["generate", "--ckpt", str(missing), "--prompt", "hi", "--debug"])


def test_unexpected_errors_name_their_type():
    assert cli.error_line(ValueError("bad x, in f.json")) == "error: bad x, in f.json"
    assert cli.error_line(FileNotFoundError(2, "No such file", "a.png")).endswith("'a.png'")
    line = cli.error_line(ZeroDivisionError("division by zero"))
    assert line.startswith("error: ZeroDivisionError: division by zero") and "--debug" in line
    assert cli.error_line(KeyError("k")).startswith("error: KeyError: 'k'")
    own = type("HeldError", (RuntimeError,), {"__module__": "lov_jax.workdir_lock"})
    assert cli.error_line(own("w is locked by pid 7")) == "error: w is locked by pid 7"
