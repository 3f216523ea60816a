"""OpenAI-compatible HTTP front end (stdlib `ThreadingHTTPServer`) over the `Scheduler`.

    POST /v1/chat/completions   messages with text / image_url / video_url parts
    GET  /v1/models, /health, / (the chat page)

The request and response schema is OpenAI's chat completions (docs/reference.md and
REFERENCE_KERNELS 4: lmms-eval's `openai` model). Unknown top-level fields are ignored
(the openai client merges `extra_body` into the body); an unknown `model` is a 404;
anything malformed is a 400 naming the field, and the server goes on serving. Each HTTP
request runs on its own thread: it validates and encodes the prompt (the checkpoint's
chat template, `Prompter`), enqueues one job per choice and relays the job's events.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import queue
import secrets
import select
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from lov_jax.inference.prompting import Prompter, PromptError
from lov_jax.inference.slots import Knobs
from lov_jax.serve.scheduler import Job, QueueFull, Scheduler

PAGE = Path(__file__).with_name("page.html")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Server knobs (`lov-jax serve` flags).

    frames_as_video: several images in one request are the frames of one video
    (lmms-eval sends a video as frames with no marker). num_frames: frames sampled from
    a video file. default_max_tokens: when a request names none (capped by the context).
    """

    model_name: str = "lov-jax"
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 << 20
    max_image_pixels: int = 40_000_000
    max_images: int = 64
    max_n: int = 8
    frames_as_video: bool = False
    num_frames: int = 32
    allow_local_files: bool = True
    default_max_tokens: int = 1024
    request_timeout_s: float = 600.0

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_images", "max_n", "num_frames",
                     "default_max_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"ServeConfig.request_timeout_s must be > 0: {self.request_timeout_s}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}  # fmt: skip


