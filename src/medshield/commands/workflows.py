"""End-to-end workflows behind the CLI: pretrain, evaluate and craft-noise (the demo,
:mod:`medshield.commands.demo`, composes them).

Each takes a :class:`RunConfig` and writes a run directory (see :mod:`medshield.runs`); the CLI
only parses arguments and calls these, so everything here is importable and scriptable.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from medshield.attacks.multimodal import build_multimodal_attack
from medshield.config import AttackEntry, RunConfig
from medshield.data import (
    ImageCaptionDataset,
    available_modalities,
    get_modality,
    missing_data_error,
)
from medshield.errors import DataError
from medshield.eval.linear_probe import linear_probe_rows
from medshield.eval.metrics import image_use_flag, summarize
from medshield.eval.retrieval import adversarial_retrieval_rows, retrieval_rows
from medshield.eval.robust import per_image, robust_flags, robust_zero_shot_rows
from medshield.eval.vqa import vqa_closed_rows
from medshield.eval.zero_shot import zero_shot_rows
from medshield.models import DualEncoder, create_model, load_model, save_model
from medshield.noise import NoisyCaptionDataset, craft_noisy_dataset, file_sha256
from medshield.runs import Log, Run, check_measured
from medshield.train.pretrain import pretrain


def resolve_modalities(config: RunConfig, split: str) -> list[str]:
    """The configured modalities, or every modality with ``split`` on disk for ``available``."""
    if config.data.modalities == "available":
        found = available_modalities(config.data.data_dir, split=split)
        if not found:
            raise missing_data_error(split, config.data.data_dir)
        return found
    return [get_modality(m).name for m in config.data.modalities]


def build_model(config: RunConfig) -> DualEncoder:
    """The configured model; new heads are initialised from the run's seed."""
    torch.manual_seed(config.seed)
    if config.model.checkpoint:
        return load_model(config.model.checkpoint)
    return create_model(config.model.backend, **config.model.kwargs)


def build_evaluated(config: RunConfig) -> tuple[DualEncoder, tuple[Any, dict[str, Any]] | None]:
    """What ``medshield evaluate`` evaluates: ``(model, None)`` for a dual encoder (see
    :func:`build_model`), or, when ``model.checkpoint`` is the ``finetuned/`` directory of a
    ``medshield finetune`` run (it holds ``finetune.json``), the fine-tuned dual encoder (the
    method's adapted towers, RAN's MLP rectifier on the image path) and ``(classifier, its
    fine-tuning record)``; the base model is rebuilt from the reference the record holds.

    Raises:
        DataError: a fine-tuned directory whose files or base model do not fit.
    """
    from medshield.train.finetune.classifier import adapted_encoder
    from medshield.train.finetune.io import META_FILE, load_finetuned

    checkpoint = config.model.checkpoint
    if checkpoint and (Path(checkpoint) / META_FILE).is_file():
        classifier, meta = load_finetuned(checkpoint)  # seeded from its record, as in training
        return adapted_encoder(classifier), (classifier, meta)
    return build_model(config), None


def _clean_pairs(config: RunConfig, modalities: list[str], split: str) -> ImageCaptionDataset:
    return ImageCaptionDataset(
        modalities,
        split=split,
        seed=config.seed,
        per_class_cap=config.data.train_per_class_cap,
        data_dir=config.data.data_dir,
    )


def run_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / config.name


