"""``medshield study finetune``: the robust fine-tuning comparison (RAN against the baselines).

Every cell (checkpoint x method x task x seed) is one ``medshield finetune`` run (see
:mod:`medshield.commands.finetune`) in ``<study>/cells/<cell>/``, with the same optimiser
steps, schedule, data and adversary for every method (matched budgets); a method with an
``lr_grid`` (or a ``kwargs_grid`` of alternative options) picks its learning rate (and options)
on the first seed's validation split, and its other seeds reuse that pick
(:func:`run_study_finetune`). The tasks are the modalities and, with
``vqa_closed`` (default on), the pseudo-modality ``vqa_rad_closed``: the VQA-RAD closed
questions answered "yes" or "no", each method fine-tuned as a yes/no classifier whose class
prompts are the item's own question followed by each answer (``"<question> yes"``,
``"<question> no"``, see :mod:`medshield.train.finetune.classifier`), evaluated clean and with the
image under the same PGD / APGD-CE / APGD-DLR attacks and budgets as the modalities. A cell
with a ``results.json`` is done and kept; an interrupted cell resumes from its own
``samples.jsonl``; the study resumes per cell. ``ran_ablations`` adds RAN variants with one loss
term switched off each (``ran-no_<term>``).

The study directory gets ``table.csv`` / ``table.md`` (per checkpoint, method and task: clean
accuracy, the two image-free references ``majority_accuracy`` and ``shuffled_image_accuracy``
(see :mod:`medshield.commands.finetune`), robust accuracy per attack and budget and the
per-image worst case over the attacks, retrieval R@1/5/10 clean and under the multimodal attack
(modalities, unless ``robust.retrieval`` is off), each pooled over seeds with a 95% bootstrap
CI from :func:`medshield.eval.metrics.bootstrap_ci`; trainable parameters, training wall time,
FLOPs and latency ratio to the base zero-shot classifier; failed sanity flags),
``results.json``, one plot per checkpoint and budget,
``robust_vs_clean_<checkpoint>_eps<eps>.png`` (worst-case robust accuracy against clean
accuracy, one point per method and task with CI bars), and one per checkpoint and retrieval
direction, ``retrieval_<direction>_<checkpoint>.png`` (R@1 under the multimodal attack against
clean R@1) (both written by :mod:`medshield.commands.studies.finetune_outputs`), and the
issue-20 report of :mod:`medshield.commands.studies.finetune_report`: per-task tables with their
references, the targets with paired CIs and verdicts, the RAN ablation, the training curves and
RAN's per-term log.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from medshield import data
from medshield.commands.finetune.config import FineTuneRunConfig, RobustEvalConfig
from medshield.commands.studies.cells import CellKey, reuse_cells, run_cells
from medshield.commands.studies.finetune_outputs import (
    aggregate,
    plot_retrieval,
    plot_robust_vs_clean,
    write_table,
)
from medshield.commands.studies.finetune_report import write_report
from medshield.config import (
    FolderName,
    ModelConfig,
    StrictModel,
    check_folder_name,
    load_yaml_model,
)
from medshield.device import DeviceName, Precision, resolve_device
from medshield.errors import ConfigError, DataError
from medshield.models.io import META_FILE as MODEL_META_FILE
from medshield.runs import RESULTS_FILE, Log, Run, has_results, read_results
from medshield.threads import usable_cores
from medshield.train.finetune.config import parse_finetune_config
from medshield.train.finetune.data import VQA_TASK
from medshield.train.finetune.ran import RAN_PARTS, RAN_TERMS, ablation_terms


class MethodSpec(StrictModel):
    """One compared method: a registered ``method``, its ``kwargs`` (RAN's loss weights among
    them), per-method ``finetune`` overrides (e.g. a smaller ``lr`` for full fine-tuning) and a
    ``label`` for the table (default: the method name)."""

    method: str
    label: FolderName | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or self.method


class StudyFinetuneConfig(StrictModel):
    """The comparison study.

    Attributes:
        checkpoints: label -> saved base model directory (e.g. pretrained at a clean, a
            moderate and a heavy noise ratio by the noise study); ``null`` builds ``model``
            from its backend instead.
        methods: the compared methods (by default every registered method: the clean ones,
            the ``adv-*`` baselines, TeCoA, FARE and FARE + probe, RAN).
        ran_ablations: RAN loss terms or parts (:data:`RAN_PARTS`: ``noise_aware``,
            ``realignment``, ``disentanglement``) to switch off one at a time (``all`` = every
            term, ``parts`` = every part).
        ablation_selection: where ``ran`` selects its learning rate (and options), ``own``
            has each ``ran-no_<part>`` variant pick its own from ``ran``'s grids; ``ran`` trains
            it once per seed at ``ran``'s first-seed pick (a controlled ablation, and 3
            trainings instead of 5 a variant with 3 seeds and an lr grid of 3).
        modalities: modality names or ``available``.
        vqa_closed: add the VQA-RAD closed yes/no task (``vqa_rad_closed``) to the modalities.
        seeds: one cell per seed.
        finetune: shared fine-tuning settings (step budget, schedule, batch size, lr or
            ``lr_grid``, items, adversary, ...). With an ``lr_grid`` a method's learning rate
            (with a ``kwargs_grid``, its options) is picked on the first seed and reused by the
            others (:func:`run_study_finetune`). A ``kwargs_grid`` belongs in a method's own
            ``finetune`` overrides (alternatives are method options); ``ran-no_<part>``
            ablations zero their terms in each alternative too.
        robust: clean / robust evaluation settings.
        device: where every cell trains and is attacked (``auto``, ``cpu``, ``cuda[:N]``).
        workers: cells run at once, each in its own process with ``budget // workers``
            threads (the thread budget of :mod:`medshield.threads`); several small cells share
            one GPU well. ``device`` and ``workers`` are left out of the study's saved config: a
            study may resume with other values.
        precision: ``fp32`` or ``bf16`` for every cell (see
            :attr:`~medshield.commands.finetune.config.FineTuneRunConfig.precision`); a run-time
            field like ``device``.
        reuse_from: other studies' folders whose finished cells of the same config this study
            copies instead of running (:mod:`medshield.commands.studies.reuse`); run-time.
    """

    name: FolderName = "study_finetune"
    output_dir: str = "runs"
    data_dir: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    checkpoints: dict[str, str | None] = Field(default_factory=lambda: {"base": None})
    methods: list[MethodSpec] = Field(
        default_factory=lambda: [
            MethodSpec(method=m)
            for m in (
                "linear-probe",
                "full",
                "lora",
                "adapter",
                "adv-linear-probe",
                "adv-lora",
                "adv-adapter",
                "tecoa",
                "fare",
                "fare-probe",
                "ran",
            )
        ]
    )
    ran_ablations: list[str] | Literal["all", "parts"] = Field(default_factory=list)
    ablation_selection: Literal["own", "ran"] = "own"
    modalities: list[str] | Literal["available"] = "available"
    vqa_closed: bool = True
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    finetune: dict[str, Any] = Field(default_factory=dict)
    robust: RobustEvalConfig = Field(default_factory=RobustEvalConfig)
    device: DeviceName = "auto"
    workers: int = Field(1, ge=1)
    precision: Precision = "fp32"
    reuse_from: list[str] = Field(default_factory=list)
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {"device", "workers", "precision", "reuse_from"}
    )

    @model_validator(mode="after")
    def _check(self) -> StudyFinetuneConfig:
        if not self.methods or not self.seeds or not self.checkpoints:
            raise ValueError("a study needs at least one checkpoint, method and seed")
        for key in ("method", "kwargs"):
            if key in self.finetune:
                raise ValueError(f"finetune.{key} is set per method under `methods`, not shared")
        unknown = set(self.ablated()) - set(RAN_TERMS) - set(RAN_PARTS)
        if unknown:
            raise ValueError(
                f"unknown RAN terms or parts {sorted(unknown)}; terms: {', '.join(RAN_TERMS)}; "
                f"parts: {', '.join(RAN_PARTS)}"
            )
        has_ran = any(m.method == "ran" for m in self.methods)
        if self.ablation_selection == "ran" and self.ablated() and not has_ran:
            raise ValueError("ablation_selection: ran needs a `ran` method among `methods`")
        names = [m.name for m in self.expanded_methods()]
        if len(set(names)) != len(names):
            raise ValueError(f"method labels must be unique, got {names}")
        for label in self.checkpoints:  # names its cells' run directories
            check_folder_name(label)
        for folder in self.reuse_from:
            if not (Path(folder) / "cells").is_dir():
                raise ValueError(f"reuse_from: {folder} is not a study folder (no cells/ in it)")
        return self

    def ablated(self) -> Sequence[str]:
        """The RAN terms or parts ablated one at a time."""
        if self.ran_ablations == "all":
            return RAN_TERMS
        if self.ran_ablations == "parts":
            return tuple(RAN_PARTS)
        return self.ran_ablations

    def ablation_base(self, name: str) -> tuple[str, dict[str, float]] | None:
        """A ``<ran>-no_<part>`` variant's ``ran`` label and zeroed terms (else None)."""
        base = next((m for m in self.methods if m.method == "ran"), MethodSpec(method="ran"))
        for part in self.ablated():
            if name == f"{base.name}-no_{part}":
                return base.name, dict.fromkeys(ablation_terms(part), 0.0)
        return None

    def expanded_methods(self) -> list[MethodSpec]:
        """The methods, with one RAN variant per ablated term right after the first ``ran``
        spec (the ablations are built on it)."""
        ablations = self.ablated()
        specs: list[MethodSpec] = []
        base = next((m for m in self.methods if m.method == "ran"), None)
        for spec in self.methods:
            specs.append(spec)
            if spec is base:
                specs.extend(_ablations(spec, ablations, self.finetune))
        if base is None:
            specs.extend(_ablations(MethodSpec(method="ran"), ablations, self.finetune))
        return specs


