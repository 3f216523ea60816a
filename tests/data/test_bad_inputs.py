"""Bad inputs end in one clear error naming the culprit, or a counted skip; a loader that
can never yield a sample stops with its skip table (issue 24, "Inputs", "Loader liveness").

Before (main at d821121): a malformed jsonl line was a bare JSONDecodeError; unknown data
yaml keys were ignored; a yaml naming a missing file or a parquet without `conversations`
died deep inside (or skipped 100% of rows); an all-skipped or too-small-budget epoch looped
forever at 100% CPU; an empty dataset died with a bare StopIteration.
"""

from __future__ import annotations

import functools
import io
import json

import av
import numpy as np
import pytest
from PIL import Image

from data_pipelines import loader, records, sources, stats
from data_pipelines.loader import LoaderConfig, NoSamplesError
from data_pipelines.sample import BadSample
from data_pipelines.tokenizer import build_qwen2_tokenizer, qwen2_token_ids
from lov_jax import config


def _conv(q="<image>\nWhat is it?", a="A square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def cfg(tok):
    return config.tiny(token_ids=qwen2_token_ids(tok))  # the tokenizer built once


def _process(cfg, tok, max_tokens=4096, max_crops=16):
    options = records.RecordOptions(max_tokens=max_tokens, max_crops=max_crops)
    return functools.partial(records.process_record, cfg=cfg, tokenizer=tok, options=options)


def _loader(src, cfg, tok, *, epochs=None, max_tokens=4096, max_crops=16, on_error="skip"):
    lc = LoaderConfig(batch_size=1, max_tokens=max_tokens, max_crops=max_crops, window=2,
                      num_epochs=epochs, on_error=on_error, pad_id=cfg.ids.pad)  # fmt: skip
    process = _process(cfg, tok, max_tokens, max_crops)
    return loader.make_loader(src, process, cfg, lc, process_index=0, process_count=1)


# ---- 1. jsonl lines ------------------------------------------------------------------------


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_is_one_error_naming_file_and_line(tmp_path):
    good = json.dumps({"id": "a", "conversations": _conv("Hi?", "Hello.")})
    f = _jsonl(tmp_path / "d.jsonl", [good, "", '{"id": "b", "conversations": [', good])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: invalid JSON \(") as e:
        sources.open_source(f)
    assert not isinstance(e.value, json.JSONDecodeError)
    _jsonl(f, [good, "[1, 2]"])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: a JSON list, not an object"):
        sources.JsonSource(f)
    (tmp_path / "d.json").write_text('[{"id": "a"},\n {"id": }]')
    with pytest.raises(ValueError, match=r"d\.json:2:9: invalid JSON"):
        sources.open_source(tmp_path / "d.json")


def test_malformed_jsonl_lines_are_skipped_and_counted(tmp_path, cfg, tok):
    lines = [json.dumps({"id": f"t{i}", "conversations": _conv("Hi?", f"n{i}")}) for i in range(4)]
    lines[1] = "not json at all"
    lines[3] = '"a string"'
    f = _jsonl(tmp_path / "d.jsonl", lines)
    src = sources.open_source(f, on_error="skip")
    assert len(src) == 4 and src[2]["id"] == "t2" and src[2][sources.INDEX_KEY] == 2
    it = _loader(src, cfg, tok, epochs=1)
    assert len(list(it)) == 1  # t0 and t2 share a row
    s = it.stats()
    assert (s["samples_in"], s["samples_packed"], s["skip/malformed_record"]) == (4, 2, 2)
    with pytest.raises(BadSample, match=r"malformed_record: .*d\.jsonl:2: invalid JSON"):
        loader.ProcessFn(_process(cfg, tok), "raise")(src[1])


# ---- 2. data yaml entries --------------------------------------------------------------------


def _yaml(tmp_path, entries, extra=""):
    import yaml

    (tmp_path / "a.json").write_text(json.dumps([{"id": "a", "conversations": _conv()}]))
    p = tmp_path / "mix.yaml"
    p.write_text(yaml.safe_dump({"datasets": entries}) + extra)
    return p


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"sampling_stratgy": "first:1"}, r"datasets\[1\]: unknown key 'sampling_stratgy' "
         r"\(did you mean 'sampling_strategy'\?\); known: json_path, parquet_path, "),
        ({"wieght": 2}, r"datasets\[1\]: unknown key 'wieght' \(did you mean 'weight'\?\)"),
        ({"sampling_strategy": "top:3"}, r"datasets\[1\]: sampling_strategy 'top:3' is not"),
        ({"weight": "heavy"}, r"datasets\[1\]: weight must be a number >= 0, got 'heavy'"),
    ],
)  # fmt: skip
def test_yaml_entry_keys_and_values_are_checked_up_front(tmp_path, entry, match):
    first = {"json_path": str(tmp_path / "a.json")}
    p = _yaml(tmp_path, [first, {"json_path": str(tmp_path / "a.json"), **entry}])
    with pytest.raises(ValueError, match=match):
        sources.open_source(p)


