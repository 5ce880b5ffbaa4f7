"""End-to-end workflows behind the CLI: pretrain, evaluate and the demo.

Each takes a :class:`RunConfig` and writes a run directory (see :mod:`medshield.runs`); the CLI
only parses arguments and calls these, so everything here is importable and scriptable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medshield.config import RunConfig
from medshield.data import ImageCaptionDataset, available_modalities, get_modality
from medshield.errors import DataError
from medshield.eval.linear_probe import linear_probe_rows
from medshield.eval.metrics import summarize
from medshield.eval.retrieval import retrieval_rows
from medshield.eval.vqa import vqa_closed_rows
from medshield.eval.zero_shot import zero_shot_rows
from medshield.models import DualEncoder, create_model, load_model, save_model
from medshield.runs import Run
from medshield.train.pretrain import pretrain

Log = Callable[[str], None]


def resolve_modalities(config: RunConfig, split: str) -> list[str]:
    """The configured modalities, or every modality with ``split`` on disk for ``available``."""
    if config.data.modalities == "available":
        found = available_modalities(config.data.data_dir, split=split)
        if not found:
            raise DataError(
                f"no MedMNIST {split} split found under the data directory; set "
                "MEDSHIELD_DATA_DIR or install medshield[online] to download MedMNIST"
            )
        return found
    return [get_modality(m).name for m in config.data.modalities]


def build_model(config: RunConfig) -> DualEncoder:
    """The configured model; new heads are initialised from the run's seed."""
    torch.manual_seed(config.seed)
    if config.model.checkpoint:
        return load_model(config.model.checkpoint)
    return create_model(config.model.backend, **config.model.kwargs)


def run_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / config.name


def run_pretrain(
    config: RunConfig, run: Run, model: DualEncoder, log: Log = print
) -> dict[str, Any]:
    """Pretrain ``model`` on the train splits of the configured modalities, resumably.

    The final model is saved to ``<run>/model``; per-epoch rows go to ``samples.jsonl``.
    """
    modalities = resolve_modalities(config, "train")
    dataset = ImageCaptionDataset(
        modalities,
        split="train",
        seed=config.seed,
        per_class_cap=config.data.train_per_class_cap,
        data_dir=config.data.data_dir,
    )
    log(
        f"pretraining {config.model.backend} on {len(dataset)} image-caption pairs "
        f"from {', '.join(modalities)}"
    )
    history = pretrain(model, dataset, config.pretrain, run.path / "checkpoints", config.seed)
    done = {r["epoch"] for r in run.load_samples() if r.get("task") == "pretrain"}
    run.append_samples(
        {"task": "pretrain", **e} for e in history["epochs"] if e["epoch"] not in done
    )
    save_model(model, run.path / "model")
    return {
        "modalities": modalities,
        "train_pairs": len(dataset),
        "history": history,
        "model_dir": str(run.path / "model"),
    }


def run_evaluate(config: RunConfig, run: Run, model: DualEncoder, log: Log = print) -> dict:
    """Evaluate ``model`` on every configured task, resuming from finished groups of rows.

    Rows are written one (task, modality) group at a time, each row tagged with its group and
    the group's size, so a group a crash cut short is dropped and recomputed.
    """
    ev, seed, data_dir = config.evaluate, config.seed, config.data.data_dir
    modalities = resolve_modalities(config, "test")
    all_rows = run.load_samples()
    eval_rows = [r for r in all_rows if "group" in r]
    counts = Counter(r["group"] for r in eval_rows)
    expected = {r["group"]: r["n_group"] for r in eval_rows}
    complete = {g for g, n in counts.items() if n == expected[g]}
    if len(complete) != len(counts):  # drop what a crash left half-written
        run.rewrite_samples(
            r for r in all_rows if r.get("group", "") in complete or "group" not in r
        )
    skipped: dict[str, str] = {}

    jobs: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = []
    for m in modalities:
        if "zero_shot" in ev.tasks:
            jobs.append(
                (
                    f"zero_shot/{m}",
                    lambda m=m: zero_shot_rows(
                        model, m, max_items=ev.max_test_items, seed=seed, data_dir=data_dir
                    ),
                )
            )
        if "linear_probe" in ev.tasks:
            jobs.append(
                (
                    f"linear_probe/{m}",
                    lambda m=m: linear_probe_rows(
                        model,
                        m,
                        max_train=ev.linear_probe_max_train,
                        max_test=ev.max_test_items,
                        seed=seed,
                        data_dir=data_dir,
                    ),
                )
            )
    if "retrieval" in ev.tasks:
        jobs.append(
            (
                "retrieval/all",
                lambda: retrieval_rows(
                    model,
                    modalities,
                    per_class_cap=ev.retrieval_per_class_cap,
                    seed=seed,
                    data_dir=data_dir,
                ),
            )
        )
    if "vqa_closed" in ev.tasks:
        jobs.append(
            (
                "vqa_closed/radiology",
                lambda: vqa_closed_rows(model, epochs=ev.vqa_epochs, seed=seed, data_dir=data_dir),
            )
        )

    model.eval()
    for group, job in jobs:
        if group in complete:
            log(f"  {group}: done earlier, kept")
            continue
        log(f"  {group} ...")
        try:
            new = job()
        except DataError as exc:
            skipped[group] = str(exc)
            log(f"  {group}: skipped ({exc})")
            continue
        run.append_samples({**r, "group": group, "n_group": len(new)} for r in new)

    rows = [r for r in run.load_samples() if "group" in r]
    metrics = summarize(rows, n_resamples=ev.bootstrap_resamples)
    return {"modalities": modalities, "metrics": metrics, "skipped": skipped}
