"""The settings of ``medshield demo``: :class:`DemoConfig`, one section per stage, and its
loading from YAML (``configs/demo.yaml`` holds the defaults)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from medshield.commands.finetune.config import RobustEvalConfig
from medshield.commands.redteam import (
    ChatModelConfig,
    DefenseConfig,
    GenerationConfig,
    RedteamConfig,
    check_names,
)
from medshield.commands.studies.defense import DemonstrationSettings
from medshield.commands.studies.finetune import MethodSpec
from medshield.config import (
    AttackEntry,
    AttackList,
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
from medshield.defense.selection import STRATEGIES
from medshield.errors import ConfigError, UnknownNameError
from medshield.train.finetune.config import FineTuneConfig, parse_finetune_config

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
    """:class:`~medshield.commands.finetune.config.RobustEvalConfig`: PGD-10 at 1 and 2 /255 on
    100 test images by default, no retrieval."""

    eps: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    attacks: AttackList = Field(default_factory=lambda: [AttackEntry(name="pgd", steps=10)])
    max_test_items: int | None = Field(100, ge=1)
    retrieval: bool = False


class DemoGenerationConfig(GenerationConfig):
    """:class:`~medshield.commands.redteam.GenerationConfig`: 24 new tokens by default."""

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
    """Stage 5: mini-llava, loaded from ``checkpoint`` (default ``instruct``, the mini-llava that
    ships with medshield and uses the image; or a directory written by ``medshield
    train-vlm``), or, with ``checkpoint: null``, trained for ``steps`` steps (projector, plus
    LoRA when ``lora_rank`` > 0) on the clean mini-clip's image tower with instructions from
    the MedMNIST train images (``medmnist_per_class`` per class) and VQA-RAD train questions.
    ``eval_limit`` VQA-RAD closed (yes/no) test questions are answered, by likelihood.
    ``lm`` is ``smollm2`` or a dict of LlamaConfig arguments (a tiny random LM, for tests)."""

    checkpoint: str | None = "instruct"
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
