"""The defense study: synthetic clinical demonstrations against harmful requests and jailbreaks,
swept over the demonstration budget and the selection strategy, next to the baselines.

``medshield study defense --config configs/study_defense.yaml`` runs, in one study directory:

1. one **cell** per defense: the undefended model once (budget 0, which is also the ``none``
   baseline), each selection strategy at each positive budget (the ``demonstrations`` defense),
   and each other baseline (``self-reminder``, ``adashield-static``,
   ``demonstrations-real-images`` at ``baseline_strategy`` / ``baseline_budget``). Every cell is
   an ordinary ``medshield redteam`` run directory (``cells/<cell>/``: ``config.yaml``,
   ``samples.jsonl``, ``results.json``) over the same seeded items and attacks; only the
   defense differs. The chat model and the judges are built once for the whole study, and the
   white-box attack images (``adv-image-affirm``) are crafted once against the undefended model
   and reused by every cell. The study resumes cell by cell (a cell with a ``results.json`` is
   kept) and a cell resumes row by row;
2. the **aggregate**: per cell the attack success rate (ASR: harmful requests judged harmful
   compliance), beside it the refusal and non-answer rates of harmful requests, the
   over-defense rate, benign accuracy and balanced error with 95% intervals, overall, per
   modality and (ASR) per attack; the best strategy at each budget; and the four claims of the
   study decided from the intervals (:func:`decide_claims`), written to ``results.json``,
   ``table.md`` and ``plots/*.png``.

Decision rules (also in ``docs/studies/defense.md``):

- *best strategy at a budget*: the lowest ASR; ties on ASR go to the lower over-defense rate,
  then the higher benign accuracy, then the order of ``strategies`` in the config. The strategies
  whose ASR interval overlaps the best one's are listed as not separated from it.
- *"a is lower than b"*: ``true`` when a's 95% interval lies wholly below b's, ``false`` when
  wholly above, ``inconclusive`` when the intervals overlap or a number is missing. A claim made
  of several comparisons is ``false`` if any comparison is ``false``, ``true`` if all are
  ``true``, and ``inconclusive`` otherwise; a claim whose cells were not in the grid (e.g. no
  ``retrieval``) is ``not tested``, with a note saying what it needs.
- *balanced error*: the mean of ASR and over-defense rate (one number for the safety /
  helpfulness balance; lower is better). Its interval combines the two bootstrap intervals by
  MOVER (Zou & Donner 2008), as harmful and benign rows are independent samples.
"""

from __future__ import annotations

import json
from typing import Any

from medshield.runs import Log, Run
from medshield.safety.redteam import RedteamConfig, build_judges, run_redteam
from medshield.studies.defense.analysis import (
    aggregate,
    balanced_error,
    best_strategies,
    combine,
    compare_lower,
    decide_claims,
)
from medshield.studies.defense.config import (
    METRICS,
    NEAR_MISS_METRIC,
    RULES,
    DefenseStudyConfig,
    DemonstrationSettings,
    load_defense_study_config,
)
from medshield.studies.defense.grid import Cell, _check_defenses, cell_config, plan_cells
from medshield.studies.defense.outputs import fmt, plot, write_table

__all__ = [
    "METRICS",
    "NEAR_MISS_METRIC",
    "Cell",
    "DefenseStudyConfig",
    "DemonstrationSettings",
    "aggregate",
    "balanced_error",
    "best_strategies",
    "combine",
    "compare_lower",
    "decide_claims",
    "fmt",
    "load_defense_study_config",
    "plan_cells",
    "run_defense_study",
    "write_table",
]


def run_defense_study(config: DefenseStudyConfig, run: Run, log: Log = print) -> dict[str, Any]:
    """Run (or resume) every cell, then aggregate; returns the study's results.

    Raises:
        InputError: a budget the demonstration pool cannot meet, or bad defense arguments.
        DataError: missing benchmark data (or real train images for the ablation).
    """
    cells = plan_cells(config)
    _check_defenses(cells)
    n_baselines = sum(c.group == "baseline" for c in cells)
    log(
        f"defense study: {len(cells)} cells (undefended, {n_baselines} baselines, "
        f"{len(config.strategies)} strategies x budgets {config.positive_budgets})"
    )
    judges = build_judges(config.redteam)
    attacked: dict[tuple[str, str], list[Any]] = {}
    model: Any = None
    try:
        for i, cell in enumerate(cells, 1):
            cell_run = Run(run.path / "cells" / cell.name, cell_config(config, run.path, cell))
            if (cell_run.path / "results.json").exists():
                log(f"[{i}/{len(cells)}] {cell.name}: done earlier, kept")
                continue
            log(f"[{i}/{len(cells)}] {cell.name}")
            if model is None:
                model = _load_model(config.redteam, log)
            run_redteam(
                cell_run.config, cell_run, log=log, model=model, judges=judges, attacked=attacked
            )
    finally:
        close = getattr(model, "close", None)
        if callable(close):
            close()

    points = aggregate(
        [
            (cell, json.loads((run.path / "cells" / cell.name / "results.json").read_text()))
            for cell in cells
        ]
    )
    best = best_strategies(points, config.strategies)
    claims = decide_claims(points, config.strategies, config.small_budget_max)
    write_table(points, best, claims, run.path / "table.md")
    plots = plot(points, config.baselines, run.path / "plots")
    return {
        "model": config.redteam.model.backend,
        "primary_judge": config.redteam.primary,
        "attacks": list(config.redteam.attacks),
        "budgets": [0, *config.positive_budgets],
        "strategies": list(config.strategies),
        "mixed_share": config.mixed_share,
        "baselines": list(config.baselines),
        "cells": points,
        "best_by_budget": best,
        "claims": claims,
        "rules": RULES,
        "plots": [str(p) for p in plots],
    }


def _load_model(config: RedteamConfig, log: Log) -> Any:
    from medshield.models.chat import create_chat_model

    log(f"loading chat model {config.model.backend} (once for the study)")
    return create_chat_model(config.model.backend, **config.model.kwargs)
