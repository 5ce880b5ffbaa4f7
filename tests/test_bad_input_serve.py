"""Bad-input corpus of the serve family: every malformed request to ``POST /v1/chat/completions``
gets its status and an OpenAI-style error body that names the problem, never a traceback.

The app is the real proxy (:func:`medshield.commands.serve.create_app`) over a fake backend,
driven in process by FastAPI's ``TestClient`` with server exceptions turned into responses, so an
unhandled failure shows as the plain-text 500 a client would get.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from medshield.commands.serve import ServeLimits, create_app
from medshield.defense import create_defense
from medshield.models.chat import ChatVLM, Conversation


class CountingVLM(ChatVLM):
    """Answers every conversation; counts what reached it (bad requests never should)."""

    backend = "counting"

    def __init__(self) -> None:
        self.answered = 0

    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        self.answered += len(conversations)
        return ["ok"] * len(conversations)

    def score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> torch.Tensor:
        raise NotImplementedError


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _bomb_png(side: int = 100_000) -> str:
    """A 69-byte PNG whose header declares side x side pixels (10 billion by default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def _with_image(url: str, text: str = "Is this normal?") -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}]}


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


HI = [{"role": "user", "content": "hi"}]
OPEN = b'{"messages": [{"role": "user", "content": "hi"}]'
PIXEL = _png(np.zeros((4, 4, 3), dtype=np.uint8))
LIMITS = {
    "max_body_bytes": 512 * 1024,
    "max_images": 2,
    "max_image_pixels": 64 * 64,
    "max_messages": 8,
    "max_tokens": 256,
    "default_max_tokens": 16,
}