def test_yaml_missing_file_and_unknown_top_key(tmp_path):
    ok = {"json_path": str(tmp_path / "a.json")}
    missing = str(tmp_path / "gone.json")
    p = _yaml(tmp_path, [ok, {"json_path": missing}])
    with pytest.raises(FileNotFoundError, match=rf"mix\.yaml: datasets\[1\]: .*{missing}"):
        sources.open_source(p)
    p = _yaml(tmp_path, [ok, {"parquet_path": str(tmp_path / "gone.parquet")}])
    with pytest.raises(FileNotFoundError, match=r"datasets\[1\] \(parquet_path .*gone\.parquet"):
        sources.open_source(p)
    p = _yaml(tmp_path, [ok], extra="dataset_weights: [1]\n")
    with pytest.raises(ValueError, match=r"unknown top-level key 'dataset_weights'"):
        sources.open_source(p)
    with pytest.raises(FileNotFoundError, match=r"data yaml not found: .*nope\.yaml"):
        sources.open_source(tmp_path / "nope.yaml")


# ---- 3. parquet columns ----------------------------------------------------------------------


def test_parquet_without_conversations_is_one_file_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet: parquet has no column 'conversations'.*"
                       r"its columns: id, text"):  # fmt: skip
        sources.open_source(tmp_path / "p.parquet")
    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    pq.write_table(pa.table({"id": ["a"], "conversations": [turns]}), tmp_path / "p.parquet")
    assert sources.open_source(tmp_path / "p.parquet")[0]["conversations"] == turns


# ---- 7. loader liveness ----------------------------------------------------------------------


