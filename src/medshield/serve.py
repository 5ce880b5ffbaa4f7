"""``medshield serve``: a defended, OpenAI-compatible chat-completions proxy.

The server takes OpenAI chat-completions requests, rewrites each conversation with a registered
defense (``medshield list defenses``: ``demonstrations``, ``self-reminder``, ``none``, ...) and
answers it with any chat backend (``medshield list chat-models``), including ``openai``: another
OpenAI-compatible endpoint such as a vLLM or Ollama server, so the proxy can sit in front of a
model that is already served. Clients see a normal chat API; the defense is invisible to them.

Endpoints:

* ``POST /v1/chat/completions`` — OpenAI request format: ``messages`` whose ``content`` is a
  string or a list of ``text`` / ``image_url`` parts (images as base64 ``data:image/...`` URLs;
  remote URLs are refused, never fetched), ``max_tokens`` (or ``max_completion_tokens``) and
  ``temperature`` (default 0, greedy). The reply has ``choices[0].message.content`` and
  ``usage`` (token counts *estimated* from word pieces, not the model's tokenizer; images are
  not counted; the prompt count includes what the defense added).
* ``GET /v1/models`` — the one served model name.
* ``GET /health`` — liveness: ``{"status": "ok", ...}`` with the model, defense and queue depth
  whenever the process answers, whatever the backend's state.
* ``GET /ready`` — readiness: 200 ``{"status": "ready"}`` when the backend can answer (for
  ``openai``: its endpoint answers ``GET /models``), else 503 ``{"status": "unavailable",
  "reason"}`` (``ChatVLM.readiness``).

Clients: with an API key (``api_key_env`` names the environment variable that holds it,
``MEDSHIELD_SERVE_API_KEY`` by default; the key never sits in a config file) every ``/v1/``
request must send ``Authorization: Bearer <key>``, as the OpenAI clients do with
``api_key=...``; others get 401 ``invalid_api_key``. ``/health`` and ``/ready`` stay open for
probes. Without
a key the proxy answers anyone who can reach it, and :func:`run_server` warns when it listens
beyond loopback.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 a body that
is not JSON (NaN or Infinity, a number of more than 4300 digits, nesting deeper than Python's
recursion limit), text that is not valid Unicode (a lone surrogate), a non-data-URL or
undecodable image, ``stream: true`` (not supported), ``n`` > 1, a ``max_tokens`` above the limit,
a conversation that does not end with a user turn; 413 a body, image count, image size
(decompression bombs included) or message count above the limits; 422 a request that does not
match the schema; 404 an unknown model name or path; 503 a full queue; 502 an upstream endpoint
that failed (:class:`~medshield.models.openai_chat.EndpointError`); 504 no answer within
``timeout_s``; 500 any other backend failure, and a bug (``internal_error``; the traceback goes
to the server's log, never to the client).

An untrained backend is refused: :func:`build_app` raises ``ConfigError`` for a ``mini-llava``
without ``checkpoint`` (random projector, meaningless replies) unless ``allow_untrained``
(``medshield serve --allow-untrained``), and :func:`run_server` then warns.

Concurrency: ``ChatVLM.generate`` is blocking, so it runs in a pool of ``max_concurrency`` worker
threads (1 by default: local torch backends are not assumed thread-safe). Requests that arrive
while every worker is busy wait in a queue of at most ``max_queue``; when a worker frees up it
takes up to ``max_batch_size`` queued conversations with the same ``max_tokens`` and
``temperature`` as one ``generate`` batch. Nothing waits to fill a batch: at low load each request
runs alone at once, under load batches form by themselves. A request that times out is answered
504 at once; if it was still queued it is dropped, if it was already generating its worker runs
to the end (a thread cannot be interrupted) and keeps its slot until then.

Privacy: by default the log holds one line per request with its id, status, latency and the
number of messages and images, never the text, the images or the reply, nor the text of a
backend error (an upstream's error body may echo the request): only its type and, for an
upstream, its kind (``HTTP 500``, ``timed out``, ``connection failed``); 502 replies leave the
upstream's text and address out too. ``log_content: true`` adds the last user text, the reply
and the backend's error text, for debugging.

Example::

    cfg = load_serve_config("configs/serve.yaml", ["model.kwargs.checkpoint=runs/mini-llava/model"])
    run_server(cfg)                                   # blocks; Ctrl-C stops

    app = create_app(my_vlm, create_defense("self-reminder"), served_name="llava")
    with serving(app) as url:                         # in a background thread, a free port
        httpx.post(f"{url}/v1/chat/completions", json={"messages": [...]})
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import hmac
import io
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.config import LOGGING_CONFIG

from medshield.config import StrictModel, load_yaml_model
from medshield.defense import Defense, create_defense
from medshield.errors import ConfigError, InputError
from medshield.models.chat import ChatVLM, Conversation, Message, create_chat_model
from medshield.models.openai_chat import EndpointError

logger = logging.getLogger("medshield.serve")

# -------------------------------------------------------------------- configuration


class ServeModelConfig(StrictModel):
    """The chat backend behind the proxy and its arguments, e.g. ``{backend: openai, kwargs:
    {base_url: http://localhost:8000/v1, model: llava-hf/llava-1.5-7b-hf}}``.

    ``served_name``: the model name clients send and ``/v1/models`` lists; by default the
    upstream's ``kwargs.model`` for ``openai`` (clients keep the name they used), else the
    backend name.
    """

    backend: str = "mini-llava"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    served_name: str | None = None


class ServeDefenseConfig(StrictModel):
    """The defense applied to every conversation (``medshield list defenses``)."""

    name: str = "demonstrations"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ServeLimits(StrictModel):
    """Request limits and the worker pool (see the module docstring)."""

    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_images: int = Field(4, ge=0)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_messages: int = Field(64, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens: int = Field(2048, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_concurrency: int = Field(1, ge=1)
    max_batch_size: int = Field(8, ge=1)
    max_queue: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _tokens(self) -> ServeLimits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens "
                f"({self.max_tokens})"
            )
        return self


class ServeConfig(StrictModel):
    """``medshield serve``: where to listen, what to serve, which defense, which limits.

    ``log_content``: also log request text, replies and backend error text (off by default).
    ``api_key_env``: the environment variable holding the key clients must send (unset or
    empty: no key asked).
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_content: bool = False
    api_key_env: str = Field("MEDSHIELD_SERVE_API_KEY", min_length=1)
    model: ServeModelConfig = Field(default_factory=ServeModelConfig)
    defense: ServeDefenseConfig = Field(default_factory=ServeDefenseConfig)
    limits: ServeLimits = Field(default_factory=ServeLimits)

    def served_name(self) -> str:
        """The model name the server answers to."""
        if self.model.served_name:
            return self.model.served_name
        upstream = self.model.kwargs.get("model")
        if self.model.backend == "openai" and isinstance(upstream, str) and upstream:
            return upstream
        return self.model.backend

    def api_key(self) -> str | None:
        """The key clients must send, from the environment variable ``api_key_env``."""
        return os.environ.get(self.api_key_env) or None


def load_serve_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ServeConfig:
    """Read a ``medshield serve`` YAML config (defaults when ``path`` is None) with overrides.

    Raises:
        ConfigError: a missing file, invalid YAML or an invalid or unknown key.
    """
    return load_yaml_model(ServeConfig, path, overrides)


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


# ------------------------------------------------------------- request -> conversation


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


# -------------------------------------------------------------------- worker pool


@dataclass
class _Job:
    conversation: Conversation
    max_new_tokens: int
    temperature: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs a blocking :class:`ChatVLM` in worker threads, batching queued requests.

    At most ``max_concurrency`` ``generate`` calls run at once; each takes up to
    ``max_batch_size`` queued conversations that share ``max_tokens`` and ``temperature``. When a
    batch fails on an :class:`InputError` (one bad conversation), its conversations are
    answered one by one so that only the culprit fails. Create and use it on one event loop.
    """

    def __init__(
        self, model: ChatVLM, max_concurrency: int, max_batch_size: int, max_queue: int
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.running = 0
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="medshield-gen")
        self._slots = asyncio.Semaphore(max_concurrency)
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    def start(self) -> None:
        """Start dispatching (call from the event loop)."""
        self._spawn(self._dispatch())

    def stop(self) -> None:
        """Stop dispatching and drop the worker threads' pending batches."""
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(
        self, conversation: Conversation, max_new_tokens: int, temperature: float
    ) -> asyncio.Future:
        """Queue a conversation; the future resolves to the reply or the backend's exception.

        Raises:
            ServeError: 503 when ``max_queue`` requests are already waiting.
        """
        if len(self._queue) >= self.max_queue:
            raise _server_error(
                503, f"the server is busy ({self.max_queue} requests queued); retry", "overloaded"
            )
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(conversation, max_new_tokens, temperature, future))
        self._wakeup.set()
        return future

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._next_batch()
            self.running += 1
            self._spawn(self._run(batch))

    async def _next_batch(self) -> list[_Job]:
        while True:
            while self._queue and self._queue[0].future.done():  # timed out while queued
                self._queue.popleft()
            if self._queue:
                break
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._queue.popleft()
        batch, held = [first], []
        while self._queue and len(batch) < self.max_batch_size:
            job = self._queue.popleft()
            if job.future.done():
                continue
            same = (job.max_new_tokens, job.temperature) == (
                first.max_new_tokens,
                first.temperature,
            )
            (batch if same else held).append(job)
        self._queue.extendleft(reversed(held))
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._generate, batch)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self.running -= 1
            self._slots.release()

    def _generate(self, batch: list[_Job]) -> list[str | BaseException]:
        """In a worker thread: the replies (or the exception) of each job, in order."""
        first = batch[0]
        try:
            replies = self.model.generate(
                [job.conversation for job in batch], first.max_new_tokens, first.temperature
            )
            if len(replies) != len(batch):
                raise RuntimeError(f"the backend gave {len(replies)} replies for {len(batch)}")
            return list(replies)
        except InputError as exc:
            if len(batch) == 1:
                return [exc]
        except Exception as exc:  # delivered to each request, mapped to a status
            return [exc] * len(batch)
        return [self._generate([job])[0] for job in batch]


