"""The config of a ``medshield finetune`` run (:class:`FineTuneRunConfig`): base model, task,
fine-tuning (:class:`~medshield.train.finetune.config.FineTuneConfig`) and the clean and robust
evaluation after it (:class:`RobustEvalConfig`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from medshield.attacks.multimodal import MultimodalAttack, build_multimodal_attack
from medshield.config import (
    AttackEntry,
    AttackList,
    FolderName,
    ModelConfig,
    StrictModel,
    refuse_old_fields,
)
from medshield.device import DeviceName, Precision
from medshield.errors import ConfigError, UnknownNameError
from medshield.train.finetune.config import FineTuneConfig

CUDA_BATCH = 512
"""Images per attack call at least, on a CUDA device (``robust.batch_size`` on the CPU)."""


#: The attacks of ``medshield finetune``'s robust evaluation when the config names none.
DEFAULT_ATTACKS = (
    {"name": "pgd", "steps": 10, "restarts": 2},
    {"name": "pgd", "steps": 50, "restarts": 2},
    {"name": "apgd-ce", "steps": 50},
    {"name": "apgd-dlr", "steps": 50},
)

OLD_FIELDS = dict.fromkeys(
    ("pgd_steps", "restarts", "apgd_steps", "apgd", "apgd_dlr"),
    "list the attacks under robust.attacks with their arguments, e.g. attacks: "
    "[{name: pgd, steps: 10, restarts: 2}, {name: apgd-ce, steps: 50}]",
)


class RobustEvalConfig(StrictModel):
    """Clean and robust evaluation after fine-tuning (budgets and step sizes in /255).

    ``attacks``: the registered image attacks with their arguments and ``restarts`` (see
    :class:`~medshield.config.AttackEntry`), each run at every budget of ``eps``; every attack
    and budget is a row group of its own and enters the per-image worst case. Default: PGD-10
    and PGD-50 with 2 restarts each, APGD-CE-50 and APGD-DLR-50.

    ``early_stop``: an attack stops on an image once the image is misclassified, keeping that
    adversarial image (see :class:`medshield.attacks.base.Attack`), and an entry's later
    restarts attack only the images no earlier restart fooled (a fooled image's later rows
    repeat its fooling row; see :func:`medshield.eval.robust.attacked_rows`): fewer gradient
    steps for the same per-image worst case. Within a run the images that hold follow the
    same iterates, so one run's robust accuracy can only fall or stay; a later restart draws
    its random starts for the images left only, so its iterates differ from a full-batch
    restart's (the same attack, other random numbers). Off, every attack takes all its steps
    on every image, as before 2026-12-06. Not on the VQA task, whose classifier holds one
    question per image of the batch.

    ``retrieval``: also evaluate image-text retrieval with the fine-tuned encoder on a
    modality, clean and under the registered multimodal ``retrieval_attack`` built with
    ``retrieval_attack_kwargs``, over ``retrieval_per_class_cap`` test images per class.
    """

    eps: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0])
    attacks: AttackList = Field(
        default_factory=lambda: [AttackEntry.model_validate(a) for a in DEFAULT_ATTACKS]
    )
    early_stop: bool = True
    max_test_items: int | None = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    """Images per forward pass and per attack call; on a CUDA device the attacks take at least
    :data:`CUDA_BATCH` (512) images per call, i.e. every test image of a cell at once."""
    bootstrap_resamples: int = Field(1000, ge=10)
    retrieval: bool = True
    retrieval_per_class_cap: int | None = Field(10, ge=1)
    retrieval_attack: str = "co-attack"
    retrieval_attack_kwargs: dict[str, Any] = Field(default_factory=lambda: {"eps": 2.0})

    @model_validator(mode="before")
    @classmethod
    def _old_fields(cls, raw: Any) -> Any:
        return refuse_old_fields(raw, OLD_FIELDS)

    @model_validator(mode="after")
    def _check_retrieval_attack(self) -> RobustEvalConfig:
        if self.retrieval:
            try:
                self.multimodal_attack()
            except (ConfigError, UnknownNameError) as exc:
                raise ValueError(f"retrieval_attack: {exc}") from None
        return self

    def multimodal_attack(self) -> MultimodalAttack:
        """The configured retrieval attack (ConfigError / UnknownNameError for a bad one)."""
        return build_multimodal_attack(self.retrieval_attack, self.retrieval_attack_kwargs)


class FineTuneRunConfig(StrictModel):
    """A ``medshield finetune`` run: base model, modality, fine-tuning and evaluation."""

    name: FolderName = "finetune"
    output_dir: str = "runs"
    seed: int = 0
    modality: str = "chest_xray"
    data_dir: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    robust: RobustEvalConfig = Field(default_factory=RobustEvalConfig)
    device: DeviceName = "auto"
    """Where to train and attack: ``auto`` (a CUDA GPU when visible, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``. Saved models are device-independent, and the device is not part of
    the run's saved config, so a run started on a GPU resumes on a CPU and vice versa."""
    lr_selection: dict[str, Any] | None = None
    """A selection made by another run (a study's first seed, with ``from_seed``): train once
    at its ``pick`` (and its ``kwargs_pick`` merged over ``finetune.kwargs``, where the
    selection had a ``kwargs_grid``) instead of searching ``finetune.lr_grid`` /
    ``finetune.kwargs_grid``, and record it as this run's ``lr_selection``."""
    precision: Precision = "fp32"
    """The arithmetic of training and attacks: ``fp32``, or ``bf16`` (autocast to bfloat16;
    a GPU without native bfloat16 is a ConfigError, see
    :func:`medshield.device.check_precision`). Like the device, not part of the saved config:
    ``results.json`` records both."""
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"device", "precision"})

    @model_validator(mode="after")
    def _check_lr_selection(self) -> FineTuneRunConfig:
        if self.lr_selection is not None and not isinstance(
            self.lr_selection.get("pick"), int | float
        ):
            raise ValueError("lr_selection needs the picked learning rate as `pick` (a number)")
        if self.lr_selection is not None:
            if not isinstance(self.lr_selection.get("kwargs_pick", {}), dict):
                raise ValueError("lr_selection's `kwargs_pick` must be a mapping of options")
            self.finetune.at_pick(self.lr_selection).options  # noqa: B018 (fits the method)
        return self
