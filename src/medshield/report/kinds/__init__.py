"""Run kinds a report knows, each recognised from the content of ``results.json``.

A kind claims the top-level ``results.json`` keys it renders and turns them into sections. One
run may hold several (a pretraining run: ``pretrain`` and ``evaluate``); keys no kind claims end
up in a generic table of numbers (see :mod:`medshield.report.kinds.generic`).
"""

from __future__ import annotations

from medshield.report.kinds import defense, demo, evaluate, finetune, noise, redteam
from medshield.report.view import Kind


def kinds() -> list[Kind]:
    """Every known kind, in the order their sections appear."""
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
