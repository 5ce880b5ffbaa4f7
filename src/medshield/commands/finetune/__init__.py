"""``medshield finetune``: fine-tune one method on one task, then evaluate it clean and robust.

The task (``modality``) is a modality or ``vqa_rad_closed``, the VQA-RAD closed yes/no questions
answered through question-conditioned class prompts (see
:mod:`medshield.train.finetune.classifier`). The run directory (see :mod:`medshield.runs`) holds
``config.yaml``, ``finetuned/`` (the saved method state, see
:func:`~medshield.train.finetune.save_finetuned`), ``samples.jsonl`` and ``results.json``.
Evaluation on a class-balanced test subsample:

- ``clean``: one row per image (``index``: its row in the split, the question id for VQA;
  ``label``, ``pred``, ``correct``), with ``majority_accuracy``, what always answering the most
  frequent test label gets right (clean and under any image attack);
- ``shuffled``: the same rows with each item's image swapped for another test item's (a seeded
  derangement; on the VQA task the question stays): ``shuffled_image_accuracy`` and the
  ``uses image`` flag (clean accuracy above it: otherwise the classifier answers from its
  prompts or class priors, not the image). A constant classifier keeps ``majority_accuracy``
  under any image attack, so a robust accuracy below it is worse than ignoring the image;
- for every budget ``eps`` (default 1, 2, 4 /255) and every image attack of ``robust.attacks``
  (registered names with their arguments, see :class:`~medshield.config.AttackEntry`; default
  PGD-10 and PGD-50 with 2 random restarts each, Madry et al. 2018, APGD-CE-50 and
  APGD-DLR-50, Croce and Hein 2020; DLR is the plain margin loss on a two-class task, see
  :func:`medshield.attacks.apgd_dlr.dlr_loss`): a row group ``<attack>@<eps>`` of the flat rows
  of :func:`medshield.eval.robust.robust_rows`, one per image and restart (on the VQA task the
  image is attacked, its question stays); ``robust_accuracy/<attack>@<eps>`` and
  ``robust_accuracy/worst@eps``, the per-image worst case over attacks and restarts
  (:func:`medshield.eval.robust.worst_case`), and the sanity flags of
  :func:`medshield.eval.robust.robust_flags`;
- on a modality, unless ``robust.retrieval`` is false, ``retrieval`` and ``retrieval_adv``:
  image-text retrieval over the modality's test images (``retrieval_per_class_cap`` per class)
  with the fine-tuned dual encoder (:func:`~medshield.train.finetune.classifier.adapted_encoder`),
  clean and with every image-caption pair attacked by the multimodal ``retrieval_attack``
  (Co-Attack at eps 2/255 by default), rows from :mod:`medshield.eval.retrieval`; metrics
  ``retrieval_{i2t,t2i}[_adv]/R@{1,5,10}`` and an ``retrieval adv<=clean`` flag on R@1.

With ``finetune.lr_grid`` (and / or ``finetune.kwargs_grid``, alternative method options) the
model is the best of one training per learning rate (and alternative) on the validation split
(:mod:`medshield.train.finetune.select`); ``lr_selection`` in the config
instead trains once at a pick made elsewhere (a study's first seed). Either way the report
carries ``lr_selection``, and always ``compute`` (the counted training passes).

Rows are written one group at a time, tagged with the group and its size, so an interrupted
run keeps finished groups and recomputes only a group a crash cut short; a saved fine-tuned
model is loaded instead of retrained. Accuracies carry 95% bootstrap CIs
(:func:`medshield.eval.metrics.bootstrap_ci`), and the sanity flags (budget, range,
robust<=clean, stronger<=weaker, zero-gradients, uses image) are in ``results.json``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medshield.commands.finetune.config import CUDA_BATCH, FineTuneRunConfig, RobustEvalConfig
from medshield.config import (
    AttackEntry,
    attack_labels,
    load_yaml_model,
)
from medshield.device import autocast, check_precision, resolve_device
from medshield.errors import DataError
from medshield.eval.metrics import RECALL_KS, bootstrap_ci, image_use_flag, majority_hits
from medshield.eval.retrieval import adversarial_retrieval_rows, retrieval_rows
from medshield.eval.robust import robust_flags, robust_rows, worst_case
from medshield.models.base import DualEncoder
from medshield.runs import Log, Run
from medshield.train.finetune.classifier import FineTunedClassifier, adapted_encoder
from medshield.train.finetune.data import (
    VQA_TASK,
    item_slices,
    load_train_data,
    predict_classes,
    task_name,
)
from medshield.train.finetune.deploy import evaluation_copy
from medshield.train.finetune.io import META_FILE, build_base, load_finetuned, save_finetuned
from medshield.train.finetune.loop import finetune
from medshield.train.finetune.select import finetune_grid

RETRIEVAL_GROUPS = ("retrieval", "retrieval_adv")


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


_BASES: dict[str, tuple[DualEncoder, torch.Tensor]] = {}
"""This process's base models by reference (and a checkpoint's file times, so a checkpoint
saved again is loaded again), each with the CPU random state building it left: a study worker
loads each base once for all the cells it runs."""


def load_base(config: FineTuneRunConfig) -> DualEncoder:
    """The base model (a fresh copy of this process's cached one), with a clear error for a
    fine-tuned directory given as a checkpoint. A backend built from its seed leaves the random
    state as building it does."""
    checkpoint = config.model.checkpoint
    if checkpoint and (Path(checkpoint) / META_FILE).is_file():
        raise DataError(
            f"{checkpoint} holds a fine-tuned classifier, not a base dual encoder; give the "
            "base model it was fine-tuned from as model.checkpoint"
        )
    reference = base_reference(config)
    folder = Path(checkpoint) if checkpoint else None
    stamp = [f.stat().st_mtime_ns for f in folder.iterdir()] if folder and folder.is_dir() else []
    key = json.dumps([reference, max(stamp, default=0)], sort_keys=True, default=str)
    if key not in _BASES:
        model = build_base(reference)
        _BASES[key] = copy.deepcopy(model), torch.get_rng_state()
        return model
    model, rng_state = _BASES[key]
    if "seed" in reference:
        torch.manual_seed(int(reference["seed"]))  # the CUDA generators, as build_base seeds them
        torch.set_rng_state(rng_state)
    return copy.deepcopy(model)


def attacks_stop_early(ev: RobustEvalConfig, classifier: torch.nn.Module) -> bool:
    """Whether the evaluation attacks of ``classifier`` stop early (``ev.early_stop``): never
    on a question-conditioned classifier (the VQA task), which holds one question per image of
    the batch, so its attacks cannot drop images mid-batch."""
    return ev.early_stop and not getattr(classifier, "conditioned", False)


def share_bootstrap_ci(values: list[bool], resamples: int, seed: int = 0) -> dict[str, float | int]:
    """The share of true values with its 95% bootstrap interval."""
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
    flags: list[dict[str, Any]] = []
    if "clean" in by_group:
        metrics["clean_accuracy"] = share_bootstrap_ci(
            [r["correct"] for r in by_group["clean"]], ev.bootstrap_resamples, seed
        )
        metrics["majority_accuracy"] = share_bootstrap_ci(
            majority_hits(by_group["clean"]), ev.bootstrap_resamples, seed
        )
    if "clean" in by_group and "shuffled" in by_group:
        metrics["shuffled_image_accuracy"] = share_bootstrap_ci(
            [r["correct"] for r in by_group["shuffled"]], ev.bootstrap_resamples, seed
        )
        own = [r["correct"] for r in by_group["clean"]]
        other = [r["correct"] for r in by_group["shuffled"]]
        flags.append({**image_use_flag(own, other), "group": "shuffled"})
    names = attack_labels(ev.attacks)
    for eps in ev.eps:
        for name in names:
            hits = worst_case(rows, eps, name)
            if hits:
                metrics[f"robust_accuracy/{name}@{eps:g}"] = share_bootstrap_ci(
                    hits, ev.bootstrap_resamples, seed
                )
        worst = worst_case(rows, eps)
        if worst:
            metrics[f"robust_accuracy/worst@{eps:g}"] = share_bootstrap_ci(
                worst, ev.bootstrap_resamples, seed
            )
    if any("attack" in r for r in rows):
        flags.extend(robust_flags(rows, ev.attacks))
    recall = recall_indicators(rows)
    for name, hits in recall.items():
        metrics[name] = share_bootstrap_ci(hits, ev.bootstrap_resamples, seed)
    flags.extend(retrieval_flags(recall))
    return metrics, flags


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` that moves every index: one random cycle through
    all ``n`` (at least 2) items, so that item ``order[i]`` gets item ``order[i + 1]``."""
    if n < 2:
        raise DataError(f"shuffling images needs at least 2 test items, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty_like(order)
    out[order] = order.roll(-1)
    return out


def recall_indicators(rows: list[dict[str, Any]]) -> dict[str, list[bool]]:
    """Per retrieval task and k, one hit (rank < k) per query: ``retrieval_i2t/R@1`` -> [...]."""
    ranks: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        if r.get("group") in RETRIEVAL_GROUPS:
            ranks.setdefault(r["task"], []).append((r["index"], r["rank"]))
    return {
        f"{task}/R@{k}": [rank < k for _, rank in sorted(ranks[task])]
        for task in sorted(ranks)
        for k in RECALL_KS
    }


def retrieval_flags(recall: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """``retrieval adv<=clean`` per direction, from :func:`recall_indicators` (the same queries,
    clean and attacked, in index order): the multimodal attack does not raise R@1 beyond chance.
    The check is paired: it fails when the attack moved clearly more queries into rank 1 than
    out of it (one-sided sign test on those queries, p < 0.05), i.e. it does not optimise
    against retrieval. A rise of one or two queries on a set of 30 is noise, and a plain
    ``attacked <= clean`` would flag it."""
    flags = []
    for direction in ("i2t", "t2i"):
        clean = recall.get(f"retrieval_{direction}/R@1")
        adv = recall.get(f"retrieval_{direction}_adv/R@1")
        if not (clean and adv):
            continue
        pairs = list(zip(clean, adv, strict=True))
        gained = sum(a and not c for c, a in pairs)
        lost = sum(c and not a for c, a in pairs)
        from scipy.stats import binomtest  # a heavy import, only with retrieval rows

        p = binomtest(gained, gained + lost, alternative="greater").pvalue if gained else 1.0
        flags.append(
            {
                "name": "retrieval adv<=clean",
                "group": f"retrieval_{direction}",
                "passed": bool(p >= 0.05),
                "detail": f"R@1 clean {np.mean(clean):.4f}, attacked {np.mean(adv):.4f}; the "
                f"attack moved {gained} of {len(pairs)} queries into rank 1 and {lost} out "
                f"(sign test p={p:.3g})",
            }
        )
    return flags


def run_finetune(
    config: FineTuneRunConfig, run: Run, log: Log = print, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune (or load the saved fine-tuned model), then evaluate clean and robust
    (``progress``: a tqdm bar over the training batches)."""
    modality = task_name(config.modality)
    device = resolve_device(config.device)  # a GPU this machine lacks fails before training
    check_precision(device, config.precision)  # and so does bf16 on a GPU without it
    saved = run.path / "finetuned"
    base = load_base(config)  # a wrong checkpoint fails here, before any training
    base.to(memory_format=torch.channels_last)  # NHWC convolutions: faster on CPUs and GPUs
    if (saved / META_FILE).is_file():
        log(f"loading the fine-tuned {config.finetune.method} from {saved}")
        classifier, meta = load_finetuned(saved, model=base)
        classifier.to(device)
        report = meta["report"]
    else:
        ft = config.finetune
        if config.lr_selection is not None:
            ft = ft.at_pick(config.lr_selection)
        train = finetune_grid if ft.selects else finetune
        result = train(
            base,
            ft,
            modality,
            seed=config.seed,
            data_dir=config.data_dir,
            base_ref=base_reference(config),
            log=log,
            progress=progress,
            device=device,
            precision=config.precision,
        )
        if config.lr_selection is not None:
            result.report["lr_selection"] = config.lr_selection
        save_finetuned(result, saved)
        classifier, report = result.classifier, result.report
    classifier = evaluation_copy(classifier)  # LoRA merged, BatchNorm folded: the same function

    ev = config.robust
    attack_batch = ev.batch_size if device.type == "cpu" else max(ev.batch_size, CUDA_BATCH)
    early_stop = attacks_stop_early(ev, classifier)
    test = load_train_data(modality, ev.max_test_items, config.seed, config.data_dir, "test")
    images, labels = test.images, test.labels

    complete = run.complete_groups()

    def prediction_rows(shown: torch.Tensor) -> list[dict[str, Any]]:
        pred = predict_classes(classifier, test, shown, ev.batch_size)
        return [
            {"index": int(i), "label": int(y), "pred": int(p), "correct": bool(p == y)}
            for i, y, p in zip(test.ids, labels.tolist(), pred.tolist(), strict=True)
        ]

    jobs: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("clean", lambda: prediction_rows(images))
    ]
    if len(images) > 1:  # the control: each item's image swapped for another item's
        shuffled = images[derangement(len(images), config.seed)]
        jobs.append(("shuffled", lambda: prediction_rows(shuffled)))
    clean_memo: dict[int, dict[str, torch.Tensor]] = {}  # shared by the attack groups
    for eps in ev.eps:
        for name, entry in zip(attack_labels(ev.attacks), ev.attacks, strict=True):
            jobs.append(
                (
                    f"{name}@{eps:g}",
                    lambda eps=eps, name=name, entry=entry: attacked_test_rows(
                        classifier,
                        test,
                        [entry],
                        [eps],
                        None,
                        attack_batch,
                        [name],
                        early_stop,
                        memo=clean_memo,
                    ),
                )
            )
    if ev.retrieval and modality != VQA_TASK:
        encoder = adapted_encoder(classifier)
        retrieval = {
            "per_class_cap": ev.retrieval_per_class_cap,
            "seed": config.seed,
            "data_dir": config.data_dir,
        }
        jobs.append(("retrieval", lambda: retrieval_rows(encoder, [modality], **retrieval)))
        jobs.append(
            (
                "retrieval_adv",
                lambda: adversarial_retrieval_rows(
                    encoder,
                    [modality],
                    ev.multimodal_attack(),
                    batch_size=ev.batch_size,
                    **retrieval,
                ),
            )
        )

    tags = {
        "method": config.finetune.method,
        "modality": modality,
        "seed": config.seed,
    }
    for group, job in jobs:
        if group in complete:
            continue
        log(f"  {group} ...")
        with autocast(device, config.precision):
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
        "device": str(device),
        "precision": config.precision,
    }


def attacked_test_rows(
    classifier: FineTunedClassifier,
    test: Any,
    attacks: list[AttackEntry],
    eps_values: list[float],
    seed: int | None,
    batch_size: int,
    names: list[str] | None = None,
    early_stop: bool = False,
    ids: bool = False,
    memo: dict[int, dict[str, torch.Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """The flat rows of :func:`medshield.eval.robust.robust_rows` for the test items ``test``
    (a :class:`~medshield.train.finetune.data.TrainData`), a slice at a time (on the VQA task
    with each slice's questions set); ``index``: the item's position in ``test``, or its id
    (``ids``); ``early_stop``: see :func:`~medshield.eval.robust.robust_rows`; ``memo``: one
    ``robust_rows`` memo per slice (by its start), for calls on the same classifier and
    items."""
    rows: list[dict[str, Any]] = []
    memo = {} if memo is None else memo
    for part in item_slices(classifier, test, batch_size):
        for row in robust_rows(
            classifier,
            test.images[part],
            test.labels[part],
            attacks,
            eps_values,
            seed,
            batch_size,
            names,
            early_stop,
            memo.setdefault(part.start, {}),
        ):
            position = row["index"] + part.start
            rows.append({**row, "index": int(test.ids[position]) if ids else position})
    return rows


def finetuned_rows(
    classifier: FineTunedClassifier,
    task: str,
    eps_values: list[float],
    attacks: list[AttackEntry],
    max_items: int | None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """A fine-tuned classifier on its own task under ``medshield evaluate``: the flat rows of
    :func:`medshield.eval.robust.robust_rows` (every attack at every budget, random starts
    seeded with ``seed``) on a class-balanced subsample of ``max_items`` test items, chosen with
    ``seed``, tagged with task ``finetuned`` and ``modality`` (the task, a modality or
    ``vqa_rad_closed``); ``index`` is the item's id.

    With at least two test images each row also carries ``shuffled_correct``: whether the
    classifier is right on that item when shown another test item's image (the run's shuffled
    control, the same :func:`derangement` of the same items for the same ``seed``; on the VQA
    task the question stays)."""
    test = load_train_data(task, max_items, seed, data_dir, "test")
    shuffled: dict[int, bool] = {}
    if len(test.images) > 1:
        shown = test.images[derangement(len(test.images), seed)]
        hits = (predict_classes(classifier, test, shown, batch_size) == test.labels).tolist()
        shuffled = {int(i): hit for i, hit in zip(test.ids, hits, strict=True)}
    rows = attacked_test_rows(classifier, test, attacks, eps_values, seed, batch_size, ids=True)
    return [
        {
            "task": "finetuned",
            "modality": task,
            **row,
            **({"shuffled_correct": shuffled[row["index"]]} if shuffled else {}),
        }
        for row in rows
    ]


def finetune_run_dir(config: FineTuneRunConfig) -> Path:
    return Path(config.output_dir) / config.name
