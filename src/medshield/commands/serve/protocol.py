"""The proxy's side of the OpenAI protocol: the request schema, OpenAI-style errors, and a
request's way from body bytes to a :class:`~medshield.models.chat.Conversation` (JSON parsing,
validation, image decoding), each refusal a :class:`ServeError` with its HTTP status."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Iterator
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medshield.commands.serve.config import ServeLimits
from medshield.models.chat import Conversation, Message

# -------------------------------------------------------------------- request schema


class _Lenient(BaseModel):
    """OpenAI clients send fields this server does not use: ignore them."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(_Lenient):
    """The subset of OpenAI's chat-completions request the proxy understands."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool | None = False
    n: int | None = Field(1, ge=1)


class ServeError(Exception):
    """A request answered with an HTTP error and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = (
            status,
            message,
            code,
            param,
            kind,
        )
        self.detail = code  # what the log says (never request content)

    def response(self) -> JSONResponse:
        """The error as OpenAI shapes it: ``{"error": {message, type, param, code}}``."""
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status)


def _server_error(status: int, message: str, code: str) -> ServeError:
    return ServeError(status, message, code, kind="server_error")


def decode_image(url: str, max_pixels: int) -> torch.Tensor:
    """A base64 ``data:image/...`` URL -> float (3, H, W) tensor in [0, 1].

    Raises:
        ServeError: 400 for a URL that is not a base64 image data URL (remote URLs are never
            fetched), invalid base64 or bytes that are not an image; 413 for more than
            ``max_pixels`` pixels.
    """
    if not url.startswith("data:"):
        raise ServeError(
            400,
            "images must be base64 data URLs (data:image/png;base64,...); remote image URLs "
            "are not fetched",
            "unsupported_image_url",
            "messages",
        )
    header, sep, data = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ServeError(
            400,
            "an image data URL must look like data:image/<format>;base64,<data>",
            "invalid_image_url",
            "messages",
        )
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(
            400, "image data is not valid base64", "invalid_image", "messages"
        ) from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ServeError(
                    413,
                    f"an image of {width}x{height} pixels exceeds the limit of {max_pixels}",
                    "image_too_large",
                    "messages",
                )
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError:  # Pillow's own guard, before the size is read
        raise ServeError(
            413,
            "an image declares too many pixels to decode safely (a decompression bomb); the "
            f"limit is {max_pixels} pixels",
            "image_too_large",
            "messages",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ServeError(
            400, "image data could not be decoded", "invalid_image", "messages"
        ) from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _count_images(chat: ChatRequest) -> int:
    return sum(
        isinstance(part, ImagePart)
        for m in chat.messages
        if isinstance(m.content, list)
        for part in m.content
    )


def to_conversation(chat: ChatRequest, limits: ServeLimits) -> Conversation:
    """OpenAI messages -> a :class:`~medshield.models.chat.Conversation`, images decoded.

    A ``developer`` message becomes a system turn; a message's text parts are joined by
    newlines and its images kept in order (before the text, as every backend places them).

    Raises:
        ServeError: see :func:`decode_image`.
    """
    conversation: Conversation = []
    for m in chat.messages:
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            conversation.append(Message(role, m.content))
            continue
        texts = [p.text for p in m.content if isinstance(p, TextPart)]
        images = [
            decode_image(p.image_url.url, limits.max_image_pixels)
            for p in m.content
            if isinstance(p, ImagePart)
        ]
        conversation.append(Message(role, "\n".join(texts), images))
    return conversation


_TOKEN = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate: words and punctuation marks.

    Example::

        >>> estimate_tokens("Is this chest X-ray normal?")
        7
    """
    return len(_TOKEN.findall(text))


# ------------------------------------------------------------------------ body -> request


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    too_large = ServeError(
        413, f"the request body exceeds the limit of {limit} bytes", "request_too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> ChatRequest:
    """Bytes -> :class:`ChatRequest`.

    Raises:
        ServeError: 400 for a body that is not JSON, nests too deeply, holds a number too long
            to convert or text that is not valid Unicode (a lone surrogate such as ``\\ud800``);
            422 for a schema mismatch.
    """
    try:
        data = json.loads(raw, parse_constant=_non_finite)
    except RecursionError:
        raise ServeError(
            400, "the request body nests JSON arrays or objects too deeply", "invalid_json"
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        reason = "a number has too many digits" if "digits" in str(exc) else "it is not valid JSON"
        raise ServeError(
            400, f"the request body cannot be read: {reason}", "invalid_json"
        ) from None
    try:
        chat = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)[:5]
        )
        raise ServeError(422, f"invalid request: {problems}", "invalid_request", where) from None
    for text in _texts(chat):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ServeError(
                400,
                "the request holds text that is not valid Unicode (a lone surrogate such as "
                "\\ud800); send UTF-8 text",
                "invalid_unicode",
                "messages",
            ) from None
    return chat


def _non_finite(name: str) -> None:
    """Python's JSON reader takes NaN and Infinity; JSON does not."""
    raise ServeError(
        400,
        f"the request body holds {name}, which is not JSON; send a finite number",
        "invalid_json",
    )


def _texts(chat: ChatRequest) -> Iterator[str]:
    """Every string of the request that reaches the model or the log."""
    if chat.model is not None:
        yield chat.model
    for m in chat.messages:
        if isinstance(m.content, str):
            yield m.content
            continue
        for part in m.content:
            yield part.text if isinstance(part, TextPart) else part.image_url.url
