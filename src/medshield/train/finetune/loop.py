"""The shared fine-tuning loop (:func:`finetune`) and what it measures.

:func:`finetune` runs AdamW for a budget of optimiser steps, ``steps`` or ``epochs`` passes,
over successive seeded reshuffles of one task's train items, a constant or cosine schedule after
a linear warm-up, tqdm progress; a history entry every ``log_every`` steps; with
``val_fraction`` a class-stratified part of the items is held out (with ``val_items``, a
validation set is drawn beside them) and scored at every entry, and
``keep_best`` keeps the best entry's weights. It counts the images through the image tower
(:class:`ImageTowerCounter`), then measures the inference overhead against the base model's
zero-shot classifier in the same process (:func:`measure_overhead`). ``lr_grid`` selection is
:mod:`medshield.train.finetune.select`.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from medshield.device import autocast, check_precision, synchronize
from medshield.errors import ConfigError, DataError, InputError
from medshield.models.base import DualEncoder, check_images, eval_mode
from medshield.train import check_finite_loss
from medshield.train.finetune.classifier import QUESTION_FIELD, FineTunedClassifier
from medshield.train.finetune.config import FineTuneConfig, parse_finetune_config
from medshield.train.finetune.data import (
    TrainData,
    item_slices,
    load_train_data,
    predict_classes,
    split_validation,
    validation_accuracy,
)
from medshield.train.finetune.deploy import evaluation_copy
from medshield.train.finetune.method import (
    count_parameters,
    eval_roots,
    freeze,
    method_for,
    set_train_modes,
)

Log = Callable[[str], None]


@dataclass
class FineTuneResult:
    """A fine-tuned classifier and its report.

    Attributes:
        classifier: images in [0, 1] NCHW -> logits, in eval mode.
        report: ``trainable_params``, ``total_params``, ``train_items``, ``train_wall_s``
            (validation included), ``steps`` (optimiser steps taken), ``steps_per_pass``,
            ``compute`` (``image_forward`` / ``image_backward``: images through the image
            tower forwards / backwards while training, the adversary's and frozen copies'
            passes included, validation excluded, counted by :class:`ImageTowerCounter`;
            ``train_wall_s`` without validation, ``val_wall_s``, and
            ``train_flops_estimate``, (forwards + 2 x backwards) x the fine-tuned classifier's
            FLOPs per image from :func:`count_flops`), ``overhead`` (see
            :func:`measure_overhead`), ``history`` (one entry every ``log_every`` steps and
            after the last: ``step`` (steps done), ``epoch`` (the pass it ended in), ``lr``
            (of the entry's last step, first parameter group), the mean loss and every loss
            part over the entry's steps, ``val_accuracy`` with a validation set and
            ``val_robust_accuracy`` with ``val_robust``), and with
            a validation set ``val_items``, with ``keep_best`` ``best_step``.
        config: the fine-tuning config.
        modality: the downstream modality.
        base_state: the base model's tensors before training (for saving only the change).
    """

    classifier: nn.Module
    report: dict[str, Any]
    config: FineTuneConfig
    modality: str
    seed: int
    base_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    base_ref: dict[str, Any] = field(default_factory=dict)
    val: TrainData | None = field(default=None, repr=False)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One pass: a seeded shuffle of ``range(n)`` cut into batches, without a 1-item tail (it
    breaks BatchNorm and batch statistics)."""
    order = torch.randperm(n, generator=generator)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) < 2 else batches


