"""``medshield serve``'s configuration: the backend, the defense, the request limits and the
listening address, read from YAML (``configs/serve.yaml``) with ``--set`` overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from medshield.config import StrictModel, load_yaml_model


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


def untrained(config: ServeConfig) -> bool:
    """Whether the configured backend is a mini-llava without a checkpoint: its projector is
    random, so its replies mean nothing."""
    return config.model.backend == "mini-llava" and not config.model.kwargs.get("checkpoint")


UNTRAINED = (
    "the mini-llava backend has no checkpoint, so it would answer with untrained weights "
    "(random projector): its replies mean nothing"
)
