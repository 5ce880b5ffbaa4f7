"""Run kinds a report knows, each recognised from the content of ``results.json``.

A kind claims the top-level ``results.json`` keys it renders and turns them into sections. One
run may hold several (a pretraining run: ``pretrain`` and ``evaluate``); keys no kind claims end
up in a generic table of numbers (see :mod:`medshield.report.kinds.generic`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medshield.report.rundir import RunData
from medshield.report.view import Section


@dataclass(frozen=True)
class Kind:
    """A run kind.

    Attributes:
        name: shown in the report header.
        claims: ``results -> keys`` it renders (empty: not this kind).
        sections: ``run -> sections`` of the report.
    """

    name: str
    claims: Callable[[dict[str, Any]], list[str]]
    sections: Callable[[RunData], list[Section]]


def kinds() -> list[Kind]:
    """Every known kind, in the order their sections appear."""
    # imported here: the kind modules import Kind from this package
    from medshield.report.kinds import defense, demo, evaluate, finetune, noise, redteam

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
