"""The generative (chat) VLM interface every chat backend implements.

A *conversation* is a list of :class:`Message` s. Each message has a role (``system``, ``user``
or ``assistant``), text, and optional images: float tensors in [0, 1] of shape (C, H, W) with
C = 1 or 3, or paths to image files. A conversation to answer ends with a user turn.

Backends are registered by name in :data:`medshield.registry.CHAT_MODELS` and built with
:func:`create_chat_model`::

    vlm = create_chat_model("openai", base_url="http://localhost:8000/v1", model="llava")
    [reply] = vlm.generate([[Message("user", "Which modality is this?", [image])]])
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medshield.errors import ConfigError, InputError
from medshield.registry import CHAT_MODELS

Role = Literal["system", "user", "assistant"]
ImageLike = torch.Tensor | str | Path


@dataclass
class Message:
    """One turn: ``role``, ``text`` and optional ``images`` ((C, H, W) [0, 1] tensors or paths)."""

    role: Role
    text: str
    images: list[ImageLike] = field(default_factory=list)


Conversation = list[Message]


def load_image(image: ImageLike) -> torch.Tensor:
    """An image tensor or file -> float (3, H, W) tensor in [0, 1] (grey images repeated to RGB).

    Tensors keep their autograd graph, so white-box attacks can differentiate through it.

    Raises:
        InputError: a file that is missing or not an image, or a tensor that is not (C, H, W)
            with C in {1, 3} and values in [0, 1].
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file {path} does not exist")
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{path} is not a readable image: {exc}") from None
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if not isinstance(image, torch.Tensor):
        raise InputError(f"an image must be a tensor or a file path, got {type(image).__name__}")
    if not image.is_floating_point() or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InputError(
            f"an image tensor must be float (C, H, W) with C = 1 or 3, got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    if image.numel() and (image.min() < 0 or image.max() > 1):
        raise InputError("image tensor values must lie in [0, 1]")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def image_png(image: ImageLike) -> bytes:
    """An image tensor or file -> the bytes of an 8-bit RGB PNG (values rounded to 1/255).

    Raises:
        InputError: see :func:`load_image`.
    """
    tensor = load_image(image).detach().to("cpu", torch.float32)
    array = (tensor.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def check_conversation(conversation: Any) -> Conversation:
    """Validate one conversation and return it.

    Raises:
        InputError: not a non-empty list of :class:`Message`, an unknown role, non-string text,
            no user turn, or a last turn that is not the user's.
    """
    if not isinstance(conversation, Sequence) or isinstance(conversation, str):
        raise InputError("a conversation must be a list of Message")
    if not conversation:
        raise InputError("a conversation must hold at least one message")
    for i, message in enumerate(conversation):
        if not isinstance(message, Message):
            raise InputError(f"message {i} is {type(message).__name__}, expected Message")
        if message.role not in ("system", "user", "assistant"):
            raise InputError(f"message {i} has unknown role {message.role!r}")
        if not isinstance(message.text, str):
            raise InputError(f"message {i} text is {type(message.text).__name__}, expected str")
    if not any(m.role == "user" for m in conversation):
        raise InputError("a conversation must contain a user turn")
    if conversation[-1].role != "user":
        raise InputError("a conversation to answer must end with a user turn")
    return list(conversation)


class ChatVLM(ABC):
    """A generative vision-language model that answers conversations.

    Implementations take batches and must not mutate the conversations they are given.
    """

    backend: str = ""  # set by CHAT_MODELS.register

    @abstractmethod
    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """Answer each conversation; ``temperature`` 0 means greedy decoding."""

    @abstractmethod
    def score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> torch.Tensor:
        """Log-likelihood of each continuation as the assistant's reply: a (N,) tensor.

        The sum of token log-probabilities of ``continuations[i]`` given ``conversations[i]``.
        Local backends keep the graph to any image tensor that requires grad (white-box
        attacks); remote backends that cannot score raise ``NotImplementedError``.
        """

    def readiness(self) -> str | None:
        """Why the backend cannot answer now, or None when it can (``medshield serve``'s
        ``/ready``). A local backend is ready once built; a remote one asks its endpoint."""
        return None


def create_chat_model(name: str, **kwargs: Any) -> ChatVLM:
    """Build the chat backend registered as ``name`` (see ``medshield list chat-models``).

    Raises:
        UnknownNameError: no backend of that name.
        ConfigError: ``kwargs`` that the backend does not take, or lacks one it needs.
    """
    backend = CHAT_MODELS.get(name)
    try:
        return backend(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"chat model {name!r} does not fit the arguments {sorted(kwargs)} ({exc}); set "
            "model.kwargs to what the backend takes (see `medshield list chat-models`)"
        ) from None
