"""The noise-level study: pretrain on upstream data with a growing share of adversarial pairs,
then measure what that does downstream.

``medshield study noise --config configs/study_noise.yaml`` runs, in one study directory:

1. a clean **surrogate** (pretrained here with ``surrogate_seed`` unless ``surrogate`` names a
   saved model), which the multimodal attack runs against;
2. one adversarial **pool** per ``eps``: every upstream pair crafted once with the attack
   (:func:`~medshield.noise.craft_noisy_dataset` at ratio 1). A clean-only sweep (every ratio
   0) needs neither, and skips both;
3. one **cell** per (ratio, eps, seed): pretrain a fresh model on a
   :class:`~medshield.noise.NoisyMix` of the clean pairs and the pool, then evaluate it on
   every configured task (clean and under attack). Ratio 0 is the clean baseline, shared by the
   ``eps`` values. The ``holdout_modality`` is left out of pretraining and evaluated as transfer;
4. the **aggregate**: per (ratio, eps) the mean over seeds of each headline metric with a 95%
   t-interval over seeds, written to ``results.json``, ``table.md`` and ``plots/*.png``.

Every cell is an ordinary run directory (``config.yaml``, ``samples.jsonl``, ``results.json``);
the study resumes cell by cell, and a cell resumes within itself (pretraining checkpoints,
evaluation groups). Cells run seed-major, so a study stopped early still covers every ratio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator
from scipy import stats

from medshield.config import FolderName, RunConfig, StrictModel, load_yaml_model
from medshield.data import ImageCaptionDataset
from medshield.errors import ConfigError
from medshield.eval.metrics import Metric, format_metric
from medshield.models import load_model, save_model
from medshield.noise import NoisyCaptionDataset, NoisyMix, craft_noisy_dataset, file_sha256
from medshield.runs import Log, Run, has_results, read_results


class NoiseStudyConfig(StrictModel):
    """The grid and the shared run settings of the noise-level study.

    ``base`` is an ordinary run config (data, model, pretrain, evaluate; ``noise.attack``,
    ``noise.attack_kwargs`` and ``noise.batch_size`` choose the attack; its ``noise.ratio``
    and ``noise.eps`` are replaced by the grid).
    """

    name: FolderName = "study_noise"
    output_dir: str = "runs"
    ratios: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.25, 0.5, 1.0])
    eps_values: list[float] = Field(default_factory=lambda: [2.0, 8.0], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    holdout_modality: str | None = "breast_ultrasound"
    surrogate: str | None = None
    surrogate_seed: int = 1000
    keep_models: bool = False
    base: RunConfig = Field(default_factory=RunConfig)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, values: list[float]) -> list[float]:
        if not values or any(not 0 <= v <= 1 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"ratios must be distinct fractions in [0, 1], got {values}")
        return sorted(values)

    @field_validator("eps_values")
    @classmethod
    def _eps(cls, values: list[float]) -> list[float]:
        if any(not 0 < v <= 255 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"eps_values must be distinct budgets in (0, 255] /255, got {values}")
        return sorted(values)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values):
            raise ValueError(f"seeds has repeats: {values}")
        return values


def load_noise_study_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> NoiseStudyConfig:
    """Read a study config from YAML (defaults when None) with ``key.sub=value`` overrides."""
    return load_yaml_model(NoiseStudyConfig, path, overrides)


def cells(config: NoiseStudyConfig) -> list[tuple[float, float | None, int]]:
    """(ratio, eps, seed) of every cell, seed-major; ratio 0 has eps None (no noise)."""
    return [
        (ratio, eps, seed)
        for seed in config.seeds
        for ratio in config.ratios
        for eps in ([None] if ratio == 0 else config.eps_values)
    ]


def cell_name(ratio: float, eps: float | None, seed: int) -> str:
    return f"ratio{ratio:g}_eps{'-' if eps is None else f'{eps:g}'}_seed{seed}"


def run_noise_study(config: NoiseStudyConfig, run: Run, log: Log = print) -> dict[str, Any]:
    """Run (or resume) every cell, then aggregate; returns the study's results."""
    from medshield.commands import workflows  # the workflows import the whole library

    base = config.base
    test_modalities = workflows.resolve_modalities(base, "test")
    upstream = [
        m for m in workflows.resolve_modalities(base, "train") if m != config.holdout_modality
    ]
    if config.holdout_modality is not None and config.holdout_modality not in test_modalities:
        raise ConfigError(
            f"holdout_modality {config.holdout_modality!r} has no test split among "
            f"{test_modalities}"
        )
    upstream_cfg = base.model_copy(deep=True)
    upstream_cfg.data.modalities = upstream
    log(f"upstream modalities: {', '.join(upstream)}; evaluated on: {', '.join(test_modalities)}")

    clean = ImageCaptionDataset(
        upstream,
        split="train",
        seed=base.seed,
        per_class_cap=base.data.train_per_class_cap,
        data_dir=base.data.data_dir,
    )
    # a clean-only sweep (every ratio 0) needs neither the surrogate nor the pools
    noisy = any(ratio > 0 for ratio in config.ratios)
    surrogate_dir = _surrogate(config, upstream_cfg, run, log) if noisy else None
    pools: dict[float, NoisyCaptionDataset] = {}
    for eps in config.eps_values if surrogate_dir is not None else []:
        log(f"adversarial pool at eps {eps:g}/255 ({len(clean)} pairs) ...")
        attack = workflows.build_multimodal_attack(
            base.noise.attack, {**base.noise.attack_kwargs, "eps": eps}
        )
        path = craft_noisy_dataset(
            clean,
            load_model(surrogate_dir),
            attack,
            1.0,
            run.path / "pools" / f"eps{eps:g}",
            seed=base.seed,
            batch_size=base.noise.batch_size,
            surrogate_checksum=file_sha256(surrogate_dir / "model.safetensors"),
        )
        pools[eps] = NoisyCaptionDataset(path)

    grid = cells(config)
    for i, (ratio, eps, seed) in enumerate(grid, 1):
        name = cell_name(ratio, eps, seed)
        cell_cfg = base.model_copy(deep=True)
        cell_cfg.name, cell_cfg.output_dir, cell_cfg.seed = name, str(run.path / "cells"), seed
        cell_cfg.data.modalities = test_modalities
        cell = Run(run.path / "cells" / name, cell_cfg)
        if cell.finished:
            log(f"[{i}/{len(grid)}] {name}: done earlier, kept")
            continue
        log(f"[{i}/{len(grid)}] {name}")
        mix = NoisyMix(clean, pools[eps] if eps is not None else None, ratio, seed)
        model = workflows.build_model(cell_cfg)
        pre = workflows.run_pretrain(cell_cfg, cell, model, log=log, dataset=mix, save=False)
        ev = workflows.run_evaluate(cell_cfg, cell, model, log=log)
        if config.keep_models:
            save_model(model, cell.path / "model")
        cell.finish(
            {"pretrain": pre, "evaluate": ev, "ratio": ratio, "eps": eps},
            kind="pretrain",
            seed=seed,
        )
        workflows.remove_checkpoints(cell.path)

    table = aggregate(config, run.path, upstream, test_modalities)
    write_table(table, run.path / "table.md")
    plot(table, run.path / "plots")
    return {
        "upstream_modalities": upstream,
        "evaluated_modalities": test_modalities,
        "surrogate": None if surrogate_dir is None else str(surrogate_dir),
        "pools": {f"{eps:g}": str(p.path) for eps, p in pools.items()},
        "points": table,
    }


