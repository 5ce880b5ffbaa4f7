"""Text attacks: bounded word substitution on captions and questions (TextAttack-style parts)."""

from medshield.attacks.text.lexicon import LEXICON, candidates
from medshield.attacks.text.word_substitution import (
    DEFAULT_PROTECTED,
    AttackResult,
    Edit,
    EmbeddingDistanceGoal,
    GreedySearch,
    LexiconSubstitution,
    MaxEdits,
    MiniLMEncoder,
    NoRepeatPosition,
    SemanticSimilarity,
    Sentence,
    WordSubstitutionAttack,
)

__all__ = [
    "DEFAULT_PROTECTED",
    "LEXICON",
    "AttackResult",
    "Edit",
    "EmbeddingDistanceGoal",
    "GreedySearch",
    "LexiconSubstitution",
    "MaxEdits",
    "MiniLMEncoder",
    "NoRepeatPosition",
    "SemanticSimilarity",
    "Sentence",
    "WordSubstitutionAttack",
    "candidates",
]