def run_pretrain(
    config: RunConfig,
    run: Run,
    model: DualEncoder,
    log: Log = print,
    dataset: Dataset | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Pretrain ``model`` on the train splits of the configured modalities, resumably.

    ``dataset`` replaces the configured data (e.g. a :class:`~medshield.noise.NoisyMix`). The
    final model is saved to ``<run>/model`` when ``save``; per-epoch rows go to
    ``samples.jsonl``.
    """
    if dataset is not None:
        modalities = list(dict.fromkeys(dataset.modality_of))
    elif config.data.noisy_dataset:
        dataset = NoisyCaptionDataset(config.data.noisy_dataset)
        modalities = list(dict.fromkeys(dataset.modality_of))
        log(
            f"using the noisy dataset {config.data.noisy_dataset} "
            f"({int(dataset.perturbed.sum())} of {len(dataset)} pairs adversarial)"
        )
    else:
        modalities = resolve_modalities(config, "train")
        dataset = _clean_pairs(config, modalities, "train")
    log(
        f"pretraining {config.model.backend} on {len(dataset)} image-caption pairs "
        f"from {', '.join(modalities)}"
    )
    history = pretrain(model, dataset, config.pretrain, run.path / "checkpoints", config.seed)
    done = {r["epoch"] for r in run.load_samples() if r.get("task") == "pretrain"}
    run.append_samples(
        {"task": "pretrain", **e} for e in history["epochs"] if e["epoch"] not in done
    )
    if save:
        save_model(model, run.path / "model")
    return {
        "modalities": modalities,
        "train_pairs": len(dataset),
        "history": history,
        "model_dir": str(run.path / "model") if save else None,
    }


def remove_checkpoints(run_path: Path) -> None:
    """Delete a finished run's training checkpoints (the saved model and rows stay)."""
    shutil.rmtree(run_path / "checkpoints", ignore_errors=True)


def run_craft_noise(config: RunConfig, run: Run, log: Log = print) -> dict[str, Any]:
    """Write a noisy upstream dataset to ``<run>/noisy`` (resumes an interrupted crafting).

    The surrogate is the configured model (normally a pretrained ``model.checkpoint``); the
    clean pairs are those pretraining would read from ``noise.split``.
    """
    noise = config.noise
    attack = build_multimodal_attack(noise.attack, {"eps": noise.eps, **noise.attack_kwargs})
    modalities = resolve_modalities(config, noise.split)
    clean = _clean_pairs(config, modalities, noise.split)
    surrogate = build_model(config)
    checksum = None
    if config.model.checkpoint:
        checksum = file_sha256(Path(config.model.checkpoint) / "model.safetensors")
    log(
        f"crafting {noise.attack} noise (ratio {noise.ratio}, eps {noise.eps}/255) on "
        f"{len(clean)} pairs from {', '.join(modalities)}"
    )
    out = craft_noisy_dataset(
        clean,
        surrogate,
        attack,
        noise.ratio,
        run.path / "noisy",
        seed=config.seed,
        batch_size=noise.batch_size,
        surrogate_checksum=checksum,
    )
    noisy = NoisyCaptionDataset(out)
    if not run.load_samples():
        run.append_samples(json.loads(line) for line in (out / "rows.jsonl").open())
    manifest = noisy.manifest
    return {
        "noisy_dataset": str(out),
        "rows": len(noisy),
        "perturbed": int(noisy.perturbed.sum()),
        "max_linf_255": manifest["max_linf_255"],
        "attack": manifest["attack"],
    }


def run_evaluate(
    config: RunConfig,
    run: Run,
    model: DualEncoder,
    log: Log = print,
    finetuned: tuple[Any, dict[str, Any]] | None = None,
) -> dict:
    """Evaluate ``model`` on every configured task, resuming from finished groups of rows.

    With ``finetuned`` (``(classifier, record)`` from :func:`build_evaluated`), the fine-tuned
    classifier is also evaluated on its own task (group ``finetuned/<task>``: clean and under
    every attack of ``robust_attacks`` at ``robust_eps`` on ``robust_max_items`` test images,
    with the same sanity flags as ``robust_zero_shot`` plus ``uses image``, against the
    shuffled-image control), and the result holds the method's record
    (method, task, trainable parameters, wall time, inference overhead).

    Rows are written one (task, modality) group at a time, each row tagged with its group and
    the group's size, so a group a crash cut short is dropped and recomputed. A group whose data
    is missing or corrupt is skipped (said in the log and under ``skipped``).

    Raises:
        NothingMeasured: every group was skipped.
    """
    ev, seed, data_dir = config.evaluate, config.seed, config.data.data_dir
    modalities = resolve_modalities(config, "test")
    complete = run.complete_groups()  # drops what a crash left half-written
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
        if "robust_zero_shot" in ev.tasks:
            jobs.append(
                (
                    f"robust_zero_shot/{m}",
                    lambda m=m: robust_zero_shot_rows(
                        model,
                        m,
                        eps_values=ev.robust_eps,
                        attacks=ev.robust_attacks,
                        max_items=ev.robust_max_items,
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
    if "retrieval_adv" in ev.tasks:
        attack = build_multimodal_attack(ev.retrieval_attack, ev.retrieval_attack_kwargs)
        jobs.append(
            (
                "retrieval_adv/all",
                lambda: adversarial_retrieval_rows(
                    model,
                    modalities,
                    attack,
                    per_class_cap=ev.retrieval_adv_per_class_cap,
                    seed=seed,
                    data_dir=data_dir,
                ),
            )
        )
    if finetuned is not None:
        from medshield.commands.finetune import finetuned_rows

        classifier, record = finetuned
        jobs.append(
            (
                f"finetuned/{record['modality']}",
                lambda: finetuned_rows(
                    classifier,
                    record["modality"],
                    ev.robust_eps,
                    ev.robust_attacks,
                    ev.robust_max_items,
                    seed=seed,
                    data_dir=data_dir,
                ),
            )
        )
    if "vqa_closed" in ev.tasks:
        jobs.append(
            (
                "vqa_closed/radiology",
                lambda: vqa_closed_rows(
                    model,
                    epochs=ev.vqa_epochs,
                    seed=seed,
                    data_dir=data_dir,
                    attack_eps=ev.vqa_attack_eps,
                    attack_steps=ev.vqa_attack_steps,
                ),
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

    check_measured(
        "evaluation groups",
        len(jobs),
        Counter(skipped.values()),
        "check the data directory (MEDSHIELD_DATA_DIR or data.data_dir) and the configured "
        "modalities and tasks",
        log,
    )
    rows = [r for r in run.load_samples() if "group" in r]
    metrics = summarize(rows, n_resamples=ev.bootstrap_resamples)
    sanity = robust_sanity(rows, ev.robust_attacks)
    for group, flags in sanity.items():
        for flag in flags:
            if not flag["passed"]:
                where = f"{sanity_group(group)} {flag.get('group', '')}".strip()
                log(f"  SANITY FAIL {where} {flag['name']}: {flag['detail']}")
    result = {"modalities": modalities, "metrics": metrics, "sanity": sanity, "skipped": skipped}
    if finetuned is not None:
        record = finetuned[1]
        result["finetuned"] = {
            "method": record["method"],
            "task": record["modality"],
            "base": record.get("base"),
            "report": record.get("report"),
        }
    return result


def sanity_group(key: str) -> str:
    """The evaluation group of a :func:`robust_sanity` key: a modality stands for its
    ``robust_zero_shot`` group, ``finetuned/<task>`` for itself."""
    return key if "/" in key else f"robust_zero_shot/{key}"


def robust_sanity(
    rows: list[dict[str, Any]], attacks: list[AttackEntry] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Sanity flags of the robust rows (:func:`medshield.eval.robust.robust_flags` of the
    evaluation's ``attacks``): per modality for ``robust_zero_shot``, under ``finetuned/<task>``
    for a fine-tuned classifier (see :func:`sanity_group`), where rows with the shuffled control
    add the ``uses image`` flag."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("task") == "robust_zero_shot":
            by_group.setdefault(r["modality"], []).append(r)
        elif r.get("task") == "finetuned":
            by_group.setdefault(f"finetuned/{r['modality']}", []).append(r)
    sanity = {g: robust_flags(group, attacks) for g, group in sorted(by_group.items())}
    for g, group in by_group.items():
        images = per_image(group)
        if g.startswith("finetuned/") and all("shuffled_correct" in r for r in images):
            own = [bool(r["clean_correct"]) for r in images]
            sanity[g].append(image_use_flag(own, [bool(r["shuffled_correct"]) for r in images]))
    return sanity
