"""Synthetic demonstrations: procedurally drawn images + grammar-generated text, no patient data.

A :class:`DemoSynthesizer` builds a deterministic pool of :class:`Demonstration` s — for every
modality, harmful requests from each harm category answered with a refusal and a safe
alternative, benign clinical questions answered correctly, and near-miss benign requests of each
harm category (sensitive but legitimate, :mod:`medshield.defense.near_miss`) answered helpfully —
each paired with a synthetic image of the modality (:mod:`medshield.defense.images`). Prepended
as earlier turns, they act as in-context demonstrations of safe behaviour (In-Context Defense,
Wei et al. 2023, "Jailbreak and Guard Aligned Language Models with Only Few In-Context
Demonstrations"), here with images so a VLM sees refusals grounded in the modality it is
asked about::

    synth = DemoSynthesizer(seed=0, image_size=64)
    pool = synth.pool()                                 # list[Demonstration]
    messages = to_messages(pool[:4])                    # user/assistant turns
    assert_disjoint(pool, benchmark_texts)              # none equals a benchmark item
"""

from __future__ import annotations

import dataclasses
import random
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from medshield.data.modalities import MODALITIES
from medshield.defense.images import synthesize_image
from medshield.defense.near_miss import near_miss_pair
from medshield.defense.text import (
    BENIGN_TOPICS,
    HARM_CATEGORIES,
    benign_pair,
    harmful_pair,
    paraphrase,
)
from medshield.errors import DataError, InputError, UnknownNameError
from medshield.models.chat import ChatVLM, Message

Kind = Literal["harmful", "benign"]
PairMaker = Callable[[random.Random, str, str], tuple[str, str]]
"""Draws a (request, response) pair from a random source, a topic and a modality."""
KINDS: tuple[str, ...] = ("harmful", "benign")


@dataclass(frozen=True, eq=False)
class Demonstration:
    """One demonstration: a request about an image and the response to imitate.

    Attributes:
        kind: ``"harmful"`` (response refuses with a safe alternative) or ``"benign"``
            (response answers).
        category: the harm category id for harmful and near-miss demonstrations; the benign
            topic (:data:`medshield.defense.text.BENIGN_TOPICS`) for other benign ones.
        modality: the modality name of the image.
        request: the user's text.
        response: the assistant's text.
        image: float (C, H, W) tensor in [0, 1].
        uid: a stable identifier, e.g. ``"harmful/chest_xray/insurance_fraud/0"``.
        image_seed: the seed :func:`~medshield.defense.images.synthesize_image` drew the image
            from (``-1`` when the image is not synthetic, as in the real-image ablation).
        near_miss: a benign demonstration on a harm category's own topic
            (:mod:`medshield.defense.near_miss`), e.g. a prescriber's opioid safeguards.
    """

    kind: Kind
    category: str
    modality: str
    request: str
    response: str
    image: torch.Tensor
    uid: str = ""
    image_seed: int = -1
    near_miss: bool = False