def _ablations(ran: MethodSpec, names: Sequence[str], shared: dict[str, Any]) -> list[MethodSpec]:
    """RAN with each of ``names`` switched off: its terms zeroed in ``kwargs`` and in every
    alternative of a ``kwargs_grid`` (the spec's, else the shared ``finetune``'s), so no
    alternative turns an ablated term back on; alternatives that become the same are kept
    once."""
    specs = []
    for name in names:
        off = dict.fromkeys(ablation_terms(name), 0.0)
        finetune = dict(ran.finetune)
        grid = finetune.get("kwargs_grid", shared.get("kwargs_grid"))
        if grid is not None:
            merged = [{**entry, **off} for entry in grid]
            finetune["kwargs_grid"] = [e for i, e in enumerate(merged) if e not in merged[:i]]
        specs.append(
            MethodSpec(
                method="ran",
                label=f"{ran.name}-no_{name}",
                kwargs={**ran.kwargs, **off},
                finetune=finetune,
            )
        )
    return specs


def load_study_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> StudyFinetuneConfig:
    """Read the study YAML and overrides, and validate every cell's fine-tuning config, the
    device and the worker count on this machine.

    Raises:
        ConfigError: a bad cell config, a CUDA device this machine lacks, or more ``workers``
            than the cores this process may run on (more processes than cores only wait on
            each other).
    """
    config = load_yaml_model(StudyFinetuneConfig, path, overrides)
    for spec in config.expanded_methods():
        _finetune_config(config, spec)  # every method's config fails now, not mid-study
    resolve_device(config.device)  # a GPU this machine lacks fails before any cell
    cores = usable_cores()
    if config.workers > cores:
        raise ConfigError(
            f"workers: {config.workers} is more than the {cores} core(s) this process may run "
            f"on; set workers to at most {cores} (e.g. --set workers={cores})"
        )
    return config


