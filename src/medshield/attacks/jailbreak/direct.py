"""The direct baseline: the harmful request as it is, with its image."""

from __future__ import annotations

import random
from typing import ClassVar

from medshield.attacks.jailbreak.base import JailbreakAttack, Kind
from medshield.models.chat import Conversation, ImageLike, Message
from medshield.registry import JAILBREAKS


@JAILBREAKS.register("direct", "no jailbreak: the harmful request sent as it is (the baseline)")
class DirectRequest(JailbreakAttack):
    """No attack: one user turn with the request verbatim and its images.

    The baseline every jailbreak is compared with (the "direct" rows of MedSafetyBench,
    Han et al. 2024, https://arxiv.org/abs/2403.03744, and of JailbreakBench, Chao et al. 2024,
    https://arxiv.org/abs/2404.01318).
    """

    kind: ClassVar[Kind] = "text"
    default: ClassVar[int] = 1
    paper: ClassVar[str] = "baseline (no jailbreak)"
    url: ClassVar[str] = ""
    description: ClassVar[str] = "the harmful request as it is"

    def build(self, request: str, images: list[ImageLike], rng: random.Random) -> Conversation:
        return [Message("user", request, list(images))]
