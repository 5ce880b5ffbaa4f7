"""The ``openai`` chat backend against a real HTTP server on loopback started by the test."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from medshield.errors import InputError
from medshield.models import Message, create_chat_model
from medshield.models.openai_chat import EndpointError, OpenAIChatVLM, image_to_data_url


def ok(text: str) -> tuple[int, bytes, dict[str, str]]:
    body = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": text}, "finish_reason": "stop"}]}  # fmt: skip
    return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}


class Recorder:
    """What the fake server saw, and what it answers next."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.delay = 0.0
        self.script: list[Any] = []  # answers for the next requests, then echo

    def answer(self, body: dict[str, Any]) -> Any:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        last = body["messages"][-1]["content"]
        text = last if isinstance(last, str) else last[-1]["text"]
        return ok(f"echo: {text}")


class Handler(BaseHTTPRequestHandler):
    recorder: Recorder

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        rec = self.server.recorder  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        with rec.lock:
            rec.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            rec.active += 1
            rec.max_active = max(rec.max_active, rec.active)
        try:
            time.sleep(rec.delay)
            answer = rec.answer(body)
            if isinstance(answer, float):  # hang for this long: a time-out
                time.sleep(answer)
                answer = ok("too late")
        finally:
            # no longer active before the reply leaves: once the client has the reply it may
            # send its next request, and this thread may not have run again by then
            with rec.lock:
                rec.active -= 1
        status, payload, headers = answer
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def server() -> Iterator[tuple[str, Recorder]]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    httpd.recorder = Recorder()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", httpd.recorder  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


def make(base_url: str, **kwargs: Any) -> OpenAIChatVLM:
    kwargs.setdefault("backoff", 0.01)
    return create_chat_model("openai", base_url=base_url, model="llava-med", **kwargs)


def test_request_body_and_reply(server: tuple[str, Recorder]) -> None:
    url, rec = server
    vlm = make(url, api_key="sk-test")
    image = torch.rand(3, 20, 30)
    conversation = [
        Message("system", "You are a careful radiologist."),
        Message("user", "Which modality is this?", [image, torch.rand(1, 8, 8)]),
    ]
    assert vlm.generate([conversation], max_new_tokens=17, temperature=0.5) == [
        "echo: Which modality is this?"
    ]
    [request] = rec.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "llava-med"
    assert body["max_tokens"] == 17 and body["temperature"] == 0.5
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are a careful radiologist."}
    assert user["role"] == "user"
    first, second, text = user["content"]
    assert text == {"type": "text", "text": "Which modality is this?"}
    sizes = []
    for part in (first, second):
        assert part["type"] == "image_url"
        header, data = part["image_url"]["url"].split(",", 1)
        assert header == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            sizes.append(im.size)
    assert sizes == [(30, 20), (8, 8)]
    # the PNG holds the image's pixels (8-bit)
    with Image.open(io.BytesIO(base64.b64decode(first["image_url"]["url"].split(",")[1]))) as im:
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
    assert torch.allclose(pixels / 255, image, atol=0.5 / 255 + 1e-6)


def test_api_key_from_env_and_none(server: tuple[str, Recorder], monkeypatch) -> None:
    url, rec = server
    monkeypatch.setenv("MY_VLM_KEY", "from-env")
    make(url, api_key_env="MY_VLM_KEY").generate([[Message("user", "hi")]])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    make(url).generate([[Message("user", "hi")]])
    assert rec.requests[0]["headers"]["Authorization"] == "Bearer from-env"
    assert "Authorization" not in rec.requests[1]["headers"]
    assert "from-env" not in repr(make(url, api_key_env="MY_VLM_KEY"))


def test_retries_after_5xx_and_429(server: tuple[str, Recorder]) -> None:
    url, rec = server
    error = (500, b'{"error": "overloaded"}', {"Content-Type": "application/json"})
    busy = (429, b"slow down", {"Retry-After": "0"})
    rec.script = [error, busy, ok("finally")]
    assert make(url, max_retries=3).generate([[Message("user", "q")]]) == ["finally"]
    assert len(rec.requests) == 3


