"""Inference-time defenses against harmful clinical requests and jailbreaks (docs/design.md).

Synthetic demonstrations (:mod:`~medshield.defense.images`, :mod:`~medshield.defense.text`,
:mod:`~medshield.defense.synthesizer`), selection strategies
(:mod:`~medshield.defense.selection`) and the registered defenses
(:mod:`~medshield.defense.baselines`), registered in :data:`medshield.registry.DEFENSES`.
"""

from medshield.defense.baselines import (
    AdaShieldStatic,
    Defense,
    DemonstrationDefense,
    NoDefense,
    RealImageDemonstrationDefense,
    SelfReminder,
    create_defense,
)
from medshield.defense.images import CHANNELS, synthesize_batch, synthesize_image
from medshield.defense.selection import (
    STRATEGIES,
    MiniLMEmbedder,
    SelectionStrategy,
    create_strategy,
)
from medshield.defense.synthesizer import (
    Demonstration,
    DemoSynthesizer,
    assert_disjoint,
    find_identifiers,
    normalise_text,
    paraphrase_demonstrations,
    to_messages,
)
from medshield.defense.text import (
    BENIGN_TOPICS,
    HARM_CATEGORIES,
    benign_pair,
    harmful_pair,
    paraphrase,
)

__all__ = [
    "BENIGN_TOPICS",
    "CHANNELS",
    "HARM_CATEGORIES",
    "STRATEGIES",
    "AdaShieldStatic",
    "Defense",
    "DemoSynthesizer",
    "Demonstration",
    "DemonstrationDefense",
    "MiniLMEmbedder",
    "NoDefense",
    "RealImageDemonstrationDefense",
    "SelectionStrategy",
    "SelfReminder",
    "assert_disjoint",
    "benign_pair",
    "create_defense",
    "create_strategy",
    "find_identifiers",
    "harmful_pair",
    "normalise_text",
    "paraphrase",
    "paraphrase_demonstrations",
    "synthesize_batch",
    "synthesize_image",
    "to_messages",
]