# -------------------------------------------------------------------- the application


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


class _Service:
    """What the routes share: the backend, the defense, the limits and the worker pool."""

    def __init__(
        self,
        model: ChatVLM,
        defense: Defense,
        served_name: str,
        limits: ServeLimits,
        log_content: bool,
    ) -> None:
        self.model = model
        self.defense = defense
        self.served_name = served_name
        self.limits = limits
        self.log_content = log_content
        self.created = int(time.time())
        self.batcher: Batcher | None = None

    def check(self, chat: ChatRequest) -> tuple[int, float]:
        """Refuse what the server does not do or allow; (max_new_tokens, temperature)."""
        limits = self.limits
        if chat.stream:
            raise ServeError(
                400, "streaming is not supported; send stream: false", "stream", "stream"
            )
        if chat.n not in (None, 1):
            raise ServeError(400, "only n = 1 is supported", "unsupported_n", "n")
        if chat.model is not None and chat.model != self.served_name:
            raise ServeError(
                404,
                f"model {chat.model!r} is not served here; this server serves {self.served_name!r}",
                "model_not_found",
                "model",
            )
        if len(chat.messages) > limits.max_messages:
            raise ServeError(
                413,
                f"{len(chat.messages)} messages exceed the limit of {limits.max_messages}",
                "too_many_messages",
                "messages",
            )
        images = _count_images(chat)
        if images > limits.max_images:
            raise ServeError(
                413,
                f"{images} images exceed the limit of {limits.max_images} per request",
                "too_many_images",
                "messages",
            )
        tokens = chat.max_completion_tokens or chat.max_tokens or limits.default_max_tokens
        if tokens > limits.max_tokens:
            raise ServeError(
                400,
                f"max_tokens exceeds this server's limit of {limits.max_tokens}",
                "max_tokens_too_large",
                "max_tokens",
            )
        return tokens, float(chat.temperature or 0.0)

    def prepare(self, chat: ChatRequest) -> Conversation:
        """In a thread: decode the images and apply the defense."""
        try:
            return self.defense.apply(to_conversation(chat, self.limits))
        except InputError as exc:
            raise ServeError(400, f"invalid conversation: {exc}", "invalid_conversation") from None

    async def answer(self, chat: ChatRequest) -> tuple[Conversation, str]:
        """The defended conversation and the backend's reply (the backend's own exception)."""
        tokens, temperature = self.check(chat)
        conversation = await asyncio.to_thread(self.prepare, chat)
        assert self.batcher is not None, "the server's lifespan has not started"
        reply = await self.batcher.submit(conversation, tokens, temperature)
        return conversation, reply

    async def answer_within_limit(self, chat: ChatRequest) -> tuple[Conversation, str]:
        """:meth:`answer` within ``timeout_s``, every failure as a :class:`ServeError`."""
        try:
            return await asyncio.wait_for(self.answer(chat), self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise _server_error(
                504, f"no answer within {self.limits.timeout_s:g} s", "timeout"
            ) from None
        except ServeError:
            raise
        except Exception as exc:  # the backend's failure, mapped to a status
            error = _backend_error(exc)
            error.detail = f"{error.code} ({_failure_reason(exc, self.log_content)})"
            raise error from None

    def completion(self, rid: str, conversation: Conversation, reply: str) -> dict[str, Any]:
        """The OpenAI chat.completion object."""
        prompt = sum(estimate_tokens(m.text) for m in conversation)
        completion = estimate_tokens(reply)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


_UPSTREAM_KIND = re.compile(r"timed out|connection failed|HTTP \d{3}|malformed JSON|no 'choices'")


def _failure_reason(exc: BaseException, full: bool) -> str:
    """What the log says of a backend failure: its type, and for an upstream failure its kind
    (``HTTP 500``, ``connection failed``, ...); the whole message only when ``full``."""
    if full:
        return f"{type(exc).__name__}: {exc}"
    kind = _UPSTREAM_KIND.search(str(exc)) if isinstance(exc, EndpointError) else None
    return f"{type(exc).__name__}: {kind.group(0)}" if kind else type(exc).__name__


def _backend_error(exc: BaseException) -> ServeError:
    """The status of a backend failure; upstream error text (it may echo the request, and names
    the upstream's address) stays out of the reply."""
    if isinstance(exc, EndpointError):
        return _server_error(502, "the upstream model endpoint failed", "upstream_error")
    if isinstance(exc, InputError):
        return ServeError(400, f"the model refused the input: {exc}", "invalid_input")
    return _server_error(500, f"the model failed ({type(exc).__name__})", "model_error")


def create_app(
    model: ChatVLM,
    defense: Defense,
    served_name: str,
    limits: ServeLimits | None = None,
    log_content: bool = False,
    api_key: str | None = None,
) -> FastAPI:
    """The proxy as a FastAPI application (run it with uvicorn, or :func:`serving`).

    Args:
        model: the chat backend that answers (its ``generate`` runs in worker threads).
        defense: applied to every conversation before ``model`` sees it.
        served_name: the model name clients use and ``/v1/models`` lists.
        limits: request limits and worker pool (defaults: :class:`ServeLimits`).
        log_content: also log request text, replies and backend error text.
        api_key: the key every ``/v1/`` request must send as ``Authorization: Bearer <key>``
            (None: no key asked).
    """
    service = _Service(model, defense, served_name, limits or ServeLimits(), log_content)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        lim = service.limits
        service.batcher = Batcher(
            service.model, lim.max_concurrency, lim.max_batch_size, lim.max_queue
        )
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.stop()

    app = FastAPI(
        title="medshield defended chat proxy",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return ServeError(exc.status_code, str(exc.detail), code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # a bug, not a bad request: logged with its traceback by the server, never sent back
        message = f"the server failed ({type(exc).__name__})"
        return _server_error(500, message, "internal_error").response()

    @app.middleware("http")
    async def _authorize(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if api_key is not None and path.startswith("/v1/") and not _key_matches(request, api_key):
            logger.info("%s 401 invalid_api_key", path)
            message = "a valid API key is required: send Authorization: Bearer <key>"
            error = ServeError(401, message, "invalid_api_key", kind="authentication_error")
            return error.response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = service.batcher
        return {
            "status": "ok",
            "model": service.served_name,
            "backend": service.model.backend or type(service.model).__name__,
            "defense": service.defense.name or type(service.defense).__name__,
            "queued": batcher.queued if batcher else 0,
            "running": batcher.running if batcher else 0,
        }

    @app.get("/ready")
    async def ready() -> JSONResponse:
        reason = await asyncio.to_thread(service.model.readiness)
        body: dict[str, Any] = {"status": "ready" if reason is None else "unavailable"}
        if reason is not None:
            body["reason"] = reason
        body["model"] = service.served_name
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": service.served_name,
                    "object": "model",
                    "created": service.created,
                    "owned_by": "medshield",
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        started = time.perf_counter()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        chat: ChatRequest | None = None
        try:
            chat = _parse(await _read_body(request, service.limits.max_body_bytes))
            conversation, reply = await service.answer_within_limit(chat)
        except ServeError as exc:
            _log_request(service, rid, chat, exc.status, started, exc.detail)
            return exc.response()
        _log_request(service, rid, chat, 200, started)
        if service.log_content:
            content = {"request": _last_user_text(chat), "reply": reply}
            logger.info("%s content: %s", rid, json.dumps(content))
        return JSONResponse(service.completion(rid, conversation, reply))

    return app


def _key_matches(request: Request, api_key: str) -> bool:
    """Whether the request sends ``Authorization: Bearer <api_key>`` (compared in constant time)."""
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        sent.strip().encode(), api_key.encode()
    )


def _last_user_text(chat: ChatRequest) -> str:
    content = [m for m in chat.messages if m.role == "user"][-1].content
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if isinstance(p, TextPart))


def _log_request(
    service: _Service,
    rid: str,
    chat: ChatRequest | None,
    status: int,
    started: float,
    detail: str = "",
) -> None:
    """One line per request: id, status, latency, counts; content only with ``log_content``."""
    messages = len(chat.messages) if chat else 0
    images = _count_images(chat) if chat else 0
    line = (
        f"{rid} {status} {1000 * (time.perf_counter() - started):.0f} ms "
        f"messages={messages} images={images}"
    )
    if detail:
        line += f" error={detail}"
    logger.log(logging.INFO if status < 500 else logging.WARNING, line)


def untrained(config: ServeConfig) -> bool:
    """Whether the configured backend is a mini-llava without a checkpoint: its projector is
    random, so its replies mean nothing."""
    return config.model.backend == "mini-llava" and not config.model.kwargs.get("checkpoint")


UNTRAINED = (
    "the mini-llava backend has no checkpoint, so it would answer with untrained weights "
    "(random projector): its replies mean nothing"
)


def build_app(config: ServeConfig, allow_untrained: bool = False) -> FastAPI:
    """Load the configured backend and defense and return the application.

    Raises:
        ConfigError: an untrained mini-llava (see :func:`untrained`) without ``allow_untrained``.
        UnknownNameError: an unknown backend or defense.
        InputError: bad backend or defense arguments.
    """
    import medshield.models  # noqa: F401  (registers the chat backends)

    defense = create_defense(config.defense.name, **config.defense.kwargs)
    if untrained(config) and not allow_untrained:
        raise ConfigError(
            f"{UNTRAINED}; serve a trained one with --set model.kwargs.checkpoint=DIR (e.g. "
            "runs/mini-llava/model, written by `medshield train-vlm`), another backend with "
            "--model, or pass --allow-untrained to serve it anyway (smoke tests only)"
        )
    model = create_chat_model(config.model.backend, **config.model.kwargs)
    return create_app(
        model,
        defense,
        config.served_name(),
        config.limits,
        config.log_content,
        config.api_key(),
    )


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL.

    ``port`` 0 takes a free port. Logs go through :mod:`logging` (uvicorn's own logging set-up
    is skipped), and the server stops when the block ends.

    Raises:
        RuntimeError: the server did not start within 30 s.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio then sets TCP_NODELAY on accepted connections (with 0
    # it does not, and Nagle + delayed ACKs add ~40 ms to every reply)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    bound = sock.getsockname()[1]
    try:
        yield f"http://[{host}]:{bound}" if family == socket.AF_INET6 else f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def run_server(
    config: ServeConfig, log: Callable[[str], Any] = print, allow_untrained: bool = False
) -> None:
    """Load the model and defense, then serve until interrupted (uvicorn, with access log).

    Raises:
        ConfigError: see :func:`build_app`.
    """
    app = build_app(config, allow_untrained)
    name, backend, defense = config.served_name(), config.model.backend, config.defense.name
    log(f"serving {name!r} ({backend}) behind defense {defense!r}")
    if untrained(config):
        log(f"WARNING: {UNTRAINED}; for smoke tests only")
    log(f"at http://{config.host}:{config.port}/v1" + (" [logging content]" * config.log_content))
    if config.api_key():
        log(f"clients must send the API key in ${config.api_key_env}")
    elif config.host not in ("127.0.0.1", "localhost", "::1"):
        log(
            f"warning: listening on {config.host} without an API key; anyone who can reach "
            f"the port can use the model (set ${config.api_key_env} to require one)"
        )
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["medshield"] = {"handlers": ["default"], "level": "INFO"}
    uvicorn.run(app, host=config.host, port=config.port, log_config=log_config)


__all__ = [
    "Batcher",
    "ChatRequest",
    "ServeConfig",
    "ServeDefenseConfig",
    "ServeError",
    "ServeLimits",
    "ServeModelConfig",
    "build_app",
    "create_app",
    "decode_image",
    "estimate_tokens",
    "load_serve_config",
    "run_server",
    "serving",
    "to_conversation",
    "untrained",
]