def test_gives_up_after_retries_and_on_4xx(server: tuple[str, Recorder]) -> None:
    url, rec = server
    rec.script = [(503, b"down", {})] * 3
    with pytest.raises(EndpointError, match=r"/v1/chat/completions failed after 3 attempts.*503"):
        make(url, max_retries=2).generate([[Message("user", "q")]])
    assert len(rec.requests) == 3
    rec.script = [(400, b'{"error": "bad model"}', {})]
    with pytest.raises(EndpointError, match="HTTP 400.*bad model"):
        make(url, max_retries=5).generate([[Message("user", "q")]])
    assert len(rec.requests) == 4  # a 400 is not retried


def test_timeout_is_a_clear_error(server: tuple[str, Recorder]) -> None:
    url, rec = server
    rec.script = [2.0]
    start = time.monotonic()
    with pytest.raises(EndpointError, match=r"conversation 0: http://127.*timed out after 0.2 s"):
        make(url, timeout=0.2, max_retries=0).generate([[Message("user", "q")]])
    assert time.monotonic() - start < 1.5


def test_malformed_json_and_missing_choices(server: tuple[str, Recorder]) -> None:
    url, rec = server
    rec.script = [(200, b"<html>not json", {})]
    with pytest.raises(EndpointError, match=r"127\.0\.0\.1.*malformed JSON.*not json"):
        make(url).generate([[Message("user", "q")]])
    rec.script = [(200, b'{"object": "chat.completion"}', {})]
    with pytest.raises(EndpointError, match=r"127\.0\.0\.1.*no 'choices'"):
        make(url).generate([[Message("user", "q")]])
    rec.script = [(200, b'{"choices": [{"message": {"content": null}}]}', {})]
    assert make(url).generate([[Message("user", "q")]]) == [""]


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EndpointError, match="failed after 2 attempts: connection failed"):
        make(f"http://127.0.0.1:{port}/v1", max_retries=1).generate([[Message("user", "q")]])


def test_concurrency_limit_and_order(server: tuple[str, Recorder]) -> None:
    url, rec = server
    rec.delay = 0.15
    batch = [[Message("user", f"question {i}")] for i in range(6)]
    replies = make(url, concurrency=2).generate(batch, max_new_tokens=4)
    assert replies == [f"echo: question {i}" for i in range(6)]
    assert rec.max_active == 2  # parallel, never above the limit
    rec.max_active = 0
    make(url, concurrency=1).generate(batch[:3])
    assert rec.max_active == 1


def test_bad_input_fails_before_any_request(server: tuple[str, Recorder], tmp_path) -> None:
    url, rec = server
    vlm = make(url)
    not_image = tmp_path / "scan.png"
    not_image.write_text("not an image")
    good = [Message("user", "fine")]
    with pytest.raises(InputError, match="conversation 1: .*not a readable image"):
        vlm.generate([good, [Message("user", "look", [str(not_image)])]])
    with pytest.raises(InputError, match="conversation 0: .*end with a user turn"):
        vlm.generate([[Message("user", "q"), Message("assistant", "a")]])
    with pytest.raises(InputError, match="max_new_tokens"):
        vlm.generate([good], max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        vlm.generate([good], temperature=-1.0)
    with pytest.raises(InputError, match="base_url"):
        make("localhost:8000")
    assert rec.requests == []
    assert vlm.generate([]) == []


def test_score_is_not_available(server: tuple[str, Recorder]) -> None:
    url, _ = server
    with pytest.raises(NotImplementedError, match="local backend"):
        make(url).score([[Message("user", "q")]], ["Sure"])


def test_data_url_of_file_and_grey_tensor(tmp_path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (5, 7), color=128).save(path)
    for image in (path, torch.full((1, 7, 5), 128 / 255)):
        data = base64.b64decode(image_to_data_url(image).split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (5, 7) and im.getpixel((0, 0)) == (128, 128, 128)