def test_all_images_missing_stops_with_the_skip_table(tmp_path, cfg, tok):
    recs = [{"id": f"m{i}", "image": f"gone{i}.png", "conversations": _conv()} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    src = sources.open_source(tmp_path / "d.json", image_folder=str(tmp_path))
    it = _loader(src, cfg, tok)  # num_epochs=None: the training loader (used to spin forever)
    with pytest.raises(NoSamplesError) as e:
        next(it)
    msg = str(e.value)
    assert "whole pass over the 3 records of" in msg and "d.json" in msg
    assert "skipped: missing_image 3 (first: missing_image: record 'm" in msg
    assert f"image file {tmp_path}/gone" in msg


def test_seq_len_smaller_than_every_sample_stops_with_the_numbers(cfg, tok):
    recs = [{"id": f"t{i}", "conversations": _conv("Hi there?", "Hello " * 20)} for i in range(4)]
    it = _loader(recs, cfg, tok, max_tokens=8)
    with pytest.raises(NoSamplesError, match=r"L=8 tokens, N=16 crops\); skipped: too_long_tokens "
                       r"4 \(first: too_long_tokens: record 't"):  # fmt: skip
        next(it)


def test_dropped_samples_in_the_packer_count_too(cfg):
    """A sample made fine but over the row budget (packer drop), synthetic records."""
    recs = stats.ov_mix_records(5, seed=1)
    for r in recs:
        r.update(kind="text", image_sizes=[], num_frames=0, text_tokens=300)
    lc = LoaderConfig(batch_size=2, max_tokens=64, max_crops=4, num_epochs=2)
    it = loader.make_loader(recs, stats.SyntheticProcess(cfg), cfg, lc, process_index=0,
                            process_count=1)  # fmt: skip
    with pytest.raises(NoSamplesError, match=r"5 records of .*too_long_tokens 5 \(first: sample "
                       r"syn0 \(synthetic\): 300 tokens, 0 crops\)"):  # fmt: skip
        next(it)


def test_some_usable_samples_keep_the_loader_going(cfg):
    recs = stats.ov_mix_records(6, seed=2)
    for r in recs[:5]:
        r["skip"] = "missing_image"
    for r in recs:
        r.update(kind="text", image_sizes=[], num_frames=0, text_tokens=20)
    lc = LoaderConfig(batch_size=1, max_tokens=64, max_crops=4, num_epochs=None, window=1)
    it = loader.make_loader(recs, stats.SyntheticProcess(cfg), cfg, lc, process_index=0,
                            process_count=1)  # fmt: skip
    batches = [next(it) for _ in range(3)]  # three passes, one sample each
    assert all(int(b["segment_ids"].max()) == 1 for b in batches)
    assert it.stats()["skip/missing_image"] >= 10


def test_empty_dataset_names_the_file(tmp_path, cfg, tok):
    (tmp_path / "empty.jsonl").write_text("\n")
    src = sources.open_source(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"no records in .*empty\.jsonl \(0 records in all\)"):
        _loader(src, cfg, tok)
    with pytest.raises(ValueError, match=r"no records for process 2 of 3 in .*\(2 records"):
        loader.make_loader([{"id": "a"}, {"id": "b"}], _process(cfg, tok), cfg,
                           LoaderConfig(batch_size=1, max_tokens=8, max_crops=0),
                           process_index=2, process_count=3)  # fmt: skip


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("batch_size", 0, r"loader batch_size=0: must be an int >= 1"),
        ("max_tokens", 1, r"loader max_tokens=1: must be an int >= 2"),
        ("max_crops", -1, r"loader max_crops=-1: must be an int >= 0"),
        ("num_epochs", 0, r"loader num_epochs=0: >= 1 or None"),
    ],
)
def test_budgets_that_cannot_hold_a_sample_are_rejected_up_front(field, value, match):
    kw = {"batch_size": 1, "max_tokens": 64, "max_crops": 1, field: value}
    with pytest.raises(ValueError, match=match):
        LoaderConfig(**kw)


