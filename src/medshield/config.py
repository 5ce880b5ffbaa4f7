"""Run configurations: pydantic models loaded from YAML and overridable from the CLI.

Overrides use dotted keys and YAML values, e.g. ``--set pretrain.epochs=1 --set
data.modalities=[chest_xray,blood_cell]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from medshield.errors import ConfigError, UnknownNameError
from medshield.registry import IMAGE_ATTACKS

M = TypeVar("M", bound=BaseModel)

EvalTask = Literal[
    "zero_shot", "linear_probe", "robust_zero_shot", "retrieval", "retrieval_adv", "vqa_closed"
]


class StrictModel(BaseModel):
    """A config section that refuses unknown keys (a typo is an error, not a silent default)
    and non-finite numbers (``.inf``/``.nan`` would train NaN weights without a word)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    runtime_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields left out of a run's saved config (see :func:`dump_config`)."""


def check_folder_name(name: str) -> str:
    """``name`` when it is one folder name (a ValueError otherwise: pydantic reports it)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(
            f"{name!r} must be a single folder name (no '/', '\\', '.' or '..'): it names a "
            "folder inside output_dir; set output_dir to choose where runs are written"
        )
    return name


FolderName = Annotated[str, AfterValidator(check_folder_name)]
"""A run's ``name`` (or a label that names a run's folder): one folder inside ``output_dir``, so
a run never writes (or, with ``--overwrite``, deletes) outside it."""


class DataConfig(StrictModel):
    """Which images to use. ``modalities: available`` takes every modality found on disk.

    ``noisy_dataset``: a directory written by ``medshield craft-noise``; pretraining then reads
    its (partly adversarial) pairs instead of the clean ones.
    """

    modalities: list[str] | Literal["available"] = "available"
    train_per_class_cap: int | None = Field(1000, ge=1)
    data_dir: str | None = None
    noisy_dataset: str | None = None


class ModelConfig(StrictModel):
    """A registered backend and its arguments, or a saved medshield model directory."""

    backend: str = "mini-clip"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None


class PretrainConfig(StrictModel):
    """Contrastive (symmetric InfoNCE) pretraining.

    ``image_layers`` / ``text_layers``: how many of the tower's last stages train
    (-1 = all, 0 = frozen; projection heads and the logit scale always train).
    """

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    tower_lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, le=1)
    image_layers: int = Field(-1, ge=-1)
    text_layers: int = Field(0, ge=-1)
    max_steps_per_epoch: int | None = Field(None, ge=1)


class AttackEntry(BaseModel):
    """One image attack of a robust evaluation: a registered image attack's ``name``, how many
    independent ``restarts`` to run (each one a row of its own), and the attack's own keyword
    arguments beside them, e.g. ``{name: pgd, steps: 50, restarts: 2}``. The budget is not an
    argument: the evaluation runs every entry at each of its budgets. An attack with a step
    size ``alpha`` that the entry leaves out gets medshield's default for its budget and steps
    (:func:`medshield.attacks.pgd.pgd_step_size`). The name and the arguments are checked
    against :data:`~medshield.registry.IMAGE_ATTACKS` when the config loads."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str
    restarts: int = Field(1, ge=1)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The attack's own arguments (every key besides ``name`` and ``restarts``)."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check(self) -> AttackEntry:
        for key in ("eps", "model"):
            if key in self.kwargs:
                raise ValueError(
                    f"attack {self.name!r}: {key!r} is not an entry argument; the evaluation "
                    "passes the model and each of its budgets (set the budgets in the eps list)"
                )
        try:
            cls = IMAGE_ATTACKS.get(self.name)
        except UnknownNameError:
            raise ValueError(
                f"{self.name!r} is not a registered image attack; the image attacks are "
                f"{', '.join(IMAGE_ATTACKS.names())} (medshield list image-attacks)"
            ) from None
        try:  # built once on a stand-in model: a bad argument fails now, not hours later
            cls(nn.Identity(), eps=1.0, **self.kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"the arguments {self.kwargs} do not fit attack {self.name!r}: {exc}"
            ) from None
        return self


def attack_labels(entries: list[AttackEntry]) -> list[str]:
    """The label of each entry in rows, group and metric names: its ``name``, or, when several
    entries share the name, the name and its ``steps`` (``pgd10``, ``pgd50``)."""
    names = [e.name for e in entries]
    labels = [
        e.name if names.count(e.name) == 1 else f"{e.name}{e.kwargs.get('steps', '')}"
        for e in entries
    ]
    repeats = sorted({label for label in labels if labels.count(label) > 1})
    if repeats:
        raise ValueError(
            f"attacks {repeats} repeat: entries of the same attack need distinct 'steps'"
        )
    return labels


def check_attack_entries(entries: list[AttackEntry]) -> list[AttackEntry]:
    """A non-empty list with distinct labels (see :func:`attack_labels`)."""
    if not entries:
        raise ValueError("list at least one attack, e.g. [{name: pgd, steps: 10}]")
    attack_labels(entries)
    return entries