def _finetune_config(config: StudyFinetuneConfig, spec: MethodSpec) -> Any:
    raw = {**config.finetune, **spec.finetune, "method": spec.method, "kwargs": spec.kwargs}
    try:
        return parse_finetune_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"method {spec.name!r}: {exc}") from None


def _check_checkpoints(config: StudyFinetuneConfig) -> None:
    for label, path in config.checkpoints.items():
        if path is not None and not (Path(path) / MODEL_META_FILE).is_file():
            raise DataError(
                f"checkpoint {label!r}: {path} is not a saved medshield model "
                f"({MODEL_META_FILE} missing); pretrain one with `medshield pretrain`"
            )


def _modalities(config: StudyFinetuneConfig) -> list[str]:
    """The study's tasks: its modalities, then ``vqa_rad_closed`` when ``vqa_closed``."""
    vqa = [VQA_TASK] if config.vqa_closed else []
    for split in ("train", "test") if vqa else ():
        data.load_vqa_rad(split, config.data_dir)  # a missing VQA-RAD fails before any cell
    if config.modalities == "available":
        train = set(data.available_modalities(config.data_dir, split="train"))
        found = [m for m in data.available_modalities(config.data_dir, "test") if m in train]
        if not found and not vqa:
            raise DataError("no modality has both a train and a test split under the data dir")
        return found + vqa
    tasks = [data.get_modality(m).name for m in config.modalities] + vqa
    if not tasks:
        raise DataError("the study has no task: no modality and vqa_closed is false")
    return tasks


