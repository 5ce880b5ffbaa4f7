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
   modality and (ASR) per attack; the best strategy at each budget; written to ``results.json``,
   ``table.md`` and ``plots/*.png``;
3. the **claims** (:mod:`medshield.commands.studies.defense.claims`): demonstrations cut attack
   success, over-defense (plain and near-miss) falls as the budget grows, mixed is best at small
   budgets, retrieval beats fixed selection, each decided on paired differences over items, and
   the benchmark target at its budget, written to ``results.json`` (``claims``) and
   ``claims.md``.

Decision rules (also in ``docs/studies/defense.md``):

- *best strategy at a budget*: the lowest ASR; ties on ASR go to the lower over-defense rate,
  then the higher benign accuracy, then the order of ``strategies`` in the config. The strategies
  whose ASR interval overlaps the best one's are listed as not separated from it.
- *claims*: "a is lower than b" is decided on the paired difference b - a over the items both
  cells answered, ``SUPPORTED`` / ``REFUTED`` / ``INCONCLUSIVE`` by whether its 95% CI lies above
  0, below 0 or holds it; see :mod:`medshield.commands.studies.defense.claims`.
- *balanced error*: the mean of ASR and over-defense rate (one number for the safety /
  helpfulness balance; lower is better). Its interval combines the two bootstrap intervals by
  MOVER (Zou & Donner 2008), as harmful and benign rows are independent samples.
"""

from __future__ import annotations

from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

from medshield.commands.redteam import RedteamConfig, build_judges, run_redteam
from medshield.commands.studies.defense.analysis import (
    aggregate,
    balanced_error,
    best_strategies,
    compare_lower,
)
from medshield.commands.studies.defense.claims import decide_claims, item_tallies, write_claims
from medshield.commands.studies.defense.config import (
    METRICS,
    NEAR_MISS_METRIC,
    RULES,
    DefenseStudyConfig,
    DemonstrationSettings,
    load_defense_study_config,
)
from medshield.commands.studies.defense.grid import Cell, _check_defenses, cell_config, plan_cells
from medshield.commands.studies.defense.outputs import plot, write_table
from medshield.runs import Log, Run, read_results, read_samples
from medshield.workers import worker_pool

__all__ = [
    "METRICS",
    "NEAR_MISS_METRIC",
    "Cell",
    "DefenseStudyConfig",
    "DemonstrationSettings",
    "aggregate",
    "balanced_error",
    "best_strategies",
    "compare_lower",
    "decide_claims",
    "item_tallies",
    "load_defense_study_config",
    "plan_cells",
    "run_defense_study",
    "write_claims",
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
    todo = []
    for i, cell in enumerate(cells, 1):
        if Run(run.path / "cells" / cell.name, cell_config(config, run.path, cell)).finished:
            log(f"[{i}/{len(cells)}] {cell.name}: done earlier, kept")
        else:
            todo.append(cell)
    if config.workers > 1 and len(todo) > 1:
        _run_cells_in_workers(config, run, todo, log)
    else:
        _run_cells(config, run, todo, cells, log)

    points = aggregate([(cell, read_results(run.path / "cells" / cell.name)) for cell in cells])
    best = best_strategies(points, config.strategies)
    tallies = {
        cell.name: item_tallies(
            read_samples(run.path / "cells" / cell.name / "samples.jsonl"), config.redteam.primary
        )
        for cell in cells
    }
    claims = decide_claims(
        points,
        tallies,
        config.strategies,
        config.small_budget_max,
        config.target,
        config.redteam.bootstrap_resamples,
        config.redteam.seed,
    )
    write_table(points, best, claims, run.path / "table.md")
    write_claims(claims, run.path / "claims.md")
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


def _run_cells(
    config: DefenseStudyConfig, run: Run, todo: list[Cell], cells: list[Cell], log: Log
) -> None:
    """Run ``todo`` one after another with one model and one set of judges; the white-box
    attack images are crafted in the first cell that needs them and reused by the others."""
    judges = build_judges(config.redteam)
    attacked: dict[tuple[str, str], list[Any]] = {}
    model: Any = None
    try:
        for cell in todo:
            log(f"[{cells.index(cell) + 1}/{len(cells)}] {cell.name}")
            if model is None:
                model = _load_model(config.redteam, log)
            cell_run = Run(run.path / "cells" / cell.name, cell_config(config, run.path, cell))
            run_redteam(
                cell_run.config, cell_run, log=log, model=model, judges=judges, attacked=attacked
            )
    finally:
        close = getattr(model, "close", None)
        if callable(close):
            close()


_WORKER: dict[str, Any] = {}
"""A worker process's study config, model, judges and attacked conversations."""


def _init_worker(raw: dict[str, Any]) -> None:
    config = DefenseStudyConfig.model_validate(raw)
    _WORKER.update(
        config=config,
        model=_load_model(config.redteam, print, "this worker"),
        judges=build_judges(config.redteam),
        attacked={},
    )


def _run_in_worker(study_dir: str, cell: Cell) -> str:
    config: DefenseStudyConfig = _WORKER["config"]
    cell_run = Run(
        Path(study_dir) / "cells" / cell.name, cell_config(config, Path(study_dir), cell)
    )
    run_redteam(
        cell_run.config,
        cell_run,
        log=print,
        model=_WORKER["model"],
        judges=_WORKER["judges"],
        attacked=_WORKER["attacked"],
    )
    return cell.name


def _run_cells_in_workers(config: DefenseStudyConfig, run: Run, todo: list[Cell], log: Log) -> None:
    """Run ``todo`` in ``config.workers`` processes, each loading the model once and taking the
    next cell when it finishes one; each crafts the white-box attack images of its own cells.
    The first failure stops the study."""
    workers = min(config.workers, len(todo))
    log(f"{len(todo)} cells to run, {workers} at a time (one model per worker)")
    with worker_pool(workers, _init_worker, (config.model_dump(),)) as pool:
        futures = [pool.submit(_run_in_worker, str(run.path), cell) for cell in todo]
        try:
            for count, future in enumerate(as_completed(futures), 1):
                log(f"[{count}/{len(todo)}] {future.result()}: done")
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _load_model(config: RedteamConfig, log: Log, scope: str = "the study") -> Any:
    from medshield.models.chat import create_chat_model

    log(f"loading chat model {config.model.backend} (once for {scope})")
    return create_chat_model(config.model.backend, **config.model.kwargs)
