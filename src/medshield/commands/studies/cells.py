"""Running a fine-tuning study's cells: the worker pool's schedule (:func:`run_cells`) and
reusing the finished cells of other studies (:func:`reuse_cells`, the study's ``reuse_from``).

A study that extends another (more methods, RAN's ablations, more seeds) need not train again
what that one has: a cell of its own whose ``medshield finetune`` config is the same as a
finished cell of a ``reuse_from`` study (the same checkpoint, method, task, seed, data, budget,
learning rate or pick, and evaluation; the device and precision aside, as on resuming) is
copied into its ``cells/`` and recorded in its ``samples.jsonl`` with ``reused_from``, not run.
A copied cell is a finished cell like any other: the study's tables, targets and plots read
it as they read the cells it runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from medshield.commands.finetune import run_finetune
from medshield.commands.finetune.config import FineTuneRunConfig
from medshield.runs import RESULTS_FILE, Log, Run, holds_finished_run
from medshield.workers import worker_pool

CellKey = tuple[str, str, str, int]
"""A cell: (checkpoint label, method label, task, seed)."""


def run_cell(raw: dict[str, Any], path: str, log: Log | None = None) -> None:
    """Run (or resume) one cell: a ``medshield finetune`` run in ``path``. Without ``log``
    (in a worker process) it is silent: the study reports each cell as it finishes."""
    cfg = FineTuneRunConfig.model_validate(raw)
    cell_run = Run(Path(path), cfg)
    result = run_finetune(cfg, cell_run, log=log or (lambda _: None), progress=log is not None)
    cell_run.finish(result, kind="finetune", seed=cfg.seed)


def run_cells(
    todo: list[CellKey],
    waits_for: Callable[[CellKey], CellKey | None],
    build: Callable[[CellKey], FineTuneRunConfig],
    cells_dir: Path,
    workers: int,
    log: Log,
    run: Callable[..., None] = run_cell,
) -> Iterator[FineTuneRunConfig]:
    """Run the cells ``todo`` in their order with ``run`` (:func:`run_cell`; a module-level
    function, for the worker processes), yielding each as it finishes; the first failure stops
    the study. A cell starts once the cell it ``waits_for`` (if that one is in ``todo``) has
    finished, and its config is built only then (it may read that cell's results). With
    several workers, one pool of processes runs every cell of the study: a freed worker takes
    the first cell of ``todo`` that waits for nothing unfinished, so cells start in their order
    as far as their waits allow (a study cut short has the earliest seeds done)."""
    if workers == 1 or len(todo) <= 1:
        for key in todo:  # the order puts every cell after the one it waits for
            cfg = build(key)
            log(f"{cfg.name} ...")
            run(cfg.model_dump(), str(cells_dir / cfg.name), log)
            yield cfg
        return
    waiting, needs = list(todo), {key: waits_for(key) for key in todo}
    with worker_pool(workers) as pool:  # they share the thread budget (medshield.threads)
        running: dict[Future[None], tuple[CellKey, FineTuneRunConfig]] = {}
        try:
            while waiting or running:
                unfinished = set(waiting) | {key for key, _ in running.values()}
                ready = [k for k in waiting if needs[k] not in unfinished]
                for key in ready[: workers - len(running)]:  # the earliest first, as they free
                    waiting.remove(key)
                    cfg = build(key)
                    future = pool.submit(run, cfg.model_dump(), str(cells_dir / cfg.name))
                    running[future] = (key, cfg)
                if not running:
                    raise RuntimeError(f"cells wait for cells that never run: {waiting}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()
                    yield running.pop(future)[1]
        except BaseException:
            for future in running:
                future.cancel()
            raise


def reuse_cells(
    sources: Sequence[str],
    todo: list[CellKey],
    waits_for: Callable[[CellKey], CellKey | None],
    build: Callable[[CellKey], FineTuneRunConfig],
    run: Run,
    log: Log,
) -> list[CellKey]:
    """Copy into ``run``'s ``cells/`` each cell of ``todo`` (in order) that a ``sources``
    study has finished with the same config (the first source that has it), and record it;
    the cells left to run, in order. A cell whose config reads another cell's pick
    (``waits_for``) is built only once that cell is finished here, copied or not, and is left
    to run when that cell is."""
    if not sources:  # nothing to copy: build no config ahead of its run
        return todo
    cells_dir = run.path / "cells"
    left: list[CellKey] = []
    for key in todo:
        if waits_for(key) in left:  # its pick is not made yet: it runs after that cell
            left.append(key)
            continue
        config = build(key)
        found = (Path(s) / "cells" / config.name for s in sources)
        source = next((cell for cell in found if holds_finished_run(cell, config)), None)
        if source is None:
            left.append(key)
            continue
        target = cells_dir / config.name
        if target.exists():  # an unfinished start of the same cell
            shutil.rmtree(target)
        shutil.copytree(source, target)
        row = {"cell": config.name, "results": str(target / RESULTS_FILE)}
        run.append_samples([{**row, "reused_from": str(source)}])
        log(f"{config.name}: reused from {source}")
    return left