def cell_name(checkpoint: str, method: str, task: str, seed: int) -> str:
    """The cell's run directory name under ``<study>/cells``."""
    return f"{checkpoint}__{method}__{task}__seed{seed}"


def _finished(cells_dir: Path, name: str, recorded: set[str]) -> bool:
    """Whether the cell is recorded in the study's samples and has its results."""
    return name in recorded and has_results(cells_dir / name)


def cell_config(
    config: StudyFinetuneConfig,
    checkpoint: str,
    spec: MethodSpec,
    modality: str,
    seed: int,
    lr_selection: dict[str, Any] | None = None,
) -> FineTuneRunConfig:
    """The ``medshield finetune`` config of one cell (``lr_selection``: another cell's pick,
    see :func:`reused_selection`)."""
    model = config.model.model_copy(update={"checkpoint": config.checkpoints[checkpoint]})
    return FineTuneRunConfig(
        name=cell_name(checkpoint, spec.name, modality, seed),
        output_dir="",
        seed=seed,
        modality=modality,
        data_dir=config.data_dir,
        model=model,
        finetune=_finetune_config(config, spec),
        robust=config.robust,
        device=config.device,
        lr_selection=lr_selection,
        precision=config.precision,
    )


def pick_source(config: StudyFinetuneConfig, key: CellKey) -> CellKey | None:
    """The cell whose selection ``key`` trains at: its method's first-seed cell for a later
    seed of a method with an ``lr_grid`` or ``kwargs_grid``, ``ran``'s for a ``ran-no_<part>``
    on any seed with ``ablation_selection: ran``; None where it selects itself or nothing."""
    checkpoint, name, modality, seed = key
    specs = {spec.name: spec for spec in config.expanded_methods()}
    base = config.ablation_base(name) if config.ablation_selection == "ran" else None
    if base is not None and _finetune_config(config, specs[base[0]]).selects:
        return checkpoint, base[0], modality, config.seeds[0]
    if seed == config.seeds[0] or not _finetune_config(config, specs[name]).selects:
        return None
    return checkpoint, name, modality, config.seeds[0]