def _surrogate(config: NoiseStudyConfig, upstream_cfg: RunConfig, run: Run, log: Log) -> Path:
    """The surrogate's model directory: the configured one, or a clean model trained here."""
    from medshield.commands import workflows

    if config.surrogate is not None:
        return Path(config.surrogate)
    cfg = upstream_cfg.model_copy(deep=True)
    cfg.name, cfg.output_dir, cfg.seed = "surrogate", str(run.path), config.surrogate_seed
    directory = run.path / "surrogate"
    if not (directory / "model" / "model.safetensors").exists():
        log(f"pretraining a clean surrogate (seed {config.surrogate_seed}) ...")
        sub = Run(directory, cfg)
        workflows.run_pretrain(cfg, sub, workflows.build_model(cfg), log=log)
        workflows.remove_checkpoints(directory)
    return directory / "model"


# --- aggregation -------------------------------------------------------------------------------

HEADLINE: dict[str, tuple[str, str, str]] = {
    # column: (task, metric, over): "in" = mean over upstream modalities, "transfer" = the
    # modalities evaluated but not pretrained on, "all" = the pooled retrieval queries, "-" = VQA
    "zero-shot acc": ("zero_shot", "accuracy", "in"),
    "linear-probe acc": ("linear_probe", "accuracy", "in"),
    "robust acc@1": ("robust_zero_shot", "robust_accuracy@1", "in"),
    "robust acc@2": ("robust_zero_shot", "robust_accuracy@2", "in"),
    "robust acc@4": ("robust_zero_shot", "robust_accuracy@4", "in"),
    "i2t R@1": ("retrieval_i2t", "R@1", "all"),
    "i2t R@5": ("retrieval_i2t", "R@5", "all"),
    "i2t R@10": ("retrieval_i2t", "R@10", "all"),
    "t2i R@1": ("retrieval_t2i", "R@1", "all"),
    "t2i R@5": ("retrieval_t2i", "R@5", "all"),
    "t2i R@10": ("retrieval_t2i", "R@10", "all"),
    "adv i2t R@1": ("retrieval_i2t_adv", "R@1", "all"),
    "adv i2t R@10": ("retrieval_i2t_adv", "R@10", "all"),
    "adv t2i R@1": ("retrieval_t2i_adv", "R@1", "all"),
    "adv t2i R@10": ("retrieval_t2i_adv", "R@10", "all"),
    "VQA closed acc": ("vqa_closed", "accuracy", "radiology"),
    "VQA robust acc": ("vqa_closed", "robust_accuracy", "radiology"),
    "transfer zero-shot acc": ("zero_shot", "accuracy", "transfer"),
    "transfer linear-probe acc": ("linear_probe", "accuracy", "transfer"),
}


