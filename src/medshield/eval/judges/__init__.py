"""Judges of model answers (registered in :data:`medshield.registry.JUDGES`): ``keyword``,
``embedding`` and ``llm``, each saying ``harmful_compliance``, ``refusal`` or ``non_answer``; the
labelled set of real answers, and :func:`judge_agreement`."""

from medshield.eval.judges.base import (
    LABELS,
    Agreement,
    Judge,
    Judgement,
    LabelledAnswer,
    Verdict,
    agreement,
    check_pairs,
    create_judge,
    judge_agreement,
    labelled_set_path,
    load_labelled_answers,
)
from medshield.eval.judges.embedding import EmbeddingJudge
from medshield.eval.judges.keyword import KeywordJudge, keyword_judgement
from medshield.eval.judges.llm import LLMJudge, parse_label

__all__ = [
    "LABELS",
    "Agreement",
    "EmbeddingJudge",
    "Judge",
    "Judgement",
    "KeywordJudge",
    "LLMJudge",
    "LabelledAnswer",
    "Verdict",
    "agreement",
    "check_pairs",
    "create_judge",
    "judge_agreement",
    "keyword_judgement",
    "labelled_set_path",
    "load_labelled_answers",
    "parse_label",
]
