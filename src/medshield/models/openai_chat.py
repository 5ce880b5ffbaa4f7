"""``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint as a :class:`ChatVLM`.

Works with vLLM (``vllm serve MODEL``), Ollama (``http://localhost:11434/v1``), LM Studio,
llama.cpp's server and the OpenAI API itself. Each conversation becomes one request::

    POST {base_url}/chat/completions
    {"model": MODEL, "max_tokens": N, "temperature": T,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "text", "text": "Which modality is this?"}]}]}

Images (tensors or files) go through :func:`~medshield.models.chat.load_image` and are sent as
8-bit RGB PNG data URLs, before the text of their message; messages without images send their
text as a plain string (what every server accepts, including system turns).

The API key comes from ``api_key`` or the environment variable named by ``api_key_env``
(``OPENAI_API_KEY`` by default); without one no ``Authorization`` header is sent, which is what
local servers expect. Requests time out after ``timeout`` seconds; 429, 5xx, time-outs and
connection errors are retried up to ``max_retries`` times with exponential back-off
(``backoff * 2**attempt`` seconds, at most ``max_backoff``, or the server's ``Retry-After``),
and a batch runs at most ``concurrency`` requests at once (threads over one ``httpx.Client``;
the limit holds per instance, also across threads that share it).

Failures raise :class:`EndpointError` naming the endpoint and the conversation. ``score`` is
not available: chat-completions servers return log-probabilities of *generated* tokens only, not
of a given continuation, so it raises ``NotImplementedError``.

Example::

    vlm = create_chat_model("openai", base_url="http://localhost:8000/v1", model="llava-med")
    [reply] = vlm.generate([[Message("user", "Describe this X-ray.", ["cxr.png"])]])
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from medshield.errors import InputError, MedshieldError
from medshield.models.chat import ChatVLM, Conversation, check_conversation, image_png
from medshield.registry import CHAT_MODELS

try:  # a dependency of medshield; kept optional here so `import medshield.models` never fails
    import httpx
except ImportError:  # pragma: no cover - exercised only in broken installs
    httpx = None  # type: ignore[assignment]

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(MedshieldError, RuntimeError):
    """A chat endpoint that failed: time-out, refused connection, HTTP error or malformed reply."""


def image_to_data_url(image: torch.Tensor | str | os.PathLike) -> str:
    """An image tensor or file -> ``data:image/png;base64,...`` (8-bit RGB PNG).

    Example::

        >>> image_to_data_url(torch.zeros(1, 2, 2))[:22]
        'data:image/png;base64,'
    """
    return "data:image/png;base64," + base64.b64encode(image_png(image)).decode("ascii")


@CHAT_MODELS.register(
    "openai", "any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, LM Studio)"
)
class OpenAIChatVLM(ChatVLM):
    """A model served behind an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (a URL that already ends in
            ``/chat/completions`` is used as is).
        model: the model name the server expects in the ``model`` field.
        api_key: bearer token; defaults to the environment variable ``api_key_env``.
        api_key_env: environment variable read when ``api_key`` is not given.
        timeout: seconds per request (connect, read and write).
        max_retries: extra attempts after a 429/5xx/time-out/connection error.
        backoff: first retry delay in seconds; doubles each attempt.
        max_backoff: cap on one delay (also on a server's ``Retry-After``).
        concurrency: most requests in flight at once.
        extra_body: extra JSON fields sent with every request (e.g. ``{"top_p": 1.0}``).

    Raises:
        InputError: a malformed ``base_url`` or a non-positive limit.

    Example::

        vlm = OpenAIChatVLM("http://localhost:11434/v1", model="llava:7b", concurrency=2)
        replies = vlm.generate(batch, max_new_tokens=64)
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 4,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if httpx is None:
            raise ImportError("the openai chat backend needs httpx: pip install httpx")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InputError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise InputError("model must be the non-empty model name the server expects")
        if not timeout or timeout <= 0:
            raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise InputError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise InputError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if backoff < 0 or max_backoff < 0:
            raise InputError("backoff and max_backoff must be >= 0")
        url = base_url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = concurrency
        self.extra_body = dict(extra_body or {})
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), headers=headers)
        self._slots = threading.BoundedSemaphore(concurrency)

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIChatVLM(endpoint={self.endpoint!r}, model={self.model!r})"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> OpenAIChatVLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """Send one request per conversation (at most ``concurrency`` at once); replies in order.

        Every conversation and image is checked and encoded before any request is sent.

        Raises:
            InputError: a malformed conversation or image, ``max_new_tokens`` < 1 or a negative
                temperature.
            EndpointError: for the first conversation (in order) whose request failed after its
                retries: time-out, connection error, HTTP error, malformed JSON or no
                ``choices``; the message names the endpoint and the conversation.

        Example::

            replies = vlm.generate([[Message("user", "Is this CT normal?", [ct])]], 32)
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InputError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
            raise InputError(f"temperature must be a finite number, got {temperature!r}")
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        if isinstance(conversations, str) or not isinstance(conversations, Sequence):
            raise InputError("conversations must be a list of conversations (lists of Message)")
        bodies = []
        for i, conversation in enumerate(conversations):
            try:
                messages = self.encode_messages(check_conversation(conversation))
            except InputError as e:
                raise InputError(f"conversation {i}: {e}") from None
            body = {
                **self.extra_body,
                "model": self.model,
                "messages": messages,
                "max_tokens": max_new_tokens,
                "temperature": float(temperature),
            }
            bodies.append(body)
        if not bodies:
            return []
        if len(bodies) == 1:
            return [self._complete(bodies[0], 0)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            futures = [pool.submit(self._complete, body, i) for i, body in enumerate(bodies)]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> torch.Tensor:
        """Not available: chat-completions endpoints cannot score a given continuation.

        Raises:
            NotImplementedError: always. Use a local backend (``hf``, ``mini-llava``) for
                likelihood-based refusal scoring and white-box image attacks.
        """
        raise NotImplementedError(
            f"the openai backend ({self.endpoint}) cannot score continuations: chat-completions "
            "servers return log-probabilities of generated tokens only, and the image pixels "
            "are not differentiable through HTTP; use a local backend such as 'hf' or "
            "'mini-llava' for score() and white-box attacks"
        )

    def readiness(self) -> str | None:
        """None when the endpoint answers ``GET {base_url}/models`` (any status but 401, 403 or
        5xx, within ``min(timeout, 5)`` s), else why not: ``timed out``, ``connection failed``
        or ``HTTP <status>``; the endpoint's address and reply text stay out."""
        models = self.endpoint.removesuffix("/chat/completions") + "/models"
        try:
            response = self._client.get(models, timeout=min(self.timeout, 5.0))
        except httpx.TimeoutException:
            return "the upstream endpoint timed out"
        except httpx.TransportError:
            return "the upstream endpoint cannot be reached (connection failed)"
        if response.status_code in (401, 403) or response.status_code >= 500:
            return f"the upstream endpoint answered HTTP {response.status_code}"
        return None

    @staticmethod
    def encode_messages(conversation: Conversation) -> list[dict[str, Any]]:
        """A checked conversation -> OpenAI ``messages`` (images as PNG data URLs first).

        Example::

            >>> OpenAIChatVLM.encode_messages([Message("user", "hi")])
            [{'role': 'user', 'content': 'hi'}]
        """
        messages: list[dict[str, Any]] = []
        for m in conversation:
            if not m.images:
                messages.append({"role": m.role, "content": m.text})
                continue
            content: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": image_to_data_url(image)}}
                for image in m.images
            ]
            content.append({"type": "text", "text": m.text})
            messages.append({"role": m.role, "content": content})
        return messages

    # ------------------------------------------------------------------ internals

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("Retry-After")
            try:
                if retry_after is not None:
                    return min(max(float(retry_after), 0.0), self.max_backoff)
            except ValueError:
                pass  # an HTTP date: fall back to our own back-off
        delay = min(self.backoff * 2**attempt, self.max_backoff)
        return delay * (1.0 + 0.1 * random.random())

    def _complete(self, body: dict[str, Any], index: int) -> str:
        """POST one request with retries; the reply's text."""
        where = f"conversation {index}: {self.endpoint}"
        last = ""
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                with self._slots:
                    response = self._client.post(self.endpoint, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as e:
                last = f"connection failed ({type(e).__name__}: {e})"
            else:
                if response.status_code < 400:
                    return self._parse(response, where)
                detail = response.text[:300].strip()
                last = f"HTTP {response.status_code}: {detail}"
                if response.status_code not in RETRY_STATUS:
                    raise EndpointError(f"{where} answered {last}")
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, response))
        attempts = self.max_retries + 1
        raise EndpointError(
            f"{where} failed after {attempts} attempt{'s' * (attempts > 1)}: {last}"
        )

    @staticmethod
    def _parse(response: httpx.Response, where: str) -> str:
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise EndpointError(
                f"{where} returned malformed JSON (HTTP {response.status_code}): "
                f"{response.text[:200]!r}"
            ) from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            error = data.get("error") if isinstance(data, dict) else None
            hint = f"; server error: {error}" if error else ""
            raise EndpointError(f"{where} returned no 'choices' in its reply{hint}")
        choice = choices[0]
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise EndpointError(f"{where} returned a choice without a 'message': {choice!r:.200}")
        content = message.get("content")
        if content is None:
            content = message.get("refusal") or ""
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise EndpointError(f"{where} returned non-text content: {content!r:.200}")
        return content.strip()