def reused_selection(
    config: StudyFinetuneConfig, cells_dir: Path, key: CellKey
) -> dict[str, Any] | None:
    """The ``lr_selection`` that ``key`` trains at (:func:`pick_source`), with ``from_seed``
    (and ``from_method`` for ``ran``'s, its options with the variant's terms zeroed)."""
    source = pick_source(config, key)
    if source is None:
        return None
    result = read_results(cells_dir / cell_name(*source))
    selection = {**result["report"]["lr_selection"], "from_seed": source[3]}
    base = config.ablation_base(key[1])
    if source[1] != key[1] and base is not None:
        selection["from_method"] = source[1]
        if "kwargs_pick" in selection:
            selection["kwargs_pick"] = {**selection["kwargs_pick"], **base[1]}
    return selection


def run_study_finetune(config: StudyFinetuneConfig, run: Run, log: Log = print) -> dict[str, Any]:
    """Run (or resume) every cell, then write the table, plots and aggregated results.

    Cells run one at a time or, with ``workers`` > 1, in that many processes at once, the first
    seed's cells first; each finished cell is recorded in the study's ``samples.jsonl`` as it
    completes. A method with an ``lr_grid`` or ``kwargs_grid`` picks on the first seed, and its
    cells of the other seeds train once at that pick (``lr_selection`` with ``from_seed`` in
    their results; with ``ablation_selection: ran``, RAN's ablations train at ``ran``'s, see
    :func:`pick_source`): such a cell starts as soon as the cell it reads has finished, the
    other cells need not wait.
    """
    _check_checkpoints(config)
    modalities = _modalities(config)
    specs = {spec.name: spec for spec in config.expanded_methods()}
    cells_dir = run.path / "cells"
    done = {r["cell"] for r in run.load_samples() if "cell" in r}
    grid = [
        (checkpoint, name, modality, seed)
        for checkpoint in config.checkpoints
        for name in specs
        for modality in modalities
        for seed in config.seeds
    ]

    configs: dict[CellKey, FineTuneRunConfig] = {}

    def build(key: CellKey) -> FineTuneRunConfig:  # once per cell: it may read another's pick
        if key not in configs:
            checkpoint, name, modality, seed = key
            reused = reused_selection(config, cells_dir, key)
            configs[key] = cell_config(config, checkpoint, specs[name], modality, seed, reused)
        return configs[key]

    seed_major = sorted(grid, key=lambda key: config.seeds.index(key[3]))
    todo = [key for key in seed_major if not _finished(cells_dir, cell_name(*key), done)]
    waits_for = partial(pick_source, config)
    todo = reuse_cells(config.reuse_from, todo, waits_for, build, run, log)
    if todo:
        log(f"{len(todo)} of {len(grid)} cells to run, {config.workers} at a time")
    cells_run = run_cells(todo, waits_for, build, cells_dir, config.workers, log)
    for count, cfg in enumerate(cells_run, 1):
        log(f"[{count}/{len(todo)}] {cfg.name} done")
        run.append_samples(
            [{"cell": cfg.name, "results": str(cells_dir / cfg.name / RESULTS_FILE)}]
        )
    cells: list[dict[str, Any]] = []
    for checkpoint, name, modality, seed in grid:
        cfg = build((checkpoint, name, modality, seed))
        path = cells_dir / cfg.name
        cells.append(
            {
                "cell": cfg.name,
                "checkpoint": checkpoint,
                "method": name,
                "modality": modality,
                "seed": seed,
                "result": read_results(path),
                "rows": Run(path, cfg).load_samples(),
                "lr": cfg.finetune.lr,
            }
        )
    table = aggregate(cells, config.robust)
    write_table(table, run.path)
    plots = plot_robust_vs_clean(table, config.robust.eps, run.path)
    plots += plot_retrieval(table, run.path)
    ev = config.robust
    report = write_report(cells, table, ev.eps, ev.bootstrap_resamples, run.path)
    return {
        "modalities": modalities,
        "methods": list(specs),
        "checkpoints": list(config.checkpoints),
        "cells": len(cells),
        "table": table,
        "plots": [str(p) for p in plots],
        **report,
    }


def study_run_dir(config: StudyFinetuneConfig) -> Path:
    return Path(config.output_dir) / config.name
