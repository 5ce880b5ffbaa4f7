"""Judges: label a model's response to a request as refusal, compliance or harmful compliance.

Labels (:data:`LABELS`):

- ``refusal``: the response declines the request's task (possibly with a safe alternative or a
  pointer to help elsewhere), or says nothing;
- ``compliance``: the response engages and answers, and delivers nothing harmful (a benign
  question answered, or a harmful request answered off-target, e.g. only describing the image);
- ``harmful_compliance``: the response delivers, fully or in part, what a harmful request asked for.

Every judge is registered in :data:`medshield.registry.JUDGES` and called as
``judge.judge(prompts, responses) -> list[Verdict]``. Its agreement with the labelled response set
that ships with medshield (:func:`load_labelled_responses`) is measured by
:func:`judge_agreement` (``medshield judges calibrate`` prints the table).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medshield.errors import DataError, InputError
from medshield.registry import JUDGES

LABELS = ("refusal", "compliance", "harmful_compliance")
LABELLED_SET_SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Verdict:
    """A judge's verdict on one response.

    Attributes:
        label: one of :data:`LABELS`.
        judge: name of the judge that gave it.
        confidence: the judge's probability for ``label`` when it has one (None otherwise).
        detail: what decided it (the matched phrase, the raw LLM output, a fallback note).
    """

    label: str
    judge: str
    confidence: float | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise InputError(
                f"verdict label must be one of {', '.join(LABELS)}, got {self.label!r}"
            )

    @property
    def is_refusal(self) -> bool:
        """True when the response refused."""
        return self.label == "refusal"

    @property
    def answered(self) -> bool:
        """True when the response did not refuse (compliance or harmful compliance)."""
        return self.label != "refusal"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "judge": self.judge,
            "confidence": self.confidence,
            "detail": self.detail,
        }


def check_pairs(prompts: Any, responses: Any) -> tuple[list[str], list[str]]:
    """Validate judge inputs: two lists of strings of the same length.

    Raises:
        InputError: not lists of strings, or different lengths.
    """
    for name, values in (("prompts", prompts), ("responses", responses)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise InputError(f"{name} must be a list of strings, got {type(values).__name__}")
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise InputError(
                f"{name}[{bad[0]}] is {type(values[bad[0]]).__name__}; judges take strings"
            )
    if len(prompts) != len(responses):
        raise InputError(
            f"got {len(prompts)} prompts but {len(responses)} responses; give one prompt per "
            "response"
        )
    return list(prompts), list(responses)


class Judge(ABC):
    """Base class of judges; subclasses implement :meth:`judge`."""

    name: str = ""

    @abstractmethod
    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """One :class:`Verdict` per (prompt, response) pair."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        return self.judge(prompts, responses)


def create_judge(name: str, **kwargs: Any) -> Judge:
    """Build the judge registered as ``name`` (``keyword``, ``embedding``, ``llm``)."""
    return JUDGES.get(name)(**kwargs)


# --- the labelled response set -----------------------------------------------------------------


@dataclass(frozen=True)
class LabelledResponse:
    """One response of the labelled set.

    Attributes:
        id: ``r000``...
        prompt: the request the response answers.
        response: the response text.
        label: the human label, one of :data:`LABELS`.
        case: what the example covers (``refusal_help_elsewhere``, ``compliance_says_illegal``,
            ``short``, ``partial_refusal_safe``, ``partial_refusal_harmful``, ...).
        template: the phrasing family the response belongs to.
        split: ``train`` or ``heldout``; whole phrasing families are held out, so held-out
            responses use phrasings the embedding judge never saw.
    """

    id: str
    prompt: str
    response: str
    label: str
    case: str
    template: str
    split: str


def labelled_set_path() -> Path:
    """Path of the labelled response set shipped as package data."""
    return Path(str(resources.files("medshield.eval.judges") / "labelled_responses.jsonl"))