def headline(
    metrics: dict[str, Any], upstream: list[str], evaluated: list[str]
) -> dict[str, float | None]:
    """A cell's headline numbers from its ``summarize`` table (None where not computed)."""
    transfer = [m for m in evaluated if m not in upstream]
    out: dict[str, float | None] = {}
    for column, (task, metric, over) in HEADLINE.items():
        table = metrics.get(task, {})
        groups = upstream if over == "in" else transfer if over == "transfer" else [over]
        values = [
            table[g][metric]["value"]
            for g in groups
            if g in table and table[g].get(metric, {}).get("value") is not None
        ]
        out[column] = float(np.mean(values)) if values else None
    return out


def mean_t_ci(values: list[float], confidence: float = 0.95) -> dict[str, float | int | None]:
    """Mean over seeds with a Student-t interval (None bounds with a single seed), clipped to
    [0, 1]: every headline metric is an accuracy or a recall, and with three seeds the raw
    interval of a value near 0 would otherwise reach below it."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return Metric(mean, math.nan, math.nan, n, interval="student-t").to_dict()
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)
    low, high = max(mean - half, 0.0), min(mean + half, 1.0)
    return Metric(mean, low, high, n, interval="student-t").to_dict()


def aggregate(
    config: NoiseStudyConfig, study_dir: Path, upstream: list[str], evaluated: list[str]
) -> list[dict[str, Any]]:
    """One point per (ratio, eps) over the finished cells' ``results.json``."""
    points = []
    for ratio in config.ratios:
        for eps in [None] if ratio == 0 else config.eps_values:
            per_seed = []
            for seed in config.seeds:
                path = study_dir / "cells" / cell_name(ratio, eps, seed)
                if has_results(path):
                    metrics = read_results(path)["evaluate"]["metrics"]
                    per_seed.append(headline(metrics, upstream, evaluated))
            if not per_seed:
                continue
            point: dict[str, Any] = {"ratio": ratio, "eps": eps, "seeds": len(per_seed)}
            for column in HEADLINE:
                values = [s[column] for s in per_seed if s[column] is not None]
                point[column] = mean_t_ci(values) if values else None
            points.append(point)
    return points


def write_table(points: list[dict[str, Any]], path: Path) -> None:
    """A Markdown table: one row per (ratio, eps), mean [95% CI] over seeds per column."""
    columns = [c for c in HEADLINE if any(p.get(c) for p in points)]
    lines = [
        "| ratio | eps | seeds | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 3),
    ]
    for p in points:
        cells = [format_metric(p.get(c), missing="n/a") for c in columns]
        eps = "-" if p["eps"] is None else f"{p['eps']:g}"
        lines.append(f"| {p['ratio']:g} | {eps} | {p['seeds']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(points: list[dict[str, Any]], directory: Path) -> list[Path]:
    """One PNG per headline column: the metric against the noise ratio, a line per eps.

    The clean point (ratio 0) starts every line; error bars are the 95% intervals over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    ratios = sorted({p["ratio"] for p in points})
    position = {r: i for i, r in enumerate(ratios)}  # even spacing: 0.05 and 0.1 stay legible
    eps_values = sorted({p["eps"] for p in points if p["eps"] is not None})
    written = []
    for column in HEADLINE:
        if not any(p.get(column) for p in points):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        clean = next((p for p in points if p["eps"] is None and p.get(column)), None)
        for eps in eps_values or [None]:
            line = ([clean] if clean else []) + [
                p for p in points if p["eps"] == eps and eps is not None and p.get(column)
            ]
            if not line:
                continue
            x = [position[p["ratio"]] for p in line]
            y = [p[column]["value"] for p in line]
            err = [
                [
                    0 if p[column]["ci_low"] is None else p[column]["value"] - p[column]["ci_low"]
                    for p in line
                ],
                [
                    0 if p[column]["ci_high"] is None else p[column]["ci_high"] - p[column]["value"]
                    for p in line
                ],
            ]
            label = "clean" if eps is None else f"eps {eps:g}/255"
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_xlabel("noise ratio (share of adversarial upstream pairs)")
        ax.set_ylabel(column)
        ax.set_title(f"{column} vs noise ratio (mean, 95% CI over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / (column.replace(" ", "_").replace("@", "_at_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