AttackList = Annotated[list[AttackEntry], AfterValidator(check_attack_entries)]
"""A robust evaluation's image attacks: ``[{name: pgd, steps: 10}, {name: apgd-ce, steps: 50}]``."""


def refuse_old_fields(raw: Any, old: dict[str, str]) -> Any:
    """Raise a ValueError naming the replacement when ``raw`` (a config section's mapping) sets
    fields that an earlier medshield had (``old``: field -> what replaces it)."""
    if isinstance(raw, dict):
        found: dict[str, list[str]] = {}
        for key in old:
            if key in raw:
                found.setdefault(old[key], []).append(repr(key))
        if found:
            raise ValueError(
                "; ".join(
                    f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} gone: {fix}"
                    for fix, keys in found.items()
                )
            )
    return raw


class EvaluateConfig(StrictModel):
    """Downstream evaluation on test splits.

    ``robust_zero_shot``: zero-shot accuracy under every image attack of ``robust_attacks``
    (registered names with their arguments, see :class:`AttackEntry`; default PGD-10) at each
    of ``robust_eps`` (/255) on ``robust_max_items`` images per modality, the per-image worst
    case over attacks and restarts, with sanity flags.
    ``retrieval_adv``: retrieval with each query's image-caption pair perturbed by the
    registered multimodal ``retrieval_attack`` (``retrieval_attack_kwargs``, e.g. ``eps``).
    ``vqa_attack_eps``: VQA-RAD closed questions are also answered on images perturbed by PGD
    of ``vqa_attack_steps`` steps (None: clean only).
    """

    tasks: list[EvalTask] = Field(
        default_factory=lambda: [
            "zero_shot",
            "linear_probe",
            "robust_zero_shot",
            "retrieval",
            "retrieval_adv",
            "vqa_closed",
        ]
    )
    max_test_items: int | None = Field(None, ge=1)
    linear_probe_max_train: int | None = Field(None, ge=1)
    retrieval_per_class_cap: int | None = Field(20, ge=1)
    vqa_epochs: int = Field(30, ge=1)
    bootstrap_resamples: int = Field(1000, ge=10)
    robust_eps: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)
    robust_max_items: int | None = Field(200, ge=1)
    robust_attacks: AttackList = Field(default_factory=lambda: [AttackEntry(name="pgd", steps=10)])
    retrieval_attack: str = "co-attack"
    retrieval_attack_kwargs: dict[str, Any] = Field(default_factory=lambda: {"eps": 2.0})
    retrieval_adv_per_class_cap: int | None = Field(5, ge=1)
    vqa_attack_eps: float | None = Field(2.0, gt=0, le=255)
    vqa_attack_steps: int = Field(10, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _old_fields(cls, raw: Any) -> Any:
        return refuse_old_fields(
            raw,
            {
                "attack_steps": "list the attacks with their steps under robust_attacks, e.g. "
                "robust_attacks: [{name: pgd, steps: 10}], and set vqa_attack_steps for VQA",
            },
        )

    @field_validator("robust_eps")
    @classmethod
    def _budgets(cls, values: list[float]) -> list[float]:
        if any(not 0 < v <= 255 for v in values) or len(set(values)) != len(values):
            raise ValueError(
                f"robust_eps must be distinct budgets in (0, 255] /255 units: {values}"
            )
        return sorted(values)


class NoiseConfig(StrictModel):
    """``medshield craft-noise``: replace a fraction ``ratio`` of the upstream pairs by
    adversarial pairs crafted with a registered multimodal ``attack`` against the surrogate
    (``model`` section: a trained ``checkpoint``, or a backend). ``eps`` is in /255 units."""

    attack: str = "co-attack"
    attack_kwargs: dict[str, Any] = Field(default_factory=dict)
    eps: float = Field(2.0, ge=0)
    ratio: float = Field(0.1, ge=0, le=1)
    split: Literal["train", "val", "test"] = "train"
    batch_size: int = Field(64, ge=1)


class RunConfig(StrictModel):
    """A whole run: what ``medshield pretrain``, ``evaluate`` and ``demo`` read."""

    name: FolderName = "run"
    output_dir: str = "runs"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                f"--set '{key}=\"...\"', or fix the brackets of a list like [a,b]"
            ) from None
    return raw


def load_yaml_model(
    model: type[M], path: str | Path | None = None, overrides: list[str] | None = None
) -> M:
    """Read a YAML file into the pydantic ``model`` (defaults when ``path`` is None), after
    applying ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply overrides."""
    return load_yaml_model(RunConfig, path, overrides)


def dump_config(config: BaseModel) -> str:
    """The YAML a run directory keeps as its identity: every field except the run-time ones
    (``runtime_fields``, e.g. the device), which do not change what the run computes and may
    differ when a run resumes elsewhere."""
    exclude = set(getattr(config, "runtime_fields", ()))
    return yaml.safe_dump(config.model_dump(mode="json", exclude=exclude), sort_keys=False)