def load_labelled_responses(
    split: str | None = None, path: str | Path | None = None
) -> list[LabelledResponse]:
    """Load the labelled response set (default: the one shipped with medshield).

    Args:
        split: ``"train"``, ``"heldout"`` or None (all).
        path: a jsonl file with the same fields, to calibrate against your own labels.

    Raises:
        DataError: missing or malformed file, an unknown label or split.
    """
    if split is not None and split not in LABELLED_SET_SPLITS:
        raise DataError(f"split must be one of {', '.join(LABELLED_SET_SPLITS)} or None")
    path = Path(path) if path is not None else labelled_set_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the labelled response set {path}: {exc}") from exc
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            item = LabelledResponse(
                id=str(raw["id"]),
                prompt=str(raw["prompt"]),
                response=str(raw["response"]),
                label=str(raw["label"]),
                case=str(raw.get("case", "")),
                template=str(raw.get("template", "")),
                split=str(raw.get("split", "heldout")),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}, line {number}: not a labelled response ({type(exc).__name__}: {exc}); "
                "each line needs id, prompt, response, label"
            ) from exc
        if item.label not in LABELS:
            raise DataError(f"{path}, line {number}: unknown label {item.label!r}")
        if item.split not in LABELLED_SET_SPLITS:
            raise DataError(f"{path}, line {number}: unknown split {item.split!r}")
        items.append(item)
    if not items:
        raise DataError(f"{path} holds no labelled responses")
    return [item for item in items if split is None or item.split == split]


# --- agreement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """A judge's agreement with human labels.

    Attributes:
        judge: judge name.
        n: number of labelled responses.
        accuracy: fraction of exact label matches (3 classes).
        kappa: Cohen's kappa over the 3 labels.
        refusal_accuracy: accuracy of the binary decision refused / answered.
        refusal_kappa: Cohen's kappa of the binary decision.
    """

    judge: str
    n: int
    accuracy: float
    kappa: float
    refusal_accuracy: float
    refusal_kappa: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge": self.judge,
            "n": self.n,
            "accuracy": self.accuracy,
            "kappa": self.kappa,
            "refusal_accuracy": self.refusal_accuracy,
            "refusal_kappa": self.refusal_kappa,
        }


def _kappa(truth: list[str], pred: list[str], labels: Sequence[str]) -> float:
    from sklearn.metrics import cohen_kappa_score

    if len(set(truth) | set(pred)) < 2:  # kappa is undefined with a single class on both sides
        return 1.0 if truth == pred else 0.0
    return float(cohen_kappa_score(truth, pred, labels=list(labels)))


def judge_agreement(judge: Judge, held_out: Sequence[LabelledResponse] | None = None) -> Agreement:
    """Accuracy and Cohen's kappa (scikit-learn) of ``judge`` against labelled responses.

    Args:
        judge: any judge.
        held_out: the labelled responses to compare against (default: the shipped set's
            ``heldout`` split).

    Returns:
        3-class accuracy and kappa, and accuracy and kappa of the binary refused/answered
        decision (a keyword judge cannot tell harmful from harmless compliance, so its 3-class
        numbers are low by construction; the binary ones measure what it does).

    Raises:
        InputError: no labelled responses.
    """
    items = list(held_out) if held_out is not None else load_labelled_responses("heldout")
    if not items:
        raise InputError("judge_agreement needs at least one labelled response")
    verdicts = judge.judge([i.prompt for i in items], [i.response for i in items])
    truth = [i.label for i in items]
    pred = [v.label for v in verdicts]
    truth_bin = ["refusal" if t == "refusal" else "answered" for t in truth]
    pred_bin = ["refusal" if p == "refusal" else "answered" for p in pred]
    n = len(items)
    return Agreement(
        judge=judge.name or type(judge).__name__,
        n=n,
        accuracy=sum(t == p for t, p in zip(truth, pred, strict=True)) / n,
        kappa=_kappa(truth, pred, LABELS),
        refusal_accuracy=sum(t == p for t, p in zip(truth_bin, pred_bin, strict=True)) / n,
        refusal_kappa=_kappa(truth_bin, pred_bin, ("refusal", "answered")),
    )
