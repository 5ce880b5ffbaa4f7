"""``medshield serve``: a real uvicorn server on loopback, driven by the openai client and httpx.

The backend is a fake :class:`ChatVLM` that records what it receives (so the tests see the
defense's demonstrations and the decoded images), or the ``openai`` backend in front of a second
loopback server that fails.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from medshield.commands.cli import app as cli_app
from medshield.commands.serve import (
    ServeConfig,
    ServeLimits,
    build_app,
    create_app,
    estimate_tokens,
    load_serve_config,
    serving,
    untrained,
)
from medshield.defense import create_defense
from medshield.errors import ConfigError, InputError
from medshield.models.chat import ChatVLM, Conversation

REPO = Path(__file__).resolve().parents[1]
SECRET = "patient Zebediah Quillfeather, MRN 5550123"


class EchoVLM(ChatVLM):
    """Replies with what it received; records every batch, can be slow, fail or block."""

    backend = "echo"

    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay = delay
        self.error = error
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        with self.lock:
            self.calls.append(
                {
                    "conversations": list(conversations),
                    "max_new_tokens": max_new_tokens,
                    "temperature": temperature,
                }
            )
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.started.set()
        try:
            if self.gate is not None:
                self.gate.wait(10)
            time.sleep(self.delay)
            if self.error is not None:
                raise self.error
            return [
                f"{len(c)} messages, {sum(len(m.images) for m in c)} images" for c in conversations
            ]
        finally:
            with self.lock:
                self.active -= 1

    def score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> torch.Tensor:
        raise NotImplementedError

    @property
    def conversations(self) -> list[Conversation]:
        return [c for call in self.calls for c in call["conversations"]]


@contextmanager
def proxy(
    model: ChatVLM, defense: str = "none", log_content: bool = False, **limits: Any
) -> Iterator[str]:
    kwargs = {"strategy": "mixed", "k": 2, "modalities": ["chest_xray"], "image_size": 32}
    defense_obj = create_defense(defense, **(kwargs if defense == "demonstrations" else {}))
    app = create_app(model, defense_obj, "echo-model", ServeLimits(**limits), log_content)
    with serving(app) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def data_url(pixels: np.ndarray, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def user(text: str, *images: str) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_good_request_through_the_openai_client() -> None:
    vlm = EchoVLM()
    with proxy(vlm) as url:
        reply = client(url).chat.completions.create(
            model="echo-model",
            messages=[
                {"role": "system", "content": "You are a careful radiologist."},
                {"role": "user", "content": "Is this chest X-ray normal?"},
            ],
            max_tokens=17,
            temperature=0.5,
        )
    assert reply.object == "chat.completion" and reply.model == "echo-model"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "2 messages, 0 images"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == estimate_tokens(
        "You are a careful radiologist. Is this chest X-ray normal?"
    )
    assert reply.usage.completion_tokens == estimate_tokens("2 messages, 0 images")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    [call] = vlm.calls
    assert call["max_new_tokens"] == 17 and call["temperature"] == 0.5
    [conversation] = call["conversations"]
    assert [(m.role, m.text) for m in conversation] == [
        ("system", "You are a careful radiologist."),
        ("user", "Is this chest X-ray normal?"),
    ]


def test_defaults_and_developer_role() -> None:
    vlm = EchoVLM()
    with proxy(vlm, default_max_tokens=33) as url:
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "developer", "content": "Be brief."}, user("Hi")]},
        )
    assert response.status_code == 200, response.text
    [call] = vlm.calls
    assert call["max_new_tokens"] == 33 and call["temperature"] == 0.0
    assert [m.role for m in call["conversations"][0]] == ["system", "user"]


def test_defense_is_applied_server_side() -> None:
    vlm = EchoVLM()
    with proxy(vlm, defense="demonstrations") as url:
        reply = client(url).chat.completions.create(
            model="echo-model", messages=[{"role": "user", "content": "What does this show?"}]
        )
    # k=2 demonstrations (user turn with a synthetic image + assistant answer each) + the query
    assert reply.choices[0].message.content == "5 messages, 2 images"
    [conversation] = vlm.conversations
    assert [m.role for m in conversation] == ["user", "assistant", "user", "assistant", "user"]
    assert conversation[-1].text == "What does this show?" and not conversation[-1].images
    assert all(m.images[0].shape[-2:] == (32, 32) for m in conversation[:-1:2])
    assert reply.usage.prompt_tokens == sum(estimate_tokens(m.text) for m in conversation)

    vlm = EchoVLM()
    with proxy(vlm, defense="self-reminder") as url:
        client(url).chat.completions.create(
            model="echo-model", messages=[{"role": "user", "content": "What does this show?"}]
        )
    [conversation] = vlm.conversations
    assert conversation[0].role == "system" and "responsible" in conversation[0].text
    assert conversation[1].text.startswith("What does this show?\n\nRemember")


def test_images_are_decoded() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    smooth = np.full((16, 16, 3), 128, dtype=np.uint8)
    vlm = EchoVLM()
    with proxy(vlm) as url:
        reply = client(url).chat.completions.create(
            model="echo-model",
            messages=[
                user("Compare these.", data_url(rgb), data_url(grey), data_url(smooth, "JPEG"))
            ],
        )
    assert reply.choices[0].message.content == "1 messages, 3 images"
    [[message]] = vlm.conversations
    assert message.text == "Compare these."
    first, second, third = message.images
    assert first.shape == (3, 12, 20) and first.dtype == torch.float32
    assert torch.equal(first, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert second.shape == (3, 8, 8)
    assert torch.equal(second, (torch.from_numpy(grey).float() / 255).expand(3, -1, -1))
    assert third.shape == (3, 16, 16) and (third - 128 / 255).abs().max() < 3 / 255


def post(url: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


PNG = data_url(np.zeros((4, 4, 3), dtype=np.uint8))
GOOD = [{"role": "user", "content": "hello"}]
BAD_REQUESTS = {
    "not json": (b"{not json", 400, "invalid_json"),
    "no messages": ({"model": "echo-model"}, 422, "invalid_request"),
    "empty messages": ({"messages": []}, 422, "invalid_request"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 422, "invalid_request"),
    "content not text": ({"messages": [{"role": "user", "content": 3}]}, 422, "invalid_request"),
    "unknown part": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
        422,
        "invalid_request",
    ),
    "negative max_tokens": ({"messages": GOOD, "max_tokens": 0}, 422, "invalid_request"),
    "remote image": (
        {"messages": [user("x", "https://example.org/cxr.png")]},
        400,
        "unsupported_image_url",
    ),
    "non-image data url": (
        {"messages": [user("x", "data:text/plain;base64,aGk=")]},
        400,
        "invalid_image_url",
    ),
    "bad base64": (
        {"messages": [user("x", "data:image/png;base64,@@@@")]},
        400,
        "invalid_image",
    ),
    "not an image": (
        {"messages": [user("x", "data:image/png;base64," + base64.b64encode(b"x" * 64).decode())]},
        400,
        "invalid_image",
    ),
    "too many images": ({"messages": [user("x", PNG, PNG, PNG)]}, 413, "too_many_images"),
    "image too large": (
        {"messages": [user("x", data_url(np.zeros((40, 40, 3), dtype=np.uint8)))]},
        413,
        "image_too_large",
    ),
    "too many messages": ({"messages": GOOD * 9}, 413, "too_many_messages"),
    "body too large": ({"messages": [user("x" * 9000)]}, 413, "request_too_large"),
    "stream": ({"messages": GOOD, "stream": True}, 400, "stream"),
    "n > 1": ({"messages": GOOD, "n": 2}, 400, "unsupported_n"),
    "max_tokens over limit": ({"messages": GOOD, "max_tokens": 65}, 400, "max_tokens_too_large"),
    "ends with assistant": (
        {"messages": [*GOOD, {"role": "assistant", "content": "hi"}]},
        400,
        "invalid_conversation",
    ),
    "unknown model": ({"model": "gpt-9", "messages": GOOD}, 404, "model_not_found"),
}


def test_bad_requests_get_openai_style_errors() -> None:
    vlm = EchoVLM()
    limits = {
        "max_images": 2,
        "max_image_pixels": 1000,
        "max_messages": 8,
        "max_body_bytes": 8192,
        "max_tokens": 64,
        "default_max_tokens": 16,
    }
    with proxy(vlm, **limits) as url:
        for name, (body, status, code) in BAD_REQUESTS.items():
            response = post(url, body)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["code"] == code, (name, error)
            assert error["message"] and error["type"] == "invalid_request_error", name
        # a chunked body (no Content-Length) is cut off while it is read
        chunks = (b"x" * 4096 for _ in range(4))
        response = httpx.post(f"{url}/v1/chat/completions", content=chunks)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
        response = httpx.get(f"{url}/v1/nothing-here")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert httpx.get(f"{url}/v1/chat/completions").status_code == 405
        # the openai client maps the same errors to its exceptions
        with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched"):
            client(url).chat.completions.create(
                model="echo-model", messages=[user("x", "http://example.org/a.png")]
            )
        with pytest.raises(openai.NotFoundError):
            client(url).chat.completions.create(model="gpt-9", messages=GOOD)
        assert post(url, {"messages": GOOD}).status_code == 200  # still serving
    assert len(vlm.calls) == 1


class FailingUpstream(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        payload = b'{"error": {"message": "the GPU caught fire"}}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def failing_upstream() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FailingUpstream)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_upstream_failure_is_502(failing_upstream: str, caplog: pytest.LogCaptureFixture) -> None:
    config = ServeConfig.model_validate(
        {
            "model": {
                "backend": "openai",
                "kwargs": {"base_url": failing_upstream, "model": "llava-7b", "max_retries": 0},
            },
            "defense": {"name": "self-reminder"},
        }
    )
    assert config.served_name() == "llava-7b"  # clients keep the upstream's model name
    caplog.set_level(logging.INFO, logger="medshield.serve")
    with serving(build_app(config)) as url:
        with pytest.raises(openai.InternalServerError) as info:
            client(url).chat.completions.create(model="llava-7b", messages=[user(SECRET)])
        response = post(url, {"messages": [user(SECRET)]})
        health = httpx.get(f"{url}/health").json()
        ready = httpx.get(f"{url}/ready")
    assert info.value.status_code == 502
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error"
    assert "GPU caught fire" not in error["message"] and "127.0.0.1" not in error["message"]
    assert "upstream_error (EndpointError: HTTP 500)" in caplog.text
    assert "GPU caught fire" not in caplog.text and SECRET not in caplog.text
    assert health["backend"] == "openai" and health["defense"] == "self-reminder"
    # GET /models on this upstream answers 501 (http.server's "unsupported method")
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    assert ready.json()["reason"] == "the upstream endpoint answered HTTP 501"


class ModelsUpstream(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        payload = b'{"object": "list", "data": [{"id": "llava-7b", "object": "model"}]}'
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def openai_config(base_url: str) -> ServeConfig:
    kwargs = {"base_url": base_url, "model": "llava-7b", "max_retries": 0, "timeout": 5}
    return ServeConfig.model_validate({"model": {"backend": "openai", "kwargs": kwargs}})


def test_ready_reflects_the_upstream_while_health_stays_ok() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ModelsUpstream)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with serving(
            build_app(openai_config(f"http://127.0.0.1:{httpd.server_address[1]}/v1"))
        ) as url:
            up = httpx.get(f"{url}/ready")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert up.status_code == 200 and up.json() == {"status": "ready", "model": "llava-7b"}

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with serving(build_app(openai_config(f"http://127.0.0.1:{port}/v1"))) as url:
        down = httpx.get(f"{url}/ready")
        health = httpx.get(f"{url}/health")
    assert down.status_code == 503
    assert down.json() == {
        "status": "unavailable",
        "reason": "the upstream endpoint cannot be reached (connection failed)",
        "model": "llava-7b",
    }
    assert str(port) not in down.text  # the upstream's address stays private
    assert health.status_code == 200 and health.json()["status"] == "ok"  # liveness only


def test_an_unexpected_failure_is_an_openai_style_500(monkeypatch: pytest.MonkeyPatch) -> None:
    import medshield.commands.serve as serve

    def broken(raw: bytes) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(serve, "_parse", broken)
    app = create_app(EchoVLM(), create_defense("none"), "echo-model")
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.post("/v1/chat/completions", json={"messages": GOOD})
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "the server failed (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }


def test_backend_failures_map_to_statuses() -> None:
    with proxy(EchoVLM(error=RuntimeError("out of memory"))) as url:
        response = post(url, {"messages": GOOD})
    assert response.status_code == 500 and response.json()["error"]["code"] == "model_error"
    with proxy(EchoVLM(error=InputError("image too small"))) as url:
        response = post(url, {"messages": GOOD})
    assert response.status_code == 400 and "image too small" in response.json()["error"]["message"]


def test_slow_backend_times_out_with_504() -> None:
    vlm = EchoVLM(delay=1.5)
    with proxy(vlm, timeout_s=0.3, max_concurrency=1) as url:
        start = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            client(url).chat.completions.create(model="echo-model", messages=GOOD)
        assert time.perf_counter() - start < 1.2
        assert info.value.status_code == 504
        assert info.value.body["code"] == "timeout"
        # a request queued behind the slow one also times out and is dropped, never generated
        assert post(url, {"messages": GOOD}).status_code == 504
        vlm.delay = 0.0
        time.sleep(1.5)  # the first call ends; its worker slot frees
        assert post(url, {"messages": GOOD}).status_code == 200
    assert len(vlm.calls) == 2


def test_full_queue_is_503() -> None:
    vlm = EchoVLM()
    vlm.gate = threading.Event()
    with proxy(vlm, max_queue=1, max_concurrency=1) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, {"messages": GOOD})
        assert vlm.started.wait(10)
        second = pool.submit(post, url, {"messages": GOOD})
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = post(url, {"messages": GOOD})
        vlm.gate.set()
        assert third.status_code == 503 and third.json()["error"]["code"] == "overloaded"
        assert first.result().status_code == 200 and second.result().status_code == 200


def test_concurrent_requests_are_batched_and_bounded() -> None:
    vlm = EchoVLM(delay=0.3)
    with proxy(vlm, max_concurrency=2, max_batch_size=4) as url, ThreadPoolExecutor(10) as pool:
        bodies = [{"messages": [user(f"q{i}")], "max_tokens": 8 + i % 2} for i in range(10)]
        responses = list(pool.map(lambda b: post(url, b), bodies))
    assert [r.status_code for r in responses] == [200] * 10
    assert len(vlm.conversations) == 10
    assert vlm.max_active <= 2
    assert len(vlm.calls) < 10 and max(len(c["conversations"]) for c in vlm.calls) <= 4
    for call in vlm.calls:  # a batch shares its decoding settings
        texts = [int(c[0].text[1:]) for c in call["conversations"]]
        assert {8 + i % 2 for i in texts} == {call["max_new_tokens"]}


def test_health_and_models() -> None:
    with proxy(EchoVLM(), defense="self-reminder") as url:
        health = httpx.get(f"{url}/health")
        ready = httpx.get(f"{url}/ready")
        models = client(url).models.list()
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": "echo-model"}
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "model": "echo-model",
        "backend": "echo",
        "defense": "self-reminder",
        "queued": 0,
        "running": 0,
    }
    assert [m.id for m in models.data] == ["echo-model"]
    assert models.data[0].owned_by == "medshield"


def test_no_request_content_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    image = data_url(np.zeros((4, 4, 3), dtype=np.uint8))
    with proxy(EchoVLM()) as url:
        ok = post(url, {"messages": [user(SECRET, image)]})
        bad = post(url, {"messages": [user(SECRET), {"role": "assistant", "content": SECRET}]})
    assert ok.status_code == 200 and bad.status_code == 400
    assert f"{ok.json()['id']} 200" in caplog.text and "messages=1 images=1" in caplog.text
    assert "400" in caplog.text and "invalid_conversation" in caplog.text
    assert SECRET not in caplog.text and image.split(",")[1][:20] not in caplog.text
    assert "1 messages, 1 images" not in caplog.text  # nor the reply

    caplog.clear()
    with proxy(EchoVLM(), log_content=True) as url:
        assert post(url, {"messages": [user(SECRET)]}).status_code == 200
    assert SECRET in caplog.text and "1 messages, 0 images" in caplog.text


def load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks/serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_generator_at_small_scale(tmp_path: Path) -> None:
    bench = load_benchmark()
    with proxy(EchoVLM(delay=0.01), defense="demonstrations", max_batch_size=4) as url:
        report = bench.main(
            ["--url", url, "--requests", "20", "--concurrency", "4", "--out", str(tmp_path / "r")]
        )
    results = report["results"]
    assert results["errors"] == 0 and results["requests"] == 20
    assert 0 < results["latency_ms"]["p50"] <= results["latency_ms"]["p99"]
    assert results["throughput_rps"] > 0
    assert json.loads((tmp_path / "r").read_text())["results"] == results


def test_serve_config() -> None:
    config = load_serve_config(REPO / "configs/serve.yaml")
    assert config.model.backend == "mini-llava" and config.defense.name == "demonstrations"
    assert config.served_name() == "mini-llava"
    assert config.host == "127.0.0.1" and not config.log_content
    with pytest.raises(ConfigError, match="max_images"):
        load_serve_config(None, ["limits.max_images=-1"])
    with pytest.raises(ConfigError, match="Extra inputs"):
        load_serve_config(None, ["limits.max_imgs=3"])
    with pytest.raises(ConfigError, match="default_max_tokens"):
        load_serve_config(None, ["limits.default_max_tokens=99", "limits.max_tokens=10"])


def test_cli_serve_rejects_a_bad_config(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", "--help"])
    assert result.exit_code == 0 and "--defense" in result.output
    result = runner.invoke(cli_app, ["serve", "--defense", "no-such-defense"])
    assert result.exit_code == 2 and "no-such-defense" in result.output
    (tmp_path / "bad.yaml").write_text("limits: {timeout_s: 0}\n")
    result = runner.invoke(cli_app, ["serve", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "timeout_s" in result.output


def test_an_api_key_guards_the_v1_endpoints_but_not_health(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("CLINIC_PROXY_KEY", "s3cret-key")
    config = load_serve_config(None, ["api_key_env=CLINIC_PROXY_KEY"])
    assert config.api_key() == "s3cret-key"
    app = create_app(EchoVLM(), create_defense("none"), "echo-model", api_key=config.api_key())
    body = {"messages": [user("hello")]}
    with serving(app) as url:
        anonymous = post(url, body)
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.chat.completions.create(model="echo-model", messages=body["messages"])
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        reply = right.chat.completions.create(model="echo-model", messages=body["messages"])
        listed = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret-key"})
        health = httpx.get(f"{url}/health")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert refused.value.status_code == 401
    assert reply.choices[0].message.content == "1 messages, 0 images"
    assert listed.status_code == 200 and health.status_code == 200
    assert "s3cret-key" not in caplog.text and "guess" not in caplog.text

    monkeypatch.delenv("CLINIC_PROXY_KEY")
    assert load_serve_config(None, ["api_key_env=CLINIC_PROXY_KEY"]).api_key() is None


def test_serving_beyond_loopback_without_a_key_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import medshield.commands.serve as serve

    monkeypatch.setattr(serve, "build_app", lambda config, allow_untrained: None)
    monkeypatch.setattr(serve.uvicorn, "run", lambda *args, **kwargs: None)
    monkeypatch.delenv("MEDSHIELD_SERVE_API_KEY", raising=False)
    lines: list[str] = []
    serve.run_server(load_serve_config(None, ["host=0.0.0.0"]), log=lines.append)
    assert any("without an API key" in line for line in lines)
    lines.clear()
    serve.run_server(load_serve_config(None, []), log=lines.append)  # loopback: no warning
    assert not any("API key" in line for line in lines)
    monkeypatch.setenv("MEDSHIELD_SERVE_API_KEY", "k")
    serve.run_server(load_serve_config(None, ["host=0.0.0.0"]), log=lines.append)
    assert any("clients must send the API key in $MEDSHIELD_SERVE_API_KEY" in x for x in lines)


def test_an_untrained_mini_llava_is_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    import medshield.commands.serve as serve

    documented = load_serve_config(REPO / "configs/serve.yaml")
    assert untrained(documented)
    assert not untrained(load_serve_config(None, ["model.kwargs.checkpoint=runs/vlm/model"]))
    assert not untrained(load_serve_config(None, ["model.backend=openai"]))
    with pytest.raises(ConfigError, match="no checkpoint.*--allow-untrained"):
        build_app(documented)  # refused before any weights load

    built: list[dict[str, Any]] = []

    def fake_model(name: str, **kwargs: Any) -> EchoVLM:
        built.append({"name": name, **kwargs})
        return EchoVLM()

    monkeypatch.setattr(serve, "create_chat_model", fake_model)
    monkeypatch.setattr(serve.uvicorn, "run", lambda *args, **kwargs: None)
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["serve", "--config", str(REPO / "configs/serve.yaml")])
    assert refused.exit_code == 2 and not built
    assert "error: the mini-llava backend has no checkpoint" in refused.output
    assert "--allow-untrained" in refused.output and "model.kwargs.checkpoint" in refused.output
    allowed = runner.invoke(
        cli_app, ["serve", "--config", str(REPO / "configs/serve.yaml"), "--allow-untrained"]
    )
    assert allowed.exit_code == 0, allowed.output
    assert "WARNING: the mini-llava backend has no checkpoint" in allowed.output
    trained = runner.invoke(cli_app, ["serve", "--set", "model.kwargs.checkpoint=runs/m/model"])
    assert trained.exit_code == 0 and "WARNING" not in trained.output
    assert built == [{"name": "mini-llava"}, {"name": "mini-llava", "checkpoint": "runs/m/model"}]
