"""``medshield finetune``: fine-tune one method on one modality, then evaluate it clean and robust.

The run directory (see :mod:`medshield.runs`) holds ``config.yaml``, ``finetuned/`` (the saved
method state, see :func:`~medshield.train.finetune.save_finetuned`), ``samples.jsonl`` and
``results.json``. Evaluation on a class-balanced test subsample:

- ``clean``: one row per image (``label``, ``pred``, ``correct``);
- for every budget ``eps`` (default 1, 2, 4 /255): PGD with each of ``pgd_steps`` (default 10
  and 50, ``restarts`` random restarts, Madry et al. 2018) and APGD-CE (Croce and Hein 2020),
  one row per image from :func:`medshield.attacks.sanity.robust_accuracy`;
- ``zero-grad@eps``: the gradient-masking check of :mod:`medshield.attacks.sanity`.

Rows are written one group at a time, tagged with the group and its size, so an interrupted
run keeps finished groups and recomputes only a group a crash cut short; a saved fine-tuned
model is loaded instead of retrained. Accuracies carry 95% bootstrap CIs
(:func:`medshield.eval.metrics.bootstrap_ci`), and the sanity flags (budget, range,
robust<=clean, stronger<=weaker, zero-gradients) are in ``results.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from medshield import data
from medshield.attacks.apgd import APGD
from medshield.attacks.base import Attack
from medshield.attacks.pgd import PGD
from medshield.attacks.sanity import (
    SanityFlag,
    accuracy_flag,
    budget_flag,
    range_flag,
    robust_accuracy,
    stronger_flag,
    zero_gradient_flag,
)
from medshield.config import ModelConfig, StrictModel, load_yaml_model
from medshield.errors import DataError
from medshield.eval.features import classify_images
from medshield.eval.metrics import bootstrap_ci
from medshield.eval.zero_shot import balanced_subset
from medshield.models.base import DualEncoder
from medshield.runs import Log, Run
from medshield.train.finetune.common import (
    META_FILE,
    FineTuneConfig,
    build_base,
    finetune,
    load_finetuned,
    save_finetuned,
)


class RobustEvalConfig(StrictModel):
    """Clean and robust evaluation after fine-tuning (budgets and step sizes in /255)."""

    eps: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0])
    pgd_steps: list[int] = Field(default_factory=lambda: [10, 50])
    restarts: int = Field(2, ge=1)
    apgd_steps: int = Field(50, ge=1)
    apgd: bool = True
    max_test_items: int | None = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    bootstrap_resamples: int = Field(1000, ge=10)


class FineTuneRunConfig(StrictModel):
    """A ``medshield finetune`` run: base model, modality, fine-tuning and evaluation."""

    name: str = "finetune"
    output_dir: str = "runs"
    seed: int = 0
    modality: str = "chest_xray"
    data_dir: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    robust: RobustEvalConfig = Field(default_factory=RobustEvalConfig)


def load_finetune_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> FineTuneRunConfig:
    """Read a YAML ``medshield finetune`` config (defaults when ``path`` is None) + overrides."""
    return load_yaml_model(FineTuneRunConfig, path, overrides)


def base_reference(config: FineTuneRunConfig) -> dict[str, Any]:
    """How to rebuild the base model: its checkpoint, or backend + kwargs + seed."""
    if config.model.checkpoint:
        return {"checkpoint": str(config.model.checkpoint)}
    return {"backend": config.model.backend, "kwargs": config.model.kwargs, "seed": config.seed}


def load_base(config: FineTuneRunConfig) -> DualEncoder:
    """The base model, with a clear error for a fine-tuned directory given as a checkpoint."""
    checkpoint = config.model.checkpoint
    if checkpoint and (Path(checkpoint) / META_FILE).is_file():
        raise DataError(
            f"{checkpoint} holds a fine-tuned classifier, not a base dual encoder; give the "
            "base model it was fine-tuned from as model.checkpoint"
        )
    return build_base(base_reference(config))


def _attacks(model: torch.nn.Module, ev: RobustEvalConfig, eps: float) -> list[tuple[str, Attack]]:
    attacks: list[tuple[str, Attack]] = [
        (
            f"pgd{s}",
            PGD(model, eps=eps, alpha=max(eps / 4, 2.5 * eps / s), steps=s, restarts=ev.restarts),
        )
        for s in ev.pgd_steps
    ]
    if ev.apgd:
        attacks.append(("apgd-ce", APGD(model, eps=eps, steps=ev.apgd_steps)))
    return attacks


def _mean_ci(values: list[bool], resamples: int, seed: int) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(
        lambda a: a.mean(-1), arr, n_resamples=resamples, seed=seed, vectorized=True
    )
    return {"value": float(arr.mean()), "ci_low": low, "ci_high": high, "n": len(arr)}


def summarize_finetune_rows(
    rows: list[dict[str, Any]], ev: RobustEvalConfig, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics with 95% CIs and sanity flags from the evaluation rows of one run."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "group" in r:
            by_group.setdefault(r["group"], []).append(r)
    metrics: dict[str, Any] = {}
    flags: list[SanityFlag | dict[str, Any]] = []
    if "clean" in by_group:
        metrics["clean_accuracy"] = _mean_ci(
            [r["correct"] for r in by_group["clean"]], ev.bootstrap_resamples, seed
        )
    for group, grows in sorted(by_group.items()):
        if group == "clean":
            continue
        if group.startswith("zero-grad@"):
            row = grows[0]
            flags.append(
                {
                    "name": "zero-gradients",
                    "group": group,
                    "passed": row["passed"],
                    "detail": row["detail"],
                }
            )
            continue
        grows = sorted(grows, key=lambda r: r["index"])
        metrics[f"robust_accuracy/{group}"] = _mean_ci(
            [r["robust_correct"] for r in grows], ev.bootstrap_resamples, seed
        )
        eps = float(group.split("@")[1])
        for flag in (budget_flag(grows, eps), range_flag(grows), accuracy_flag(grows)):
            flags.append(
                {"name": flag.name, "group": group, "passed": flag.passed, "detail": flag.detail}
            )
    for eps in ev.eps:
        weak, strong = by_group.get(f"pgd{min(ev.pgd_steps)}@{eps:g}"), None
        strong = by_group.get(f"pgd{max(ev.pgd_steps)}@{eps:g}")
        if weak and strong and len(ev.pgd_steps) > 1 and len(weak) == len(strong):
            flag = stronger_flag(
                sorted(weak, key=lambda r: r["index"]), sorted(strong, key=lambda r: r["index"])
            )
            flags.append(
                {
                    "name": flag.name,
                    "group": f"pgd@{eps:g}",
                    "passed": flag.passed,
                    "detail": flag.detail,
                }
            )
        worst = _worst_case(by_group, eps)
        if worst:
            metrics[f"robust_accuracy/worst@{eps:g}"] = _mean_ci(
                worst, ev.bootstrap_resamples, seed
            )
    return metrics, flags  # type: ignore[return-value]


def _worst_case(by_group: dict[str, list[dict[str, Any]]], eps: float) -> list[bool]:
    """Per image: robust under every attack at ``eps`` (the per-example worst case)."""
    groups = [g for g in by_group if g.endswith(f"@{eps:g}") and not g.startswith("zero-grad")]
    if not groups:
        return []
    per_index: dict[int, bool] = {}
    for g in groups:
        for r in by_group[g]:
            per_index[r["index"]] = per_index.get(r["index"], True) and bool(r["robust_correct"])
    return [per_index[i] for i in sorted(per_index)]


def run_finetune(config: FineTuneRunConfig, run: Run, log: Log = print) -> dict[str, Any]:
    """Fine-tune (or load the saved fine-tuned model), then evaluate clean and robust."""
    modality = data.get_modality(config.modality).name
    saved = run.path / "finetuned"
    base = load_base(config)  # a wrong checkpoint fails here, before any training
    if (saved / META_FILE).is_file():
        log(f"loading the fine-tuned {config.finetune.method} from {saved}")
        classifier, meta = load_finetuned(saved, model=base)
        report = meta["report"]
    else:
        result = finetune(
            base,
            config.finetune,
            modality,
            seed=config.seed,
            data_dir=config.data_dir,
            base_ref=base_reference(config),
            log=log,
        )
        save_finetuned(result, saved)
        classifier, report = result.classifier, result.report

    ev = config.robust
    test = data.load_split(modality, "test", config.data_dir)
    idx = balanced_subset(test.labels, test.modality.num_classes, ev.max_test_items, config.seed)
    images = test.tensor(idx)
    labels = torch.as_tensor(test.labels[idx], dtype=torch.long)

    all_rows = run.load_samples()
    counts = Counter(r["group"] for r in all_rows if "group" in r)
    expected = {r["group"]: r["n_group"] for r in all_rows if "group" in r}
    complete = {g for g, n in counts.items() if n == expected[g]}
    if len(complete) != len(counts):
        run.rewrite_samples(r for r in all_rows if r.get("group") in complete)

    def clean_rows() -> list[dict[str, Any]]:
        pred = classify_images(classifier, images, ev.batch_size).argmax(1)
        return [
            {"index": int(i), "label": int(y), "pred": int(p), "correct": bool(p == y)}
            for i, y, p in zip(idx, labels.tolist(), pred.tolist(), strict=True)
        ]

    jobs: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [("clean", clean_rows)]
    for eps in ev.eps:
        for name, attack in _attacks(classifier, ev, eps):
            jobs.append(
                (
                    f"{name}@{eps:g}",
                    lambda attack=attack: robust_accuracy(
                        classifier, attack, images, labels, ev.batch_size
                    ),
                )
            )
        pgd = PGD(classifier, eps=eps, steps=1)

        def zero_grad(pgd: PGD = pgd) -> list[dict[str, Any]]:
            flag = zero_gradient_flag(pgd, images, labels, ev.batch_size)
            return [{"passed": flag.passed, "detail": flag.detail}]

        jobs.append((f"zero-grad@{eps:g}", zero_grad))

    tags = {
        "method": config.finetune.method,
        "modality": modality,
        "seed": config.seed,
    }
    for group, job in jobs:
        if group in complete:
            continue
        log(f"  {group} ...")
        new = job()
        run.append_samples({**tags, **r, "group": group, "n_group": len(new)} for r in new)

    metrics, flags = summarize_finetune_rows(run.load_samples(), ev, config.seed)
    failed = [f for f in flags if not f["passed"]]
    for f in failed:
        log(f"  sanity FAIL {f['name']} ({f['group']}): {f['detail']}")
    return {
        "method": config.finetune.method,
        "modality": modality,
        "report": report,
        "metrics": metrics,
        "sanity": flags,
        "finetuned_dir": str(saved),
    }


def finetune_run_dir(config: FineTuneRunConfig) -> Path:
    return Path(config.output_dir) / config.name
