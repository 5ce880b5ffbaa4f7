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

The package: ``config.py`` (:class:`ServeConfig`, :func:`load_serve_config`), ``protocol.py``
(the request schema, OpenAI-style errors, body -> request -> conversation), ``batcher.py`` (the
worker pool), ``service.py`` (one request's checks, defense, queueing and reply, and the status of
a backend failure); this module holds the routes and the entry points.

Example::

    cfg = load_serve_config("configs/serve.yaml", ["model.kwargs.checkpoint=runs/mini-llava/model"])
    run_server(cfg)                                   # blocks; Ctrl-C stops

    app = create_app(my_vlm, create_defense("self-reminder"), served_name="llava")
    with serving(app) as url:                         # in a background thread, a free port
        httpx.post(f"{url}/v1/chat/completions", json={"messages": [...]})
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.config import LOGGING_CONFIG

from medshield.commands.serve.batcher import Batcher
from medshield.commands.serve.config import (
    UNTRAINED,
    ServeConfig,
    ServeDefenseConfig,
    ServeLimits,
    ServeModelConfig,
    load_serve_config,
    untrained,
)
from medshield.commands.serve.protocol import (
    ChatRequest,
    ServeError,
    TextPart,
    _count_images,
    _parse,
    _read_body,
    _server_error,
    decode_image,
    estimate_tokens,
    to_conversation,
)
from medshield.commands.serve.service import _Service
from medshield.defense import Defense, create_defense
from medshield.errors import ConfigError
from medshield.models.chat import ChatVLM, create_chat_model

logger = logging.getLogger("medshield.serve")  # the command's name, kept when the module moved


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


def build_app(config: ServeConfig, allow_untrained: bool = False) -> FastAPI:
    """Load the configured backend and defense and return the application.

    Raises:
        ConfigError: an untrained mini-llava (see :func:`untrained`) without ``allow_untrained``.
        UnknownNameError: an unknown backend or defense.
        InputError: bad backend or defense arguments.
    """

    defense = create_defense(config.defense.name, **config.defense.kwargs)
    if untrained(config) and not allow_untrained:
        raise ConfigError(
            f"{UNTRAINED}; serve a trained one with --set model.kwargs.checkpoint=instruct (the "
            "one that ships with medshield) or =DIR (written by `medshield train-vlm`), another "
            "backend with "
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
