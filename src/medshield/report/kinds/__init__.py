"""The renderers of each run kind.

A run's ``results.json`` names its kind (:data:`medshield.runs.RunKind`), and :func:`renderers`
picks that kind's renderers from :data:`RENDERERS`. A renderer (a :class:`Kind`) claims the
top-level ``results.json`` keys it renders and turns them into sections; one kind may have
several (a pretraining run: ``pretrain`` and ``evaluate``). Keys no renderer claims end up in a
generic table of numbers (see :mod:`medshield.report.kinds.generic`).

Runs written before ``results.json`` had a ``kind`` are recognised by the shape of their
results: every renderer is tried, and each claims what it recognises. This fallback is for
those old files only; every run medshield writes now names its kind.
"""

from __future__ import annotations

from typing import Any

from medshield.report.kinds import defense, demo, evaluate, finetune, noise, redteam
from medshield.report.view import Kind
from medshield.runs import RunKind

RENDERERS: dict[RunKind, tuple[Kind, ...]] = {
    "pretrain": (evaluate.PRETRAIN, evaluate.EVALUATE),
    "evaluate": (evaluate.EVALUATE,),
    "craft-noise": (),
    "train-vlm": (),
    "finetune": (finetune.RUN_KIND,),
    "redteam": (redteam.KIND,),
    "study-noise": (noise.KIND,),
    "study-finetune": (finetune.KIND,),
    "study-defense": (defense.KIND,),
    "demo": (demo.KIND,),
}
"""Each run kind's renderers, in the order their sections appear (none: the generic table)."""


def kinds() -> list[Kind]:
    """Every renderer, in the order their sections appear (the fallback for old runs)."""
    return [
        demo.KIND,
        evaluate.PRETRAIN,
        evaluate.EVALUATE,
        noise.KIND,
        finetune.RUN_KIND,
        finetune.KIND,
        redteam.KIND,
        defense.KIND,
    ]


def renderers(results: dict[str, Any]) -> list[Kind]:
    """The renderers of a run: its kind's, every renderer when ``results`` names no kind (a run
    written before runs named their kind), none for a kind this version does not know."""
    kind = results.get("kind")
    if kind is None:
        return kinds()
    return list(RENDERERS.get(kind, ()))