def test_the_train_loader_stops_before_the_first_step(tmp_path, cfg, tok):
    """`lov-jax train`'s data path (run.make_data): all-missing images -> NoSamplesError."""
    from configs import stage2_si
    from lov_jax.train import run

    recs = [{"id": f"m{i}", "image": "gone.png", "conversations": _conv()} for i in range(2)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    c = stage2_si.get_config("tiny")
    c.data.train_path, c.data.image_folder = str(tmp_path / "d.json"), str(tmp_path)
    c.data.seq_len, c.data.max_crops = 2048, 4
    _, it = run.make_data(c, cfg, tok)
    with pytest.raises(NoSamplesError, match=r"2 records of .*d\.json.*missing_image 2"):
        next(it)


# ---- 8. corrupt media at training time name the file -----------------------------------------


def test_truncated_image_and_zero_frame_video_name_the_file(tmp_path, cfg, tok):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(buf, format="PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with av.open(str(tmp_path / "zero.mp4"), mode="w") as c:  # a container with no frames
        s = c.add_stream("mpeg4", rate=4)
        s.height, s.width, s.pix_fmt = 16, 16, "yuv420p"
        c.start_encoding()
    recs = [
        {"id": "img", "image": "trunc.png", "conversations": _conv()},
        {"id": "vid", "video": "zero.mp4", "conversations": _conv("<video>\nWhat happens?")},
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    src = sources.open_source(tmp_path / "d.json", str(tmp_path), str(tmp_path))
    with pytest.raises(NoSamplesError) as e:
        next(_loader(src, cfg, tok))
    msg = str(e.value)
    assert f"corrupt_image 1 (first: corrupt_image: record 'img' ({tmp_path}/d.json[0])" in msg
    assert f"cannot decode image {tmp_path}/trunc.png" in msg
    assert "empty_video 1 (first: empty_video: record 'vid'" in msg
    assert f"video {tmp_path}/zero.mp4 has zero frames" in msg
    it = _loader(src, cfg, tok, on_error="raise")
    either = r"(corrupt_image: record 'img'.*trunc\.png|empty_video: record 'vid'.*zero\.mp4)"
    with pytest.raises(BadSample, match=either):
        next(it)


def test_undecodable_array_record_is_a_counted_skip(tmp_path, cfg, tok):
    from array_record.python.array_record_module import ArrayRecordWriter

    good = {"id": "ok", "conversations": _conv("Hi?", "Hello.")}
    w = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for data in (
        sources.encode_record_bytes(good),
        b"\xc1 not msgpack",
        sources.encode_record_bytes([1]),
    ):
        w.write(data)
    w.close()
    src = sources.open_source(tmp_path / "d.array_record")
    it = _loader(src, cfg, tok, epochs=1)
    assert len(list(it)) == 1
    assert (it.stats()["samples_packed"], it.stats()["skip/malformed_record"]) == (1, 2)
    with pytest.raises(BadSample, match=r"d\.array_record\[1\]: cannot decode record"):
        loader.ProcessFn(_process(cfg, tok), "raise")(src[1])


def test_a_row_shorter_than_the_template_is_rejected_before_reading(tmp_path, cfg, tok):
    from configs import stage2_si
    from lov_jax.train import run

    c = stage2_si.get_config("tiny")
    c.data.train_path = str(tmp_path / "never_read.json")  # the check comes first
    c.data.seq_len = 20
    with pytest.raises(ValueError, match=r"max_tokens 20 cannot hold one sample: the qwen_1_5 "
                       r"template with a system prompt takes 21 tokens"):  # fmt: skip
        run.make_data(c, cfg, tok)
    c.data.system_prompt = ""
    with pytest.raises(ValueError, match=r"template without a system prompt takes 10 tokens"):
        records.check_row_budget(tok, records.RecordOptions(
            chat=records.chat.ChatOptions(system_prompt=None), max_tokens=9))  # fmt: skip
    records.check_row_budget(tok, records.RecordOptions(max_tokens=21))


def test_data_stats_counts_malformed_lines_and_stops_on_nothing(tmp_path, tok, capsys):
    """`lov-jax data stats` counts malformed lines as skips; on nothing usable it prints one
    error line with the skip table (it used to spin forever)."""
    from data_pipelines.tokenizer import save_hf_tokenizer_files
    from lov_jax import cli

    save_hf_tokenizer_files(tmp_path / "tok", tok)
    f = _jsonl(tmp_path / "d.jsonl", ["{oops", "[1]"])
    argv = ["data", "stats", str(f), "--tokenizer", str(tmp_path / "tok"), "--preset", "tiny",
            "-L", "256", "-N", "1"]  # fmt: skip
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: no usable sample in a whole pass over the 2 records of ")
    assert f"skipped: malformed_record 2 (first: malformed_record: {f}:" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rows_per_host", 0, r"^data\.rows_per_host=0: must be an int >= 1$"),
        ("seq_len", 1, r"^data\.seq_len=1: must be an int >= 2$"),
        ("max_crops", -2, r"^data\.max_crops=-2: must be an int >= 0$"),
        ("skip_policy", "skp", r"^data\.skip_policy='skp': not in \('skip', 'raise'\)$"),
    ],
)
def test_bad_data_values_name_the_config_field(tmp_path, cfg, tok, field, value, match):
    from configs import stage2_si
    from lov_jax.train import run

    c = stage2_si.get_config("tiny")
    c.data.train_path = str(tmp_path / "never_read.json")
    c.data[field] = value
    with pytest.raises(ValueError, match=match):
        run.make_data(c, cfg, tok)
