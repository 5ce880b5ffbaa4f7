"""What the routes share: one request's checks, defense, queueing, time limit and reply, and
the mapping of backend failures to HTTP statuses."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from medshield.commands.serve.batcher import Batcher
from medshield.commands.serve.config import ServeLimits
from medshield.commands.serve.protocol import (
    ChatRequest,
    ServeError,
    _count_images,
    _server_error,
    estimate_tokens,
    to_conversation,
)
from medshield.defense import Defense
from medshield.errors import InputError
from medshield.models.chat import ChatVLM, Conversation
from medshield.models.openai_chat import EndpointError


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
