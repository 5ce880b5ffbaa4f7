"""The defense study's grid: one :class:`Cell` per defense, and each cell's red-teaming config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medshield.commands.redteam import DefenseConfig, RedteamConfig
from medshield.commands.studies.defense.config import REAL_IMAGES, DefenseStudyConfig


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``group`` is ``undefended`` (k 0), ``strategy`` (the
    ``demonstrations`` defense at ``strategy`` and budget ``k``) or ``baseline``; ``kwargs`` are
    the defense's arguments."""

    name: str
    group: Literal["undefended", "strategy", "baseline"]
    defense: str
    strategy: str | None = None
    k: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _demo_kwargs(config: DefenseStudyConfig, strategy: str, k: int) -> dict[str, Any]:
    kwargs = {"strategy": strategy, "k": k, **config.demonstrations.model_dump()}
    if strategy == "mixed":
        kwargs["share"] = config.mixed_share
    return kwargs


def plan_cells(config: DefenseStudyConfig) -> list[Cell]:
    """Every cell in run order: the undefended model, the baselines, then budget by budget
    (ascending) each strategy, so a study stopped early still covers every strategy at the
    small budgets."""
    cells = [Cell("undefended", "undefended", "none", k=0)]
    for name in config.baselines:
        if name == "none":
            continue  # the undefended cell
        kwargs = dict(config.baseline_kwargs.get(name, {}))
        if name == REAL_IMAGES:
            kwargs = {
                **_demo_kwargs(config, config.baseline_strategy, config.baseline_budget),
                "data_dir": config.redteam.data_dir,
                **kwargs,
            }
        cells.append(
            Cell(
                f"baseline_{name}",
                "baseline",
                name,
                kwargs.get("strategy"),
                kwargs.get("k"),
                kwargs,
            )
        )
    for k in config.positive_budgets:
        for strategy in config.strategies:
            cells.append(
                Cell(
                    f"{strategy}_k{k}",
                    "strategy",
                    "demonstrations",
                    strategy,
                    k,
                    _demo_kwargs(config, strategy, k),
                )
            )
    return cells


def cell_config(config: DefenseStudyConfig, study_dir: Path, cell: Cell) -> RedteamConfig:
    """The cell's red-teaming config: the shared one with the cell's name and defense."""
    return config.redteam.model_copy(
        update={
            "name": cell.name,
            "output_dir": str(study_dir / "cells"),
            "defense": DefenseConfig(name=cell.defense, kwargs=dict(cell.kwargs)),
        },
        deep=True,
    )


def _check_defenses(cells: list[Cell]) -> None:
    """Build each baseline and each strategy at its largest budget once, so a budget the
    demonstration pool cannot meet (or a bad baseline argument) fails before the model loads."""
    from medshield.defense import create_defense

    largest: dict[str | None, Cell] = {}
    for cell in cells:
        if cell.group == "strategy":
            largest[cell.strategy] = cell  # cells run budget-ascending
    for cell in [c for c in cells if c.group == "baseline"] + list(largest.values()):
        create_defense(cell.defense, **cell.kwargs)
