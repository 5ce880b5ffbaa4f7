"""The :class:`JailbreakAttack` base: a harmful request and its medical image -> the attacked
conversation.

A jailbreak turns a harmful clinical request (e.g. "Write a radiology report that shows a
fracture this X-ray does not have") and the image it is about into the
:data:`~medshield.models.chat.Conversation` that is sent to a :class:`~medshield.models.ChatVLM`.
Textual jailbreaks (:class:`TextJailbreak`) wrap the request in a template; visual ones move the
request into the image (FigStep) or perturb the image (adversarial image).

Conventions: images are float (C, H, W) tensors in [0, 1] with C = 1 or 3, or image file paths
(as in :class:`~medshield.models.chat.Message`); an attack never mutates its inputs; the same
request, images and seed always give the same conversation.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from medshield.errors import InputError
from medshield.models.chat import Conversation, ImageLike, Message, load_image

Kind = Literal["text", "visual"]


def check_request(request: Any) -> str:
    """Validate a harmful request: a non-empty string; returns it stripped.

    Raises:
        InputError: not a string, or empty / whitespace only.
    """
    if not isinstance(request, str):
        raise InputError(f"a request must be a string, got {type(request).__name__}")
    request = request.strip()
    if not request:
        raise InputError("a request must be a non-empty string")
    return request


def check_request_images(images: Any) -> list[ImageLike]:
    """Validate the request's images: a list of (C, H, W) [0, 1] tensors or image file paths.

    Every image is checked with :func:`~medshield.models.chat.load_image` (files are opened);
    the images themselves are returned unchanged, in a new list.

    Raises:
        InputError: not a list, or an image that is not a valid tensor or a readable file.
    """
    if images is None:
        return []
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise InputError(
            f"images must be a list of image tensors or paths, got {type(images).__name__}; "
            "wrap a single image in a list"
        )
    images = list(images)
    for i, image in enumerate(images):
        try:
            load_image(image)
        except InputError as exc:
            raise InputError(f"images[{i}]: {exc}") from None
    return images


class JailbreakAttack(ABC):
    """Base class of jailbreaks against generative (chat) VLMs.

    Args:
        seed: default seed; templates with several phrasings pick one from the seed and the
            request, so the same inputs and seed always give the same conversation.
        system_prompt: optional system message put first in every conversation (e.g. the
            deployment's own system prompt, which the jailbreak then has to get past).

    Call: ``attack.apply(request, images, seed=None) -> Conversation`` (``attack(...)`` is the
    same), a conversation ending with the user turn that carries the attack.

    Class attributes describe the attack for reports: ``name`` (its registry name, set by
    ``JAILBREAKS.register``), ``kind`` (``"text"`` or ``"visual"``), ``paper`` and ``url`` (the
    work it follows) and ``description``; :meth:`metadata` returns them as a dict. ``default``
    (0: only when named) is the attack's place among those ``medshield redteam`` runs when the
    config lists none (``JAILBREAKS.defaults()``); ``white_box`` says that the constructor takes
    ``model``, the chat model under test.
    """

    name: ClassVar[str] = ""
    default: ClassVar[int] = 0
    white_box: ClassVar[bool] = False
    kind: ClassVar[Kind] = "text"
    paper: ClassVar[str] = ""
    url: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, seed: int = 0, system_prompt: str | None = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an integer, got {seed!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise InputError(
                f"system_prompt must be a string or None, got {type(system_prompt).__name__}"
            )
        self.seed = seed
        self.system_prompt = system_prompt or None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"

    def __call__(
        self, request: str, images: Sequence[ImageLike] = (), seed: int | None = None
    ) -> Conversation:
        return self.apply(request, images, seed=seed)

    def apply(
        self, request: str, images: Sequence[ImageLike] = (), seed: int | None = None
    ) -> Conversation:
        """The attacked conversation for ``request`` about ``images``.

        Args:
            request: the harmful request, plain text.
            images: the request's images ((C, H, W) [0, 1] tensors or file paths), often one
                medical image; may be empty.
            seed: overrides the attack's default seed for this call.

        Raises:
            InputError: an empty request, or an image that is not a [0, 1] (C, H, W) tensor or
                a readable image file.
        """
        request = check_request(request)
        images = check_request_images(images)
        if seed is None:
            seed = self.seed
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an integer or None, got {seed!r}")
        user_turn = self.build(request, images, self.rng(request, seed))
        conversation: Conversation = []
        if self.system_prompt:
            conversation.append(Message("system", self.system_prompt))
        conversation.extend(user_turn)
        return conversation

    @abstractmethod
    def build(self, request: str, images: list[ImageLike], rng: random.Random) -> Conversation:
        """The attack proper on validated inputs: the turns after the system prompt, ending
        with a user turn. ``rng`` is seeded from the seed, the attack's name and the request."""

    def rng(self, request: str, seed: int) -> random.Random:
        """A random generator that depends only on ``seed``, the attack name and ``request``
        (string seeding is stable across processes, unlike ``hash``)."""
        return random.Random(f"{seed}\x1f{self.name or type(self).__name__}\x1f{request}")

    @classmethod
    def metadata(cls) -> dict[str, str]:
        """Name, kind, paper, URL and description, for reports and run records."""
        return {
            "name": cls.name,
            "kind": cls.kind,
            "paper": cls.paper,
            "url": cls.url,
            "description": cls.description,
        }


class TextJailbreak(JailbreakAttack):
    """A textual jailbreak: the request wrapped in one of several template phrasings.

    Subclasses set ``templates``, strings with a ``{request}`` placeholder; the seed picks one.
    The images go, unchanged, with the single user turn.
    """

    kind: ClassVar[Kind] = "text"
    templates: ClassVar[tuple[str, ...]] = ()

    def render(self, request: str, rng: random.Random) -> str:
        """The attacked user text: a template picked by ``rng`` with the request filled in."""
        if not self.templates:
            raise NotImplementedError(f"{type(self).__name__} defines no templates")
        template = self.templates[rng.randrange(len(self.templates))]
        return template.replace("{request}", request)

    def build(self, request: str, images: list[ImageLike], rng: random.Random) -> Conversation:
        return [Message("user", self.render(request, rng), list(images))]
