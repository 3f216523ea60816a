"""`lov-jax serve` through the `openai` client: continuous batching equals one-at-a-time
greedy generation, streaming, sampling per request, bad input, disconnects, the queue.

One tiny llava-hf checkpoint (converted as tests/inference do), one server for the
module. The reference is `lov_jax.inference.api.generate` on each request alone (the
KV-cache generator, itself tested against HF `generate` in tests/inference).
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import time

import jax
import numpy as np
import openai
import pytest
from PIL import Image

from lov_jax.inference import Prompter, generate
from lov_jax.inference.engine import Generator
from lov_jax.inference.slots import SlotDecoder
from lov_jax.pretrained import load_pretrained
from lov_jax.serve import Batching, ServeConfig, start
from lov_jax.serve.scheduler import Job, QueueFull, Scheduler
from lov_jax.testing.hf_checkpoints import make_tiny_hf

BATCHING = Batching(slots=4, context=2048 + 64, length_buckets=(64, 256, 2048),
                    crop_buckets=(2, 4), max_queue=16)  # fmt: skip
MODEL = "tiny-ov"


def _png(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = make_tiny_hf(tmp_path_factory.mktemp("serve"), tie_word_embeddings=False, seed=3)
    cfg, params = load_pretrained(d)
    return d, cfg, params, Prompter.from_checkpoint(d)


@pytest.fixture(scope="module")
def server(ckpt):
    _, cfg, params, prompter = ckpt
    # 2 frames per video (lmms-eval's sampling: a shorter clip would repeat frames)
    config = ServeConfig(model_name=MODEL, port=0, max_image_pixels=600 * 600, num_frames=2)
    running = start(params, cfg, prompter, config, BATCHING, warmup=(2,))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="EMPTY", max_retries=0, timeout=300)


def _requests():
    """(OpenAI messages, the same request for `generate`, max_tokens): text, an image,
    two images, several turns with a system prompt."""
    img = [_png(40, 56, 1), _png(33, 33, 2)]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in img]
    part = [{"type": "image_url", "image_url": {"url": _uri(b)}} for b in img]
    return [
        ([{"role": "user", "content": "Describe a red square."}],
         [{"role": "user", "content": "Describe a red square."}], 9),
        ([{"role": "user", "content": [{"type": "text", "text": "What is it?"}, part[0]]}],
         [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                       {"type": "image", "image": pil[0]}]}], 7),
        ([{"role": "user", "content": [part[0], part[1], {"type": "text", "text": "Diff?"}]}],
         [{"role": "user", "content": [{"type": "image", "image": pil[0]},
                                       {"type": "image", "image": pil[1]},
                                       {"type": "text", "text": "Diff?"}]}], 5),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count."}], 12),
        ([{"role": "user", "content": "A long answer, please: " + "go on " * 20}],
         [{"role": "user", "content": "A long answer, please: " + "go on " * 20}], 20),
    ]  # fmt: skip


class Compiles:
    """Counts XLA backend compilations while active (jax.monitoring)."""

    def __enter__(self):
        self.count = 0

        def listener(event, _duration, **_):
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def test_concurrent_requests_equal_sequential_greedy(ckpt, server, client):
    _, cfg, params, prompter = ckpt
    reqs = _requests() * 2  # 10 requests over 4 slots: joins while others decode
    ref_gen = Generator(params, cfg)
    expected = [generate(params, cfg, r, prompter=prompter, max_new_tokens=m, generator=ref_gen,
                         return_output=True) for _, r, m in reqs]  # fmt: skip

    def call(k):
        msgs, _, m = reqs[k]
        return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=m)

    with Compiles() as compiles, concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
        outs = list(pool.map(call, range(len(reqs))))
    assert compiles.count == 0  # warm-up covered every shape these requests take
    assert server.scheduler.max_live > 1  # requests were decoded together
    for (texts, gen_out), out in zip(expected, outs, strict=True):
        choice = out.choices[0]
        assert choice.message.content == texts[0]
        assert choice.message.role == "assistant"
        assert choice.finish_reason == ("stop" if gen_out.stopped[0] else "length")
        assert out.usage.completion_tokens == len(gen_out.tokens[0])
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        assert out.object == "chat.completion" and out.model == MODEL and out.id
    # Ten different prompts would not all give one text: the comparison means something.
    assert len({o.choices[0].message.content for o in outs}) > 2


def test_stream_equals_non_stream(server, client):
    msgs, _, m = _requests()[4]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=m)
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=m, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stop_strings_n_and_sampling(server, client):
    msgs, _, _ = _requests()[0]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9)
    text = full.choices[0].message.content
    cut = text[len(text) // 2 : len(text) // 2 + 2]
    assert cut.strip()
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9, stop=[cut])
    assert out.choices[0].message.content == text[: text.find(cut)]
    assert out.choices[0].finish_reason == "stop"
    two = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.message.content == text for c in two.choices)

    def sample(seed):
        r = client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed
        )
        return r.choices[0].message.content

    alone = sample(7)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # with neighbours in the batch
        together = list(pool.map(sample, [7, 8, 7, 9]))
    assert together[0] == together[2] == alone
    assert len(set(together)) > 1


def _post(server, body: bytes | dict, headers: dict | None = None):
    host, port = server.http.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=300)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/v1/chat/completions", data,
                 {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return out


def test_bad_input_is_400_and_others_are_served(server, client):
    good = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    img = {"type": "image_url", "image_url": {"url": _uri(_png(20, 20, 0))}}
    bad = {
        "not an image": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _uri(b"hello", "image/png")}}]}]},
        "too large": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _uri(_png(700, 650, 1))}}]}]},
        "context": {**good, "messages": [{"role": "user", "content": [img] * 5}]},
        "wrong type": {**good, "max_tokens": "4"},
        "bool as int": {**good, "n": True},
        "temperature": {**good, "temperature": 5},
        "no messages": {**good, "messages": []},
        "bad part": {**good, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "remote url": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
        "placeholders": {**good, "messages": [{"role": "user", "content": "<image> <image>"}]},
    }  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ok = pool.submit(client.chat.completions.create, **good)
        results = dict(zip(bad, pool.map(lambda b: _post(server, b), bad.values()), strict=True))
        malformed = pool.submit(_post, server, b'{"model": ')
        assert ok.result().choices[0].message.content is not None
    for name, (status, body) in results.items():
        assert status == 400, (name, body)
        assert body["error"]["message"], name
    assert "context" in results["context"][1]["error"]["message"]
    assert "max_tokens" in results["wrong type"][1]["error"]["message"]
    assert malformed.result()[0] == 400
    assert "JSON" in malformed.result()[1]["error"]["message"]
    # Unknown top-level fields are ignored (lmms-eval's extra_body); unknown model -> 404.
    extra = {**good, "chat_template_kwargs": {"enable_thinking": False}, "media_io_kwargs": {}}
    assert _post(server, extra)[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**good, "model": "gpt-4"})
    status, body = _post(server, good, {"Content-Length": str(1 << 40)})
    assert status in (400, 413)


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    host, port = server.http.server_address[:2]
    conn = http.client.HTTPConnection(host, port)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["slots"] == BATCHING.slots
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 200 and b"<html" in resp.read()
    conn.close()


def test_disconnect_mid_stream_frees_the_slot(server, client):
    msgs, _, _ = _requests()[4]
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1500,
                                            stream=True)  # fmt: skip
    it = iter(stream)
    next(it), next(it)
    assert server.scheduler.load["live"] >= 1
    stream.close()
    deadline = time.monotonic() + 60
    while server.scheduler.load["live"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.scheduler.load["live"] == 0


def test_queue_bound_and_timeout(ckpt):
    _, cfg, params, prompter = ckpt
    gen = Generator(params, cfg, length_buckets=(64,))
    prompt = prompter.encode(cfg, [{"role": "user", "content": "Hi"}])
    sched = Scheduler(SlotDecoder(gen, slots=1, cache_len=128), prompter.tokenizer, cfg.ids.eos,
                      max_queue=1)  # fmt: skip
    late = sched.submit(Job(prompt, 4, deadline=time.monotonic() - 1))
    with pytest.raises(QueueFull):
        sched.submit(Job(prompt, 4))
    sched.start()
    try:
        job, kind, message = late.events.get(timeout=60)
        assert job is late and kind == "error" and "timed out" in message
    finally:
        sched.close()


def test_cli_serve(ckpt, tmp_path):
    """`lov-jax serve` in a subprocess: binds 127.0.0.1, answers the openai client."""
    import socket
    import subprocess
    import sys

    hf_dir = ckpt[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lov_jax.cli", "serve", "--ckpt", str(hf_dir), "--port",
           str(port), "--context", "128", "--length-buckets", "64", "--warmup-crops", "",
           "--slots", "2", "--model-name", MODEL]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", timeout=300)
        deadline = time.monotonic() + 240
        while True:
            try:
                out = c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
                )
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


class Chromium:
    """Headless chromium over the DevTools protocol on a pipe (fds 3 / 4, NUL-framed
    JSON): no websocket client needed."""

    def __init__(self, binary: str, profile):
        import os
        import subprocess

        r_in, self._w = os.pipe()  # we write commands, chromium reads fd 3
        self._r, w_out = os.pipe()  # chromium writes fd 4, we read

        def fds():
            os.dup2(r_in, 3)
            os.dup2(w_out, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=900,700",
             "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(r_in)
        os.close(w_out)
        self._buf, self._id, self.session = b"", 0, None

    def send(self, method: str, **params):
        import os

        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, (method, reply["error"])
                return reply.get("result", {})

    def evaluate(self, expression: str):
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)  # fmt: skip
        return out["result"].get("value")

    def close(self):
        import os

        self.proc.kill()
        self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def test_chat_page_in_a_browser(server, client, tmp_path):
    """Upload an image, ask, watch the streamed answer: equal to the API's answer."""
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium installed (apt-get install -y chromium)")
    image = tmp_path / "shape.png"
    image.write_bytes(_png(40, 56, 1))
    question = "What is it?"
    want = client.chat.completions.create(model=MODEL, max_tokens=24, messages=[{
        "role": "user", "content": [{"type": "text", "text": question},
                                    {"type": "image_url", "image_url": {"url": _uri(
                                        image.read_bytes())}}]}])  # fmt: skip
    browser = Chromium(binary, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target,
                                       flatten=True)["sessionId"]  # fmt: skip
        host, port = server.http.server_address[:2]
        browser.send("Page.navigate", url=f"http://{host}:{port}/")
        deadline = time.monotonic() + 60
        while browser.evaluate("document.getElementById('model-name')?.textContent") != MODEL:
            assert time.monotonic() < deadline, "the page did not load its model name"
            time.sleep(0.2)
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#images")["nodeId"]
        browser.send("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
        browser.evaluate("document.getElementById('max-tokens').value = '24';"
                         f"document.getElementById('prompt').value = {json.dumps(question)};"
                         "document.getElementById('form').requestSubmit(); true")  # fmt: skip
        state = "document.querySelector('.turn.assistant, .turn.error')?.dataset.state"
        deadline = time.monotonic() + 240
        while browser.evaluate(state) not in ("done", "error"):
            assert time.monotonic() < deadline, "no answer streamed in"
            time.sleep(0.2)
        got = browser.evaluate(
            "(() => { const d = document.querySelector('.turn.assistant, .turn.error');"
            " return {...d.dataset, text: d.textContent}; })()"
        )
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "chat_page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    assert got["state"] == "done", got
    assert got["answer"] == want.choices[0].message.content
    assert got["finish"] == want.choices[0].finish_reason
    assert int(got["chunks"]) > 1  # it streamed, delta by delta
    print(f"screenshot: {tmp_path / 'chat_page.png'}")


def test_video_url_and_frames_as_video(ckpt, server, client, tmp_path):
    """A video as a data URI or a local path answers as `generate` on the file; with
    --frames-as-video, images sent as frames (lmms-eval's way) are that video."""
    from data_pipelines.video import read_video, write_video
    from lov_jax.serve import Service

    _, cfg, params, prompter = ckpt
    rng = np.random.default_rng(4)
    path = tmp_path / "v.mp4"
    write_video(path, rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8))
    question = "What happens?"
    want = generate(params, cfg, (question, [], [str(path)]), prompter=prompter,
                    max_new_tokens=6, num_frames=2)  # fmt: skip
    for url in (_uri(path.read_bytes(), "video/mp4"), f"file://{path}"):
        out = client.chat.completions.create(model=MODEL, max_tokens=6, messages=[{
            "role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                        {"type": "text", "text": question}]}])  # fmt: skip
        assert out.choices[0].message.content == want
    frames = read_video(path, 2)
    pngs = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, "PNG")
        pngs.append({"type": "image_url", "image_url": {"url": _uri(buf.getvalue())}})
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        *pngs, {"type": "text", "text": question}]}]}  # fmt: skip
    as_video = Service(server.scheduler, prompter, cfg,
                       ServeConfig(model_name=MODEL, frames_as_video=True))  # fmt: skip
    jobs, _, _ = as_video.jobs(body)
    ref = prompter.encode(cfg, (question, [], [frames]))
    np.testing.assert_array_equal(jobs[0].prompt.tokens, ref.tokens)
    np.testing.assert_array_equal(jobs[0].prompt.crops, ref.crops)
    assert [i.kind for i in jobs[0].prompt.items] == ["video"]
    images, _, _ = server.service.jobs(body)  # without the flag: two images
    assert [i.kind for i in images[0].prompt.items] == ["pad", "pad"]
