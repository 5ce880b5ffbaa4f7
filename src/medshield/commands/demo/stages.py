"""The stages of ``medshield demo``, each a run directory, and the artifact cache they share."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medshield.cache import ArtifactCache, CacheEntry
from medshield.commands.demo.config import DemoConfig
from medshield.commands.demo.summary import headline_text
from medshield.commands.finetune import run_finetune
from medshield.commands.finetune.config import FineTuneRunConfig, RobustEvalConfig
from medshield.commands.redteam import DefenseConfig, build_judges, run_redteam
from medshield.commands.train_vlm import VLMTrainConfig, evaluate_vqa_closed, run_train_vlm
from medshield.commands.workflows import (
    build_model,
    remove_checkpoints,
    resolve_modalities,
    run_craft_noise,
    run_evaluate,
    run_pretrain,
)
from medshield.config import RunConfig
from medshield.data import get_modality
from medshield.data.medmnist import data_root
from medshield.models import load_model
from medshield.models.chat import create_chat_model
from medshield.models.mini_llava import resolve_checkpoint
from medshield.models.smollm import cache_dir
from medshield.report import report_after_run
from medshield.runs import Log, Run

CACHE_SUBDIR = "demo"


class _Demo:
    """The stages of one demo run; each stage method appends a record to ``records``."""

    def __init__(self, config: DemoConfig, run: Run, log: Log) -> None:
        self.config = config
        self.run = run
        self.log = log
        self.cache = ArtifactCache(cache_dir() / CACHE_SUBDIR, log) if config.cache else None
        self.records: list[dict[str, Any]] = []
        n_finetune = len(config.finetune.methods) * len(config.finetune.modalities)
        self.total = 3 + n_finetune + 1 + 2
        self._started = 0.0

    # -- bookkeeping

    def report(self, stage_dir: Path) -> None:
        """Each stage run's report hook (:meth:`~medshield.runs.Run.finish`)."""
        report_after_run(stage_dir, log=self.log)

    def begin(self, title: str) -> None:
        self._started = time.perf_counter()
        self.log(f"stage {len(self.records) + 1}/{self.total}: {title}")

    def end(
        self, stage: str, kind: str, title: str, cache: dict[str, Any], headline: dict[str, Any]
    ) -> None:
        """Record a finished stage (its run has written its report) and log its headline."""
        record = {
            "stage": stage,
            "kind": kind,
            "title": title,
            "dir": stage,
            "seconds": round(time.perf_counter() - self._started, 1),
            "cache": cache,
            "headline": headline,
        }
        record["text"] = headline_text(record)
        self.records.append(record)
        self.log(
            f"stage {len(self.records)}/{self.total} {stage} done in {record['seconds']:.0f} s "
            f"({cache['status']}): {record['text']}"
        )

    def artifact(
        self,
        kind: str,
        spec: dict[str, Any],
        local: Path,
        train: Callable[[], dict[str, Any]],
    ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        """``(artifact dir, training summary, cache info)``: the cached artifact of ``spec``, or
        ``train()`` (which writes it to ``local``), then stored in the cache."""
        if self.cache is None:
            started = time.perf_counter()
            summary = train()
            return local, summary, _produced({"status": "off"}, time.perf_counter() - started)
        key = ArtifactCache.key(kind, spec)
        entry = self.cache.lookup(kind, key)
        if entry is not None:
            self.log(f"    reusing the cached {kind} ({entry.path})")
            _link(local, entry.artifact)
            return entry.artifact, entry.summary, _cached(entry, "reused")
        _unlink(local)
        started = time.perf_counter()
        summary = train()
        seconds = time.perf_counter() - started
        entry = self.cache.publish(kind, key, spec, local, summary, seconds)
        _link(local, entry.artifact)
        return entry.artifact, summary, _cached(entry, "trained")

    # -- robustness half

    def pretrain(self, stage: str, title: str, noisy: tuple[Path, str] | None) -> tuple[Path, str]:
        """Stages 1 and 3: pretrain (or reuse) a mini-clip, then evaluate it; returns the model
        directory and its cache key (the spec hash, also computed without a cache)."""
        self.begin(title)
        c = self.config
        data = {"noisy_dataset": str(noisy[0])} if noisy else {}
        cfg = c.run_config(stage, self.run.path, data=data)
        spec: dict[str, Any] = {
            "model": c.model.model_dump(mode="json"),
            "pretrain": c.pretrain.model_dump(mode="json"),
            "seed": c.seed,
        }
        if noisy:
            spec["noisy_dataset"] = noisy[1]
        else:
            spec["data"] = self._data_spec(cfg, resolve_modalities(cfg, "train"))
        stage_run = Run(self.run.path / stage, cfg)

        def train() -> dict[str, Any]:
            result = run_pretrain(cfg, stage_run, build_model(cfg), log=self.log)
            return {k: v for k, v in result.items() if k != "model_dir"}

        local = stage_run.path / "model"
        model_dir, summary, cache = self.artifact("mini-clip", spec, local, train)
        if cache["status"] == "trained":
            remove_checkpoints(stage_run.path)
        self.log(f"    evaluating {model_dir}")
        ev = run_evaluate(cfg, stage_run, load_model(model_dir), log=self.log)
        stage_run.finish(
            {"pretrain": {**summary, "model_dir": str(model_dir)}, "evaluate": ev, "cache": cache},
            kind="pretrain",
            seed=c.seed,
            report=self.report,
        )
        zero_shot = ev["metrics"].get("zero_shot", {}).get("mean", {}).get("accuracy")
        headline = {
            "train_pairs": summary["train_pairs"],
            "modalities": len(ev["modalities"]),
            "zero_shot_accuracy": zero_shot,
        }
        if noisy:
            headline["noisy"] = True
        self.end(stage, "pretrain", title, cache, headline)
        return model_dir, ArtifactCache.key("mini-clip", spec)

    def noise(self, clean: tuple[Path, str]) -> tuple[Path, str]:
        """Stage 2: craft (or reuse) the noisy upstream set against the clean mini-clip."""
        c = self.config
        title = (
            f"craft a noisy upstream set: {c.noise.attack} at eps {c.noise.eps:g}/255 on "
            f"{c.noise.ratio:.0%} of the pairs"
        )
        self.begin(title)
        cfg = c.run_config("noise", self.run.path, model={"checkpoint": str(clean[0])})
        spec = {
            "surrogate": clean[1],
            "data": self._data_spec(cfg, resolve_modalities(cfg, c.noise.split)),
            "noise": c.noise.model_dump(mode="json"),
            "seed": c.seed,
        }
        stage_run = Run(self.run.path / "noise", cfg)

        def train() -> dict[str, Any]:
            result = run_craft_noise(cfg, stage_run, log=self.log)
            return {k: v for k, v in result.items() if k != "noisy_dataset"}

        noisy_dir, summary, cache = self.artifact(
            "noisy-dataset", spec, stage_run.path / "noisy", train
        )
        if not stage_run.load_samples():  # reused: the rows come from the cached dataset
            stage_run.append_samples(json.loads(line) for line in (noisy_dir / "rows.jsonl").open())
        stage_run.finish(
            {"craft_noise": {**summary, "noisy_dataset": str(noisy_dir)}, "cache": cache},
            kind="craft-noise",
            seed=c.seed,
            report=self.report,
        )
        headline = {
            "perturbed": summary["perturbed"],
            "rows": summary["rows"],
            "attack": c.noise.attack,
            "eps": c.noise.eps,
            "max_linf_255": summary["max_linf_255"],
        }
        self.end("noise", "noise", title, cache, headline)
        return noisy_dir, ArtifactCache.key("noisy-dataset", spec)

    def finetune(self, base: tuple[Path, str]) -> None:
        """Stage 4: every method on every modality, from the noisy-pretrained mini-clip."""
        c = self.config
        for spec in c.finetune.methods:
            for modality in c.finetune.modalities:
                modality = get_modality(modality).name
                stage = f"finetune_{spec.name}_{modality}"
                title = f"fine-tune the noisy-pretrained mini-clip with {spec.name} on {modality}"
                self.begin(title)
                cfg = FineTuneRunConfig(
                    name=stage,
                    output_dir=str(self.run.path),
                    seed=c.seed,
                    modality=modality,
                    data_dir=c.data.data_dir,
                    model=c.model.model_copy(update={"checkpoint": str(base[0])}),
                    finetune=c.finetune.method_config(spec),
                    robust=RobustEvalConfig(**c.finetune.robust.model_dump()),
                )
                stage_run = Run(self.run.path / stage, cfg)
                local = stage_run.path / "finetuned"
                key_spec = {
                    "base": base[1],
                    "modality": modality,
                    "data_root": str(data_root(c.data.data_dir).resolve()),
                    "finetune": cfg.finetune.model_dump(mode="json"),
                    "seed": c.seed,
                }
                cache, entry = {"status": "off"}, None
                if self.cache is not None:
                    key = ArtifactCache.key("finetuned", key_spec)
                    entry = self.cache.lookup("finetuned", key)
                    if entry is not None:
                        self.log(f"    reusing the cached fine-tuned {spec.name} ({entry.path})")
                        _link(local, entry.artifact)  # run_finetune loads what it finds there
                        cache = _cached(entry, "reused")
                    else:
                        _unlink(local)
                result = run_finetune(cfg, stage_run, log=self.log)
                seconds = result["report"]["train_wall_s"]
                if self.cache is None:
                    cache = _produced(cache, seconds)
                elif entry is None:
                    entry = self.cache.publish(
                        "finetuned", key, key_spec, local, result["report"], seconds
                    )
                    _link(local, entry.artifact)
                    cache = _cached(entry, "trained")
                stage_run.finish(
                    {"finetune": result, "cache": cache},
                    kind="finetune",
                    seed=c.seed,
                    report=self.report,
                )
                metrics = result["metrics"]
                headline = {
                    "method": spec.name,
                    "modality": modality,
                    "clean_accuracy": metrics.get("clean_accuracy"),
                    "robust_accuracy": {
                        f"{eps:g}": metrics.get(f"robust_accuracy/worst@{eps:g}")
                        for eps in cfg.robust.eps
                    },
                    "trainable_params": result["report"]["trainable_params"],
                    "train_wall_s": result["report"]["train_wall_s"],
                }
                self.end(stage, "finetune", title, cache, headline)

    # -- safety half

    def vlm(self, clip: tuple[Path, str]) -> tuple[Any, Path]:
        """Stage 5: train (or reuse, or load) mini-llava and answer VQA-RAD closed questions;
        returns the loaded model (used by the red-teaming stages) and its directory."""
        c, v = self.config, self.config.vlm
        loading = v.checkpoint is not None
        title = (
            f"load mini-llava from {v.checkpoint}"
            if loading
            else f"train mini-llava ({v.steps} steps) on the clean mini-clip's image tower"
        )
        self.begin(title)
        cfg = VLMTrainConfig(
            name="vlm",
            output_dir=str(self.run.path),
            clip=str(clip[0]),
            lm=v.lm,
            lora_rank=v.lora_rank,
            data_dir=c.data.data_dir,
            modalities=c.data.modalities,
            medmnist_per_class=v.medmnist_per_class,
            vqa_rad=v.vqa_rad,
            steps=v.steps,
            batch_size=v.batch_size,
            lr=v.lr,
            eval_limit=v.eval_limit,
            eval_batch_size=v.eval_batch_size,
            seed=c.seed,
        )
        stage_run = Run(self.run.path / "vlm", cfg)
        if loading:
            model_dir, summary, cache = resolve_checkpoint(v.checkpoint), {}, {"status": "loaded"}
        else:
            spec = {
                "clip": clip[1],
                "train": cfg.model_dump(mode="json", exclude={"name", "output_dir", "clip"}),
                "data_root": str(data_root(c.data.data_dir).resolve()),
            }

            def train() -> dict[str, Any]:
                result = run_train_vlm(cfg, stage_run)
                skip = ("model_dir", "vqa_rad_closed")
                return {key: value for key, value in result.items() if key not in skip}

            model_dir, summary, cache = self.artifact(
                "mini-llava", spec, stage_run.path / "model", train
            )
            if cache["status"] == "trained":
                shutil.rmtree(stage_run.path / "checkpoint", ignore_errors=True)
        self.log(f"    loading mini-llava from {model_dir}")
        model = create_chat_model("mini-llava", checkpoint=str(model_dir))
        evaluation = evaluate_vqa_closed(  # rows written by run_train_vlm are reused
            model,
            stage_run,
            limit=v.eval_limit,
            batch_size=v.eval_batch_size,
            data_dir=c.data.data_dir,
            seed=c.seed,
        )
        stage_run.finish(
            {
                "train_vlm": {**summary, "model_dir": str(model_dir), "vqa_rad_closed": evaluation},
                "cache": cache,
            },
            kind="train-vlm",
            seed=c.seed,
            report=self.report,
        )
        headline = {
            "steps": summary.get("steps"),
            "vqa_closed_n": evaluation["n"],
            "vqa_closed_image": _accuracy(evaluation["image"]),
            "vqa_closed_no_image": _accuracy(evaluation["no_image"]),
        }
        self.end("vlm", "vlm", title, cache, headline)
        return model, model_dir

    def redteam(self, model: Any, model_dir: Path) -> None:
        """Stage 6: the safety slice undefended, then behind the demonstration defense."""
        c = self.config
        defended = c.redteam.defense
        runs = [
            ("redteam_undefended", "red-team mini-llava, undefended", DefenseConfig()),
            (
                "redteam_defended",
                f"red-team mini-llava behind {defended.k} synthetic demonstrations "
                f"({defended.strategy})",
                defended.defense_config(),
            ),
        ]
        judges = None
        for stage, title, defense in runs:
            self.begin(title)
            cfg = c.redteam_config(stage, self.run.path, defense, str(model_dir))
            judges = judges if judges is not None else build_judges(cfg)
            stage_run = Run(self.run.path / stage, cfg)
            results = run_redteam(
                cfg, stage_run, log=self.log, model=model, judges=judges, report=self.report
            )
            r = results["redteam"]
            overall = r["metrics"]["overall"]
            headline = {
                "defense": defense.name,
                "n_items": r["n_items"],
                "n_errors": r["n_errors"],
                **{
                    m: overall.get(m)
                    for m in ("attack_success_rate", "over_defense_rate", "benign_accuracy")
                },
            }
            self.end(stage, "redteam", title, {"status": "evaluation"}, headline)

    def _data_spec(self, cfg: RunConfig, modalities: list[str]) -> dict[str, Any]:
        return {
            "modalities": modalities,
            "train_per_class_cap": cfg.data.train_per_class_cap,
            "data_root": str(data_root(cfg.data.data_dir).resolve()),
        }


def _link(local: Path, artifact: Path) -> None:
    """Make ``local`` (where a stage keeps its artifact without a cache) a symbolic link to the
    cached ``artifact``, so every stage directory has the usual layout without a copy."""
    _unlink(local)
    if not local.exists():
        local.symlink_to(artifact.resolve(), target_is_directory=True)


def _unlink(local: Path) -> None:
    """Remove a link left by an earlier run (its entry may be gone), so training writes a real
    directory there."""
    if local.is_symlink():
        local.unlink()


def _produced(cache: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """``cache`` with ``produced_seconds``: the wall time producing the stage's artifact took
    (training, or crafting the noisy set), in the run that produced it."""
    return {**cache, "produced_seconds": None if seconds is None else round(seconds, 1)}


def _cached(entry: CacheEntry, status: str) -> dict[str, Any]:
    """The cache info of a stage whose artifact is ``entry`` (``trained`` or ``reused``)."""
    info = {"status": status, "key": entry.key, "entry": str(entry.path)}
    return _produced(info, entry.seconds)


def _accuracy(m: dict[str, Any]) -> dict[str, Any]:
    """A VQA accuracy ``{accuracy, ci_low, ci_high}`` as a metric dict."""
    return {"value": m["accuracy"], "ci_low": m["ci_low"], "ci_high": m["ci_high"]}