def _bad(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(400, message, param)


# ---- request fields ----------------------------------------------------------------------


def _field(body: dict, name: str, types, default, check=None, what: str = ""):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _bad(f"`{name}` must be {what or types}, got a boolean", name)
    if not isinstance(value, types):
        raise _bad(f"`{name}` must be {what}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise _bad(f"`{name}` = {value!r} is out of range: {what}", name)
    return value


@dataclasses.dataclass
class Params:
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    n: int
    stream: bool
    include_usage: bool


def parse_params(body: dict, config: ServeConfig) -> Params:
    num = (int, float)
    max_tokens = _field(body, "max_completion_tokens", int, None, lambda v: v >= 1, "an int >= 1")
    max_tokens = _field(body, "max_tokens", int, max_tokens, lambda v: v >= 1, "an int >= 1")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("`stop` must be a string or a list of strings", "stop")
    if len(stop) > 4 or any(not s for s in stop):
        raise _bad("`stop` takes at most 4 non-empty strings", "stop")
    options = _field(body, "stream_options", dict, {}, what="an object")
    return Params(
        max_tokens=max_tokens,
        temperature=float(
            _field(body, "temperature", num, 0.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
        ),  # fmt: skip
        top_p=float(_field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=_field(body, "top_k", int, 0, lambda v: v >= 0, "an int >= 0"),
        stop=stop,
        seed=_field(body, "seed", int, None, what="an int"),
        n=_field(
            body, "n", int, 1, lambda v: 1 <= v <= config.max_n, f"an int in [1, {config.max_n}]"
        ),
        stream=_field(body, "stream", bool, False, what="a boolean"),
        include_usage=bool(_field(options, "include_usage", bool, False, what="a boolean")),
    )


# ---- media -------------------------------------------------------------------------------


def _data_uri(url: str, where: str) -> bytes:
    head, sep, data = url.partition(",")
    if not sep or ";base64" not in head:
        raise _bad(f"{where}: a data URI must be `data:<mime>;base64,<data>`")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"{where}: the data URI is not valid base64 ({e})") from None


def _local_path(url: str, where: str, config: ServeConfig) -> Path:
    if url.startswith(("http://", "https://")):
        raise _bad(f"{where}: remote URLs are not fetched; send a data URI or a local path")
    if not config.allow_local_files:
        raise _bad(f"{where}: local paths are disabled on this server (--no-local-files)")
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise _bad(f"{where}: no such file: {path}")
    return path


def load_image(url: str, where: str, config: ServeConfig):
    """A data URI or local path -> RGB PIL image, refusing non-images and huge ones."""
    from PIL import Image

    from data_pipelines.image_processing import to_rgb

    if url.startswith("data:"):
        source = io.BytesIO(_data_uri(url, where))
    else:
        source = _local_path(url, where, config)
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > config.max_image_pixels:
                raise _bad(f"{where}: the image is {w}x{h}, over {config.max_image_pixels} pixels")
            im.load()
            return to_rgb(im)
    except HTTPError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(f"{where}: not a readable image ({type(e).__name__}: {e})") from None


def load_video(url: str, where: str, config: ServeConfig) -> np.ndarray:
    """A data URI or local path of a video file -> uint8[F, H, W, 3] (num_frames sampled)."""
    from data_pipelines.video import read_video

    try:
        if url.startswith("data:"):
            with tempfile.NamedTemporaryFile(suffix=".video") as f:
                f.write(_data_uri(url, where))
                f.flush()
                return read_video(f.name, config.num_frames)
        return read_video(_local_path(url, where, config), config.num_frames)
    except HTTPError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many kinds; all are bad input here
        raise _bad(f"{where}: not a readable video ({type(e).__name__}: {e})") from None


def _url(part: dict, key: str, where: str) -> str:
    value = part.get(key)
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}: `{key}` must be a URL string or an object with `url`")
    return value


def to_messages(body: dict, config: ServeConfig) -> list[dict]:
    """OpenAI messages -> Prompter messages (image / video parts holding decoded media)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("`messages` must be a non-empty list", "messages")
    out, images = [], []
    for m, msg in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object", "messages")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise _bad(f"{where}.role must be system / user / assistant, got {role!r}", "messages")
        role = "system" if role == "developer" else role
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of parts", "messages")
        parts = []
        for k, part in enumerate(content):
            pw = f"{where}.content[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{pw}.text must be a string", "messages")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "input_image", "image"):
                key = "image" if kind == "image" and "image" in part else kind
                parts.append({"type": "image", "image": load_image(_url(part, key, pw), pw,
                                                                   config)})  # fmt: skip
                images.append(parts[-1])
            elif kind in ("video_url", "video"):
                key = "video" if kind == "video" and "video" in part else "video_url"
                parts.append({"type": "video", "video": load_video(_url(part, key, pw), pw,
                                                                   config)})  # fmt: skip
            else:
                raise _bad(f"{pw}.type {kind!r} is not text / image_url / video_url", "messages")
        out.append({"role": role, "content": parts})
    if len(images) > config.max_images:
        raise _bad(f"{len(images)} images exceed the server's limit of {config.max_images}")
    if config.frames_as_video and len(images) > 1:
        _images_to_video(out, images)
    return out


def _images_to_video(messages: list[dict], images: list[dict]) -> None:
    """The images become one video part where the first image was (--frames-as-video)."""
    frames = [np.asarray(p["image"]) for p in images]
    if len({f.shape for f in frames}) > 1:
        raise _bad(f"--frames-as-video: the {len(frames)} frames differ in size")
    video = {"type": "video", "video": np.stack(frames)}
    first = id(images[0])
    dropped = {id(p) for p in images}
    for msg in messages:
        if isinstance(msg["content"], list):
            msg["content"] = [video if id(p) == first else p for p in msg["content"]
                              if id(p) not in dropped or id(p) == first]  # fmt: skip


# ---- the service -------------------------------------------------------------------------


class Service:
    """Request handling without the socket: validate, encode, enqueue, relay events."""

    def __init__(self, scheduler: Scheduler, prompter: Prompter, cfg, config: ServeConfig):
        self.scheduler, self.prompter, self.cfg, self.config = scheduler, prompter, cfg, config

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                            "created": 0, "owned_by": "lov-jax"}]}  # fmt: skip

    def jobs(self, body: Any) -> tuple[list[Job], Params, int]:
        """(jobs to enqueue, params, prompt tokens) for one chat completions body."""
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise HTTPError(404, f"model {model!r} not found: this server holds "
                            f"{self.config.model_name!r}", "model", "not_found_error")  # fmt: skip
        params = parse_params(body, self.config)
        messages = to_messages(body, self.config)
        try:
            prompt = self.prompter.encode(self.cfg, messages, self.config.num_frames)
        except (PromptError, ValueError, FileNotFoundError) as e:
            raise _bad(f"the prompt cannot be built: {e}", "messages") from None
        decoder = self.scheduler.decoder
        max_new = params.max_tokens
        if max_new is None:
            room = decoder.cache_len - decoder.gen.shapes_for([prompt], 1)[1] if (
                decoder.capacity_error(prompt, 1) is None) else 1  # fmt: skip
            room = min(room, decoder.gen.cfg.text.max_position_embeddings - len(prompt.tokens))
            max_new = max(1, min(self.config.default_max_tokens, room))
        if err := decoder.capacity_error(prompt, max_new):
            raise _bad(err, "messages")
        deadline = time.monotonic() + self.config.request_timeout_s
        events = queue.Queue()
        base = secrets.randbits(31) if params.seed is None else params.seed
        jobs = [
            Job(prompt, max_new, Knobs(params.temperature, params.top_k, params.top_p,
                                       base + i), params.stop, deadline, events, index=i)
            for i in range(params.n)
        ]  # fmt: skip
        return jobs, params, len(prompt.tokens)

    def submit(self, jobs: list[Job]) -> None:
        try:
            for job in jobs:
                self.scheduler.submit(job)
        except QueueFull as e:
            for job in jobs:
                job.cancel()
            raise HTTPError(503, f"the server is busy: {e}", kind="server_busy") from None


def _now() -> int:
    return int(time.time())


def _client_gone(sock: socket.socket) -> bool:
    """Whether the peer closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    service: Service  # set on the subclass `make_server` builds

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - the stdlib's name
        path = self.path.split("?")[0]
        if path in ("/health", "/v1/health"):
            return self._json(200, {"status": "ok", **self.service.scheduler.load})
        if path == "/v1/models":
            return self._json(200, self.service.models())
        if path == "/v1/models/" + self.service.config.model_name:
            return self._json(200, self.service.models()["data"][0])
        if path in ("/", "/index.html"):
            data = PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        self._json(404, HTTPError(404, f"no route GET {path}", kind="not_found_error").body())

    def do_POST(self):  # noqa: N802 - the stdlib's name
        try:
            if self.path.split("?")[0] != "/v1/chat/completions":
                raise HTTPError(404, f"no route POST {self.path}", kind="not_found_error")
            body = self._read_body()
            jobs, params, prompt_tokens = self.service.jobs(body)
            self.service.submit(jobs)
        except HTTPError as e:
            self.close_connection = True
            return self._json(e.status, e.body())
        if params.stream:
            self._stream(jobs, params, prompt_tokens)
        else:
            self._complete(jobs, prompt_tokens)

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "a Content-Length header is required")
        if int(length) > self.service.config.max_body_bytes:
            raise HTTPError(413, f"the body is {length} bytes, over the server's "
                            f"{self.service.config.max_body_bytes} (--max-body-mb)")  # fmt: skip
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"malformed JSON: {e}") from None

    def _events(self, jobs: list[Job], check_client: bool):
        """(job, kind, value) events until every job is done; cancels all if the client left."""
        events, open_ = jobs[0].events, len(jobs)
        while open_:
            try:
                job, kind, value = events.get(timeout=0.5)
            except queue.Empty:
                if check_client and _client_gone(self.connection):
                    raise ConnectionResetError("client went away") from None
                continue
            open_ -= kind in ("done", "error")
            yield job, kind, value

    def _complete(self, jobs: list[Job], prompt_tokens: int) -> None:
        texts, reasons = [""] * len(jobs), [None] * len(jobs)
        try:
            for job, kind, value in self._events(jobs, check_client=True):
                if kind == "text":
                    texts[job.index] += value
                elif kind == "done":
                    reasons[job.index] = value
                else:
                    status = 504 if "timed out" in value else 500
                    self.close_connection = True
                    return self._json(status, HTTPError(status, value).body())
        except ConnectionResetError:
            for job in jobs:
                job.cancel()
            self.close_connection = True
            return
        completion = sum(j.sampled for j in jobs)
        self._json(200, {
            "id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
            "created": _now(), "model": self.service.config.model_name,
            "choices": [{"index": j.index, "message": {"role": "assistant", "content": t},
                         "finish_reason": r, "logprobs": None}
                        for j, t, r in zip(jobs, texts, reasons, strict=True)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
        })  # fmt: skip

    def _stream(self, jobs: list[Job], params: Params, prompt_tokens: int) -> None:
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
                "created": _now(), "model": self.service.config.model_name}  # fmt: skip

        def chunk(choices, **extra):
            data = json.dumps({**head, "choices": choices, **extra})
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def choice(index, delta, reason=None):
            return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}

        self.close_connection = True  # the stream ends when the connection closes
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for job in jobs:
                chunk([choice(job.index, {"role": "assistant", "content": ""})])
            for job, kind, value in self._events(jobs, check_client=False):
                if kind == "text":
                    chunk([choice(job.index, {"content": value})])
                elif kind == "done":
                    chunk([choice(job.index, {}, value)])
                else:
                    chunk([], error={"message": value, "type": "server_error"})
            if params.include_usage:
                completion = sum(j.sampled for j in jobs)
                chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                 "total_tokens": prompt_tokens + completion})  # fmt: skip
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            for job in jobs:  # the client went away: free its slots
                job.cancel()


def make_server(service: Service) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server on `service.config.host:port` (port 0 = any)."""
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((service.config.host, service.config.port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(service: Service) -> tuple[ThreadingHTTPServer, str]:
    """Start serving on a background thread; returns (server, base URL with /v1)."""
    server = make_server(service)
    threading.Thread(target=server.serve_forever, name="lov-jax-http", daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}/v1"
