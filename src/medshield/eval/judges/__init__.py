"""Judges of model responses (registered in :data:`medshield.registry.JUDGES`): ``keyword``,
``embedding`` and ``llm``, the labelled response set, and :func:`judge_agreement`."""

from medshield.eval.judges.base import (
    LABELS,
    Agreement,
    Judge,
    LabelledResponse,
    Verdict,
    check_pairs,
    create_judge,
    judge_agreement,
    labelled_set_path,
    load_labelled_responses,
)
from medshield.eval.judges.embedding import EmbeddingJudge
from medshield.eval.judges.keyword import KeywordJudge, refusal_match
from medshield.eval.judges.llm import LLMJudge, parse_label

__all__ = [
    "LABELS",
    "Agreement",
    "EmbeddingJudge",
    "Judge",
    "KeywordJudge",
    "LLMJudge",
    "LabelledResponse",
    "Verdict",
    "check_pairs",
    "create_judge",
    "judge_agreement",
    "labelled_set_path",
    "load_labelled_responses",
    "parse_label",
    "refusal_match",
]