def steps_per_pass(n: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``n`` training items (see :func:`_batches`)."""
    full, rest = divmod(n, batch_size)
    return max(1, full + (rest >= 2))


def total_steps(config: FineTuneConfig, n: int) -> int:
    """The budget in optimiser steps: ``steps``, or ``epochs`` passes over ``n`` items."""
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None  # the config fills in the default
    return config.epochs * steps_per_pass(n, config.batch_size)


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``s`` (0-based) of ``total``: ``(s + 1) / (warmup
    + 1)`` over the first ``warmup`` steps, then 1 (``constant``) or a half cosine over the
    ``n = total - warmup`` remaining steps, from 1 down to ``(1 + cos(pi (n - 1) / n)) / 2`` ~ 0
    at the last (``cosine``), for :class:`torch.optim.lr_scheduler.LambdaLR`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return factor


def _tower_ends(model: DualEncoder) -> tuple[nn.Module, nn.Module] | None:
    """The first and last module an image passes through in the image tower (None when the
    model names no image blocks)."""
    blocks = model.image_blocks()
    if not blocks:
        return None
    first, last = blocks[0], blocks[-1]
    first = first[0] if isinstance(first, nn.ModuleList) else first
    last = last[-1] if isinstance(last, nn.ModuleList) else last
    return first, last


class ImageTowerCounter:
    """Counts the images through the image tower while ``active``: ``forward`` (every pass,
    the adversary's and frozen copies' included) and ``backward`` (every pass whose gradient
    flows back into the tower's output: training a part of the tower, or an attack's input
    gradient). Hooks on the tower's first and last module; copies of the model made while
    they are in place (a method's frozen teacher) count too."""

    def __init__(self, model: DualEncoder) -> None:
        self.forward = self.backward = 0
        self.active = True
        self.handles = []
        ends = _tower_ends(model)
        if ends is None:
            return

        def count_in(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.active:
                self.forward += len(args[0])

        def count_out(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if self.active and torch.is_tensor(out) and out.requires_grad:
                n = len(out)

                def count_grad(grad: torch.Tensor) -> None:
                    if self.active:
                        self.backward += n

                out.register_hook(count_grad)

        self.handles = [
            ends[0].register_forward_pre_hook(count_in),
            ends[1].register_forward_hook(count_out),
        ]

    def close(self) -> None:
        """Stop counting (copies of the model keep their hooks, now idle)."""
        self.active = False
        for handle in self.handles:
            handle.remove()


def robust_validation_accuracy(
    classifier: nn.Module, config: FineTuneConfig, val: TrainData, batch_size: int, seed: int
) -> float:
    """Accuracy on the held-out items under the method's own training adversary (eval mode;
    on the VQA task each batch with its own questions), on the classifier's evaluation copy as
    every evaluation (:func:`~medshield.train.finetune.deploy.evaluation_copy`; a live head's
    class embeddings are refreshed first). The adversary's random start is seeded with
    ``seed`` inside a forked random state, so the caller's draws are untouched.

    Raises:
        ConfigError: a clean method (it has no training adversary).
    """
    if isinstance(classifier, FineTunedClassifier):
        classifier.refresh_class_embeddings()
    copied = evaluation_copy(classifier)
    attack = method_for(config).training_attack(copied)
    if attack is None:
        raise ConfigError(f"{config.method} is a clean method: it has no training adversary")
    device = next(copied.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        adv = torch.cat(
            [
                attack(val.images[part].to(device), val.labels[part].to(device)).cpu()
                for part in item_slices(copied, val, batch_size)
            ]
        )
    pred = predict_classes(copied, val, adv, batch_size)
    return float((pred == val.labels).float().mean())


def finetune(
    model: DualEncoder,
    config: FineTuneConfig | dict[str, Any],
    modality: str,
    seed: int = 0,
    data_dir: str | Path | None = None,
    train: TrainData | None = None,
    base_ref: dict[str, Any] | None = None,
    overhead_batch: int = 8,
    latency_repeats: int = 5,
    log: Log | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> FineTuneResult:
    """Fine-tune ``model`` (modified in place) on one modality's train split.

    Everything that can be wrong with the config or the model (unknown method, bad weight,
    LoRA target that matches nothing, a model the method cannot adapt) raises before the
    first step.

    Args:
        model: the pretrained dual encoder.
        config: a :class:`~medshield.train.finetune.config.FineTuneConfig` or a dict for one.
        modality: the downstream modality (its MedMNIST train split is read) or
            :data:`~medshield.train.finetune.data.VQA_TASK` (the VQA-RAD closed yes/no train
            questions).
        seed: seeds the subsample, the batch order, new modules and the adversary.
        data_dir: data root.
        train: training data given directly (skips reading the split); a validation part is
            held out of it as out of the split.
        base_ref: how to rebuild the base model when loading (see
            :func:`~medshield.train.finetune.io.save_finetuned`).
        overhead_batch: images per pass when measuring the inference overhead.
        latency_repeats: timed passes per model for the latency ratio.
        log: progress messages.
        progress: show a tqdm bar.
        device: where to train (the model and the new modules move there; training data moves
            one batch at a time). The result's classifier stays there.
        precision: ``fp32`` or ``bf16``: each step's forward pass and loss (the adversary of
            adversarial methods included) under :func:`medshield.device.autocast`.

    Returns:
        A :class:`FineTuneResult` (``base_state`` on the CPU).
    """
    config = parse_finetune_config(config)
    method = method_for(config)
    method.check(model)
    if train is None:
        train = load_train_data(modality, config.max_train_items, seed, data_dir)
    check_images(train.images)
    val = None
    if config.val_items is not None:
        if not train.ids:
            raise DataError("val_items draws beside the training items: they need their ids")
        val = load_train_data(train.modality, config.val_items, seed, data_dir, exclude=train.ids)
    elif config.val_fraction > 0:
        train, val = split_validation(train, config.val_fraction, seed)
    if len(train.images) < 2:
        raise DataError(f"fine-tuning needs at least 2 training items, got {len(train.images)}")

    device = torch.device(device)
    check_precision(device, precision)  # a bad precision fails before the first step
    base_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.to(device)
    base = copy.deepcopy(model).eval()
    torch.manual_seed(seed)
    classifier = method.build(model, train.class_prompts).to(device)
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"method {config.method!r} left no trainable parameter")
    if (train.questions is not None) != getattr(classifier, "conditioned", False):
        raise InputError(
            f"{config.method}: training items carry questions exactly when the class prompts "
            f"hold {QUESTION_FIELD} (a question-conditioned FineTunedClassifier)"
        )
    counter = ImageTowerCounter(model)  # before prepare: a method's frozen copies count too
    method.prepare(classifier, train)
    groups = method.param_groups(classifier, trainable)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    per_pass = steps_per_pass(len(train.images), config.batch_size)
    n_steps = total_steps(config, len(train.images))
    warmup = int(config.warmup_fraction * n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.schedule, warmup, n_steps)
    )
    log_every = config.log_every or per_pass
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # accuracy, step, state
    n_trainable = sum(p.numel() for p in trainable)
    if log:
        log(
            f"fine-tuning {config.method} on {len(train.images)} {train.modality} items, "
            f"{n_trainable:,} trainable parameters, {n_steps} steps ({per_pass} per pass)"
        )
    start = time.perf_counter()
    val_wall = 0.0
    sums: dict[str, float] = {}
    window = 0
    batches: list[torch.Tensor] = []
    epoch = -1
    frozen = eval_roots(classifier, config.batchnorm)
    bar = tqdm(total=n_steps, desc=config.method, disable=not progress)
    for step in range(n_steps):
        if not batches:
            epoch += 1
            method.start_epoch(epoch, math.ceil(n_steps / per_pass))
            batches = _batches(len(train.images), config.batch_size, generator)
        idx = batches.pop(0)
        set_train_modes(classifier, frozen)
        if train.questions is not None:
            classifier.set_questions([train.questions[i] for i in idx])
        images, labels = train.images[idx].to(device), train.labels[idx].to(device)
        with autocast(device, precision):
            loss, parts = method.loss(classifier, images, labels)
        lr = optimizer.param_groups[0]["lr"]
        check_finite_loss(loss, f"{config.method} fine-tuning step {step + 1}", "finetune.lr", lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        parts = {"loss": float(loss.detach()), **parts}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        window += 1
        bar.update()
        bar.set_postfix(loss=f"{parts['loss']:.3f}")
        if (step + 1) % log_every and step + 1 < n_steps:
            continue
        entry = {"step": step + 1, "epoch": epoch, "lr": lr}
        history.append({**entry, **{k: v / window for k, v in sums.items()}})
        sums, window = {}, 0
        if val is not None:
            counter.active, val_start = False, time.perf_counter()
            accuracy = validation_accuracy(classifier, val, config.batch_size)
            history[-1]["val_accuracy"] = accuracy
            if config.val_robust:
                history[-1]["val_robust_accuracy"] = robust_validation_accuracy(
                    classifier, config, val, config.batch_size, seed
                )
            counter.active, val_wall = True, val_wall + time.perf_counter() - val_start
            if config.keep_best and (best is None or accuracy > best[0]):
                state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
                best = (accuracy, step + 1, state)
    bar.close()
    counter.close()
    if best is not None:
        classifier.load_state_dict(best[2])
    train_wall = time.perf_counter() - start
    classifier.eval()
    classifier = method.finalize(classifier)
    freeze(classifier)
    classifier.eval()

    probe = train.images[:overhead_batch].to(device)
    base_classifier = FineTunedClassifier(base, train.class_prompts).to(device)  # zero-shot
    if train.questions is not None:
        for module in (base_classifier, classifier):
            module.set_questions(train.questions[:overhead_batch])
    overhead = measure_overhead(base_classifier, classifier, probe, repeats=latency_repeats)
    report = {
        "method": config.method,
        "paper": method.paper,
        "trainable_params": n_trainable,
        "total_params": count_parameters(classifier),
        "base_params": count_parameters(base),
        "train_items": len(train.images),
        "train_wall_s": round(train_wall, 3),
        "steps": n_steps,
        "steps_per_pass": per_pass,
        "compute": {
            "image_forward": counter.forward,
            "image_backward": counter.backward,
            "train_wall_s": round(train_wall - val_wall, 3),
            "val_wall_s": round(val_wall, 3),
            "train_flops_estimate": (counter.forward + 2 * counter.backward)
            * overhead["flops"]
            // overhead["batch"],
        },
        "overhead": overhead,
        "history": history,
    }
    if val is not None:
        report["val_items"] = len(val.images)
    if best is not None:
        report["best_step"] = best[1]
    return FineTuneResult(
        classifier, report, config, train.modality, seed, base_state, dict(base_ref or {}), val
    )


def count_flops(module: nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted by :class:`torch.utils.flop_counter.FlopCounterMode`."""
    with eval_mode(module), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            module(images)
    return int(counter.get_total_flops())


def measure_overhead(
    base: nn.Module, tuned: nn.Module, images: torch.Tensor, repeats: int = 5
) -> dict[str, float | int]:
    """Inference cost of ``tuned`` relative to ``base`` on the same images, in one process.

    FLOPs come from :func:`count_flops`; latency is the median of ``repeats`` interleaved timed
    forward passes of each (one warm-up pass each first), so load from other processes hits
    both alike. Both modules and ``images`` must be on one device; on a GPU each timed pass
    waits for its kernels.
    """
    base_flops, tuned_flops = count_flops(base, images), count_flops(tuned, images)
    times: dict[str, list[float]] = {"base": [], "tuned": []}
    with torch.no_grad(), eval_mode(base), eval_mode(tuned):
        base(images)
        tuned(images)
        for _ in range(repeats):
            for key, module in (("base", base), ("tuned", tuned)):
                synchronize(images.device)
                start = time.perf_counter()
                module(images)
                synchronize(images.device)
                times[key].append(time.perf_counter() - start)
    base_t, tuned_t = statistics.median(times["base"]), statistics.median(times["tuned"])
    return {
        "base_flops": base_flops,
        "flops": tuned_flops,
        "flops_ratio": tuned_flops / base_flops if base_flops else math.nan,
        "base_latency_s": base_t,
        "latency_s": tuned_t,
        "latency_ratio": tuned_t / base_t if base_t else math.nan,
        "batch": len(images),
    }