# name: (raw body, status, error code, words the message must contain)
CASES: dict[str, tuple[bytes, int, str, str]] = {
    "empty body": (b"", 400, "invalid_json", "not valid JSON"),
    "not json": (b"{messages: hi}", 400, "invalid_json", "not valid JSON"),
    "truncated json": (OPEN, 400, "invalid_json", "not valid JSON"),
    "invalid utf-8": (
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        "invalid_json",
        "not valid JSON",
    ),
    "5000-digit max_tokens": (
        OPEN + b', "max_tokens": ' + b"9" * 5000 + b"}",
        400,
        "invalid_json",
        "too many digits",
    ),
    "200k-deep nesting": (
        OPEN + b', "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        400,
        "invalid_json",
        "nests JSON arrays or objects too deeply",
    ),
    "NaN temperature": (OPEN + b', "temperature": NaN}', 400, "invalid_json", "NaN"),
    "-Infinity max_tokens": (
        OPEN + b', "max_tokens": -Infinity}',
        400,
        "invalid_json",
        "-Infinity",
    ),
    "lone surrogate escape": (
        b'{"messages": [{"role": "user", "content": "x \\ud800 y"}]}',
        400,
        "invalid_unicode",
        "lone surrogate",
    ),
    "lone surrogate bytes": (
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        400,
        "invalid_unicode",
        "not valid Unicode",
    ),
    "surrogate in model name": (
        _json({"model": "\ud83d", "messages": HI}),
        400,
        "invalid_unicode",
        "lone surrogate",
    ),
    "body is a list": (b"[1, 2]", 422, "invalid_request", "valid dictionary"),
    "body is null": (b"null", 422, "invalid_request", "valid dictionary"),
    "no messages": (
        _json({"model": "echo-model"}),
        422,
        "invalid_request",
        "messages: Field required",
    ),
    "empty messages": (_json({"messages": []}), 422, "invalid_request", "at least 1 item"),
    "messages a string": (_json({"messages": "hi"}), 422, "invalid_request", "valid list"),
    "unknown role": (
        _json({"messages": [{"role": "tool", "content": "x"}]}),
        422,
        "invalid_request",
        "messages.0.role",
    ),
    "content a number": (
        _json({"messages": [{"role": "user", "content": 3}]}),
        422,
        "invalid_request",
        "messages.0.content",
    ),
    "unknown content part": (
        _json({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
        422,
        "invalid_request",
        "does not match any of the expected tags",
    ),
    "max_tokens a word": (
        _json({"messages": HI, "max_tokens": "ten"}),
        422,
        "invalid_request",
        "max_tokens: Input should be a valid integer",
    ),
    "max_tokens zero": (
        _json({"messages": HI, "max_tokens": 0}),
        422,
        "invalid_request",
        "max_tokens: Input should be greater than or equal to 1",
    ),
    "5000-digit max_tokens string": (
        _json({"messages": HI, "max_tokens": "9" * 5000}),
        422,
        "invalid_request",
        "exceeded maximum size",
    ),
    "temperature 1e999": (
        OPEN + b', "temperature": 1e999}',
        422,
        "invalid_request",
        "temperature: Input should be less than or equal to 2",
    ),
    "max_tokens over the limit": (
        _json({"messages": HI, "max_tokens": 10**100}),
        400,
        "max_tokens_too_large",
        "limit of 256",
    ),
    "stream": (
        _json({"messages": HI, "stream": True}),
        400,
        "stream",
        "streaming is not supported",
    ),
    "n = 3": (_json({"messages": HI, "n": 3}), 400, "unsupported_n", "only n = 1"),
    "ends with the assistant": (
        _json({"messages": [*HI, {"role": "assistant", "content": "x"}]}),
        400,
        "invalid_conversation",
        "must end with a user turn",
    ),
    "unknown model": (
        _json({"model": "gpt-9", "messages": HI}),
        404,
        "model_not_found",
        "'gpt-9' is not served here",
    ),
    "remote image url": (
        _json(_with_image("https://example.org/cxr.png")),
        400,
        "unsupported_image_url",
        "remote image URLs are not fetched",
    ),
    "non-image data url": (
        _json(_with_image("data:text/plain;base64,aGk=")),
        400,
        "invalid_image_url",
        "data:image/<format>;base64",
    ),
    "bad base64": (
        _json(_with_image("data:image/png;base64,@@not-base64@@")),
        400,
        "invalid_image",
        "not valid base64",
    ),
    "base64 of text": (
        _json(_with_image("data:image/png;base64," + base64.b64encode(b"x" * 90).decode())),
        400,
        "invalid_image",
        "could not be decoded",
    ),
    "decompression bomb png": (
        _json(_with_image(_bomb_png())),
        413,
        "image_too_large",
        "decompression bomb",
    ),
    "image over max_image_pixels": (
        _json(_with_image(_png(np.zeros((80, 80, 3), np.uint8)))),
        413,
        "image_too_large",
        "80x80 pixels exceeds the limit",
    ),
    "too many images": (
        _json({"messages": [_with_image(PIXEL)["messages"][0]] * 3}),
        413,
        "too_many_images",
        "3 images exceed the limit of 2",
    ),
    "too many messages": (
        _json({"messages": HI * 9}),
        413,
        "too_many_messages",
        "9 messages exceed the limit of 8",
    ),
    "body too large": (
        _json({"messages": [{"role": "user", "content": "x" * 600_000}]}),
        413,
        "request_too_large",
        "exceeds the limit of 524288 bytes",
    ),
}


@pytest.fixture(scope="module")
def http() -> Iterator[tuple[TestClient, CountingVLM]]:
    vlm = CountingVLM()
    app = create_app(vlm, create_defense("none"), "echo-model", ServeLimits(**LIMITS))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, vlm


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_an_openai_style_error(
    name: str, http: tuple[TestClient, CountingVLM]
) -> None:
    client, vlm = http
    body, status, code, words = CASES[name]
    before = vlm.answered
    response = client.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, (name, response.text[:300])
    assert response.headers["content-type"] == "application/json", response.text[:300]
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert words in error["message"], error["message"]
    assert len(error["message"]) < 600  # names the problem without echoing the request
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert vlm.answered == before  # nothing reached the model
    ok = client.post("/v1/chat/completions", json={"messages": HI})  # and it still serves
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "ok"