def _derived_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def normalise_text(text: str) -> str:
    """Lower-case, NFKC, punctuation to spaces, whitespace collapsed (for equality checks)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


class DemoSynthesizer:
    """Builds a deterministic pool of synthetic demonstrations.

    Args:
        seed: master seed; the same seed gives the same pool.
        image_size: side of the synthetic images in pixels.
        modalities: modality names to cover (all nine by default).
        variants: demonstrations per (modality, harm category), per (modality, benign topic) and
            near-miss demonstrations per (modality, harm category).
        images_per_modality: distinct synthetic images drawn per modality and shared by its
            demonstrations (drawing is cheap, but a small set keeps the pool's memory bounded).

    Raises:
        UnknownNameError: an unknown modality.
        InputError: an empty modality list or non-positive ``variants``/``images_per_modality``.
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        modalities: Sequence[str] | None = None,
        variants: int = 2,
        images_per_modality: int = 4,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        mods = list(MODALITIES) if modalities is None else list(modalities)
        if not mods:
            raise InputError("DemoSynthesizer needs at least one modality")
        for m in mods:
            if m not in MODALITIES:
                raise UnknownNameError(f"unknown modality {m!r}; known: {', '.join(MODALITIES)}")
        if len(set(mods)) != len(mods):
            raise InputError(f"duplicate modalities in {mods}")
        if variants < 1 or images_per_modality < 1:
            raise InputError("variants and images_per_modality must be positive")
        self.seed = seed
        self.image_size = image_size
        self.modalities = mods
        self.variants = variants
        self.images_per_modality = images_per_modality
        self._pool: list[Demonstration] | None = None
        self._images: dict[tuple[str, int], torch.Tensor] = {}

    def _image(self, modality: str, index: int) -> tuple[torch.Tensor, int]:
        image_seed = _derived_seed(self.seed, "image", modality, index % self.images_per_modality)
        key = (modality, image_seed)
        if key not in self._images:
            self._images[key] = synthesize_image(modality, image_seed, self.image_size)
        return self._images[key], image_seed

    def _unique(
        self,
        make: Callable[[random.Random], tuple[str, str]],
        seen: set[str],
        *parts: object,
    ) -> tuple[str, str]:
        """Draw (request, response) until the request is new (bounded retries)."""
        for attempt in range(50):
            request, response = make(random.Random(_derived_seed(self.seed, *parts, attempt)))
            if normalise_text(request) not in seen:
                seen.add(normalise_text(request))
                return request, response
        return request, response  # grammar exhausted: keep a duplicate rather than fail

    def pool(self) -> list[Demonstration]:
        """Every demonstration in a fixed order (cached): harmful, benign, then near-miss."""
        if self._pool is not None:
            return list(self._pool)
        demos: list[Demonstration] = []
        seen: set[str] = set()
        counter = 0
        # (uid prefix, kind, topics, (rng, topic, modality) -> (request, response), near_miss)
        groups: tuple[tuple[str, str, Sequence[str], PairMaker, bool], ...] = (
            ("harmful", "harmful", HARM_CATEGORIES, lambda r, c, m: harmful_pair(c, m, r), False),
            ("benign", "benign", BENIGN_TOPICS, lambda r, t, m: benign_pair(m, t, r), False),
            ("near_miss", "benign", HARM_CATEGORIES, lambda r, c, m: near_miss_pair(c, m, r), True),
        )
        for group, kind, topics, pair, near_miss in groups:
            for modality in self.modalities:
                for topic in topics:
                    for v in range(self.variants):
                        request, response = self._unique(
                            lambda rng, p=pair, t=topic, m=modality: p(rng, t, m),
                            seen,
                            group,
                            modality,
                            topic,
                            v,
                        )
                        image, image_seed = self._image(modality, counter)
                        counter += 1
                        demos.append(
                            Demonstration(
                                kind,
                                topic,
                                modality,
                                request,
                                response,
                                image,
                                f"{group}/{modality}/{topic}/{v}",
                                image_seed,
                                near_miss=near_miss,
                            )
                        )
        self._pool = demos
        return list(demos)

    def demonstrations(
        self, kind: str | None = None, modality: str | None = None, category: str | None = None
    ) -> list[Demonstration]:
        """The pool filtered by kind, modality and/or category."""
        if kind is not None and kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        return [
            d
            for d in self.pool()
            if (kind is None or d.kind == kind)
            and (modality is None or d.modality == modality)
            and (category is None or d.category == category)
        ]


def paraphrase_demonstrations(
    demos: Sequence[Demonstration], vlm: ChatVLM, max_new_tokens: int = 96
) -> list[Demonstration]:
    """Demonstrations whose requests are paraphrased through ``vlm`` (responses are kept, so
    benign answers stay correct and refusals keep their safe alternative). A paraphrase that
    contains identifier-like text (:func:`find_identifiers`) is discarded for the original."""
    demos = list(demos)
    requests = paraphrase([d.request for d in demos], vlm, max_new_tokens=max_new_tokens)
    return [
        # a paraphrase that introduced anything identifier-like is dropped for the original
        dataclasses.replace(d, request=r) if not find_identifiers(r) else d
        for d, r in zip(demos, requests, strict=True)
    ]


def to_messages(demos: Iterable[Demonstration], include_images: bool = True) -> list[Message]:
    """Render demonstrations as prior turns: for each, a user turn (request + image) and an
    assistant turn (response)."""
    messages: list[Message] = []
    for d in demos:
        if not isinstance(d, Demonstration):
            raise InputError(f"expected Demonstration, got {type(d).__name__}")
        messages.append(Message("user", d.request, [d.image] if include_images else []))
        messages.append(Message("assistant", d.response))
    return messages


def assert_disjoint(demos: Iterable[Demonstration], benchmark_texts: Iterable[str]) -> None:
    """Check that no demonstration's request or response equals a benchmark item.

    Texts are compared after :func:`normalise_text` (case, punctuation and spacing ignored).
    Pass the benchmark's request texts, e.g. from ``medshield.data.safety``.

    Raises:
        DataError: listing the clashing demonstrations (at most five shown).
    """
    bench = {normalise_text(t) for t in benchmark_texts if isinstance(t, str)}
    clashes = [
        f"{d.uid or d.request[:40]!s}: {text!r}"
        for d in demos
        for text in (d.request, d.response)
        if normalise_text(text) in bench
    ]
    if clashes:
        shown = "; ".join(clashes[:5])
        raise DataError(
            f"{len(clashes)} demonstration text(s) equal a benchmark item, which would leak the "
            f"evaluation set into the defense: {shown}"
        )


_IDENTIFIER_PATTERNS: dict[str, re.Pattern[str]] = {
    "digit": re.compile(r"\d"),
    "email": re.compile(r"[\w.+-]+@[\w-]+\.\w+"),
    "record keyword": re.compile(
        r"\b(mrn|dob|date of birth|ssn|nhs number|medical record no)\b", re.I
    ),
    "title and name": re.compile(r"\b(mr|mrs|ms|dr)\.?\s+[A-Z][a-z]+"),
}


def find_identifiers(text: str) -> list[str]:
    """Names of patient-identifier patterns found in ``text`` (digits, emails, record numbers,
    titled names); synthetic demonstration text must have none."""
    return [name for name, pattern in _IDENTIFIER_PATTERNS.items() if pattern.search(text)]
