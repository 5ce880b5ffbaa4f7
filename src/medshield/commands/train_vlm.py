"""LLaVA-style instruction tuning of ``mini-llava`` and its VQA-RAD closed evaluation.

Instruction data (all from our own images, no patient text beyond VQA-RAD's questions):

- MedMNIST train subsets (every modality found on disk, ``medmnist_per_class`` images per
  class): for each image one task drawn from a seeded RNG: a caption ("Describe the image."
  -> a template caption), the modality ("What imaging modality is this?" -> "chest X-ray"),
  the finding ("What does this chest X-ray show?" -> the class phrase), and yes/no questions
  about the finding and the modality (half of them with the true answer "yes").
- VQA-RAD training questions (closed and open), answered with their reference answers.

Training (:func:`train_vlm`): the projector (and LoRA adapters when ``lora_rank`` > 0) trains
with AdamW and a cosine schedule on the mean cross-entropy of the answer tokens and the closing
``<|im_end|>``. Batches are a deterministic function of (seed, step), so a run resumed from the
checkpoint in ``<run>/checkpoint/`` (written every ``checkpoint_every`` steps) ends with the
same weights as an uninterrupted one.

Evaluation (:func:`evaluate_vqa_closed`): VQA-RAD test questions whose answer is yes or no
(251 of the 272 closed ones; the other 21 have free-form answers). The answer is chosen by
**likelihood, not parsed from generated text**: the model's next-token distribution after the
prompt is read once, and "yes" wins when ``logsumexp(log p("yes"), log p("Yes"))`` exceeds the
same for "no"/"No" (both words are single tokens in SmolLM2, so this equals comparing
:meth:`MiniLlava.score` of the candidates, case-insensitively, at half the cost). Three
conditions: the trained model with the item's image, the same model without any image (the LM
answering from the question alone; with ``lora_rank`` 0 this *is* SmolLM2-Instruct), and with
the image of another test item (a control that tells image content from a learned soft prompt).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import Field
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from medshield.config import FolderName, StrictModel, load_yaml_model
from medshield.data import (
    available_modalities,
    get_modality,
    load_split,
    load_vqa_rad,
    missing_data_error,
)
from medshield.data.vqa_rad import load_vqa_image
from medshield.errors import ConfigError, DataError
from medshield.eval.metrics import bootstrap_ci
from medshield.models.chat import Message
from medshield.models.int8_weights import WeightFormat
from medshield.models.mini_llava import WEIGHTS_FILE, MiniLlava
from medshield.runs import Run, swap_directory
from medshield.train import check_finite_loss

CONDITIONS = ("image", "no_image", "shuffled_image")
MODALITY_QUESTION = "What imaging modality is this?"


class VLMTrainConfig(StrictModel):
    """``medshield train-vlm``: data, model, optimisation and evaluation settings."""

    name: FolderName = "mini-llava"
    output_dir: str = "runs"
    model_dir: str | None = None
    """Where the final model is saved (default ``<run>/model``)."""
    weights: WeightFormat = "float32"
    """How the final model's trained weights are stored: ``int8`` (per-row scales) is a quarter
    of the size, for shipping; the model is then evaluated as reloaded from that file."""
    clip: str = "imagenet"
    """A saved mini-clip directory, ``imagenet`` or ``random``."""
    image_size: int | None = Field(None, ge=32, multiple_of=32)
    """The tower's input size, (image_size / 32)^2 image tokens; None: 64 px for ``imagenet`` /
    ``random``, a mini-clip directory's own size (which refuses another)."""
    lm: str | dict[str, Any] = "smollm2"
    lora_rank: int = Field(0, ge=0)
    lora_alpha: float = Field(16.0, gt=0)
    data_dir: str | None = None
    modalities: list[str] | str = "available"
    medmnist_per_class: int = Field(20, ge=0)
    vqa_rad: bool = True
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, le=1)
    checkpoint_every: int = Field(10, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    """Stop training after this many seconds (at a step boundary) and evaluate what exists."""
    eval_limit: int | None = Field(None, ge=1)
    """Evaluate only the first N yes/no VQA-RAD test questions (None: all 251)."""
    eval_batch_size: int = Field(16, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class Example:
    """One instruction: an image (float (C, H, W) in [0, 1]), a question and its answer."""

    image: torch.Tensor
    question: str
    answer: str
    source: str


def medmnist_examples(
    modalities: list[str], per_class: int, seed: int = 0, data_dir: str | None = None
) -> list[Example]:
    """Caption, modality and finding instructions from MedMNIST train images (see module doc)."""
    rng = random.Random(seed)
    examples: list[Example] = []
    titles = [get_modality(m).title for m in modalities]
    for name in modalities:
        split = load_split(name, "train", data_dir)
        mod = split.modality
        for label in range(mod.num_classes):
            rows = np.flatnonzero(split.labels == label)
            if per_class and len(rows) > per_class:
                rows = np.sort(np.random.default_rng([seed, label]).choice(rows, per_class, False))
            images = split.tensor(rows)
            for image in images:
                task = rng.randrange(5)
                if task == 0:
                    q, a = "Describe the image.", mod.sample_caption(label, rng)
                elif task == 1:
                    q, a = MODALITY_QUESTION, mod.title
                elif task == 2:
                    q, a = f"What does this {mod.title} show?", mod.class_names[label]
                elif task == 3:
                    other = label if rng.random() < 0.5 else rng.randrange(mod.num_classes)
                    q = f"Does this {mod.title} show {mod.class_names[other]}?"
                    a = "yes" if other == label else "no"
                else:
                    title = mod.title if rng.random() < 0.5 else rng.choice(titles)
                    q, a = f"Is this a {title} image?", "yes" if title == mod.title else "no"
                examples.append(Example(image, q, a, f"medmnist:{name}"))
    return examples


def vqa_rad_examples(split: str, image_size: int, data_dir: str | None = None) -> list[Example]:
    """VQA-RAD questions of ``split`` as instructions (images resized to ``image_size``)."""
    return [
        Example(load_vqa_image(item.image_path, image_size), item.question, item.answer, "vqa_rad")
        for item in load_vqa_rad(split, data_dir)
    ]


def build_instructions(config: VLMTrainConfig, image_size: int) -> list[Example]:
    """The training set the config describes (MedMNIST instructions + VQA-RAD train).

    Raises:
        DataError: no data selected, or no MedMNIST train split found.
    """
    examples: list[Example] = []
    if config.medmnist_per_class:
        if config.modalities == "available":
            modalities = available_modalities(config.data_dir, split="train")
        elif isinstance(config.modalities, str):
            modalities = [config.modalities]
        else:
            modalities = list(config.modalities)
        if not modalities:
            raise missing_data_error("train", config.data_dir, select="modalities")
        examples += medmnist_examples(
            modalities, config.medmnist_per_class, config.seed, config.data_dir
        )
    if config.vqa_rad:
        examples += vqa_rad_examples("train", image_size, config.data_dir)
    if not examples:
        raise DataError("no training data: set medmnist_per_class > 0 or vqa_rad: true")
    return examples


def build_model(config: VLMTrainConfig) -> MiniLlava:
    """The mini-llava the config describes, with a projector seeded from ``config.seed``."""
    torch.manual_seed(config.seed)
    model = MiniLlava(
        clip=config.clip,
        lm=config.lm,
        image_size=config.image_size or 64,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
    )
    if config.image_size and model.image_size != config.image_size:
        raise ConfigError(
            f"image_size={config.image_size}, but the mini-clip {config.clip} was trained at "
            f"{model.image_size} px: remove image_size or set it to {model.image_size}"
        )
    return model


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of ``step``: consecutive slices of a per-epoch seeded permutation."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch_size - len(out), n - offset)
        out.extend(int(i) for i in order[offset : offset + take])
    return out


def train_vlm(
    model: MiniLlava,
    examples: list[Example],
    config: VLMTrainConfig,
    checkpoint_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Instruction-tune ``model`` in place (projector, plus LoRA when present).

    Resumes from ``<checkpoint_dir>`` when it holds a checkpoint of an earlier call.

    Returns:
        History: per-step losses, steps done, wall time, trainable parameters, resumed step.
    """
    checkpoint_dir = Path(checkpoint_dir)
    params = model.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_fraction * config.steps), config.steps
    )
    history: dict[str, Any] = {
        "losses": [],
        "trainable_parameters": sum(p.numel() for p in params),
        "examples": len(examples),
        "resumed_from_step": None,
        "train_seconds": 0.0,
    }
    start = 0
    state_path = checkpoint_dir / "trainer_state.pt"
    if state_path.is_file():
        model._load_weights(checkpoint_dir)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = json.loads((checkpoint_dir / "history.json").read_text())
        start = int(state["step"])
        history["resumed_from_step"] = start
    model.train()
    started = time.time()
    spent_before = float(history["train_seconds"])
    bar = tqdm(total=config.steps, initial=start, desc="train-vlm", disable=not progress)
    step = start
    while step < config.steps:
        if config.time_budget_s and time.time() - started + spent_before > config.time_budget_s:
            break
        torch.manual_seed(config.seed * 100003 + step)
        batch = [
            examples[i] for i in batch_indices(len(examples), config.batch_size, step, config.seed)
        ]
        conversations = [[Message("user", ex.question, [ex.image])] for ex in batch]
        loss = model.loss(conversations, [ex.answer for ex in batch])
        check_finite_loss(loss, f"train-vlm step {step + 1}", "lr", config.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        history["losses"].append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
        if step % config.checkpoint_every == 0 or step == config.steps:
            history["train_seconds"] = round(spent_before + time.time() - started, 2)
            _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, history)
    bar.close()
    history["train_seconds"] = round(spent_before + time.time() - started, 2)
    history["steps_done"] = step
    if step > start:
        _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, history)
    model.eval()
    return history


def _save_checkpoint(
    directory: Path,
    model: MiniLlava,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    history: dict[str, Any],
) -> None:
    """Write into a temporary folder, then swap it in (a crash never leaves half a checkpoint)."""
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = model._saved_state()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if getattr(model.base_lm.config, "tie_word_embeddings", False):
        tensors = {k: v for k, v in tensors.items() if not k.endswith("lm_head.weight")}
    safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
        tmp / "trainer_state.pt",
    )
    (tmp / "history.json").write_text(json.dumps(history))
    swap_directory(tmp, directory)


# --- evaluation ----------------------------------------------------------------------------------
def _yes_no_logprobs(model: MiniLlava, conversations: list[list[Message]]) -> torch.Tensor:
    """(N, 2) log-probabilities of answering yes / no (case-insensitive) as the first token."""
    tokenizer = model.tokenizer
    groups = [
        [tokenizer.convert_tokens_to_ids(w) for w in ("yes", "Yes")],
        [tokenizer.convert_tokens_to_ids(w) for w in ("no", "No")],
    ]
    rows = model._prepare(conversations)
    hidden = model._forward(rows, use_cache=False)[0][:, -1]
    logprobs = model.base_lm.lm_head(hidden).float().log_softmax(-1)
    return torch.stack([logprobs[:, ids].logsumexp(-1) for ids in groups], dim=1)


@torch.no_grad()
def evaluate_vqa_closed(
    model: MiniLlava,
    run: Run | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    data_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """VQA-RAD closed (yes/no) accuracy with the image, without it, and with another image.

    Rows go to ``run``'s ``samples.jsonl`` as each batch finishes; rows already there are
    reused (resume). Returns per-condition accuracy with 95% bootstrap CIs, the majority
    ("no") baseline, and ``image_minus_<control>``: the accuracy with the image minus that of
    each control (no image, another item's image, always "no"), with a 95% paired bootstrap CI
    (the image helps when the interval lies above 0).
    """
    model.eval()
    items = [
        it
        for it in load_vqa_rad("test", data_dir, answer_type="closed")
        if it.answer in ("yes", "no")
    ]
    if limit:
        items = items[:limit]
    shuffle = np.random.default_rng(seed).permutation(len(items))
    done = {}
    if run is not None:
        done = {r["qid"]: r for r in run.load_samples() if r.get("task") == "vqa_rad_closed"}
    # seeded random order, so an evaluation stopped early has scored a random subset
    todo = [int(i) for i in shuffle if items[int(i)].qid not in done]
    bar = tqdm(
        total=len(items),
        initial=len(items) - len(todo),
        desc="eval vqa-rad closed",
        disable=not progress,
    )
    started = time.time()
    for b in range(0, len(todo), batch_size):
        chunk = todo[b : b + batch_size]
        images = [load_vqa_image(items[i].image_path, model.image_size) for i in chunk]
        others = [
            load_vqa_image(items[_other(i, shuffle)].image_path, model.image_size) for i in chunk
        ]
        convs = {
            "image": [
                [Message("user", items[i].question, [im])]
                for i, im in zip(chunk, images, strict=True)
            ],
            "no_image": [[Message("user", items[i].question)] for i in chunk],
            "shuffled_image": [
                [Message("user", items[i].question, [im])]
                for i, im in zip(chunk, others, strict=True)
            ],
        }
        scores = {c: _yes_no_logprobs(model, convs[c]) for c in CONDITIONS}
        rows = []
        for j, i in enumerate(chunk):
            item = items[i]
            row: dict[str, Any] = {
                "task": "vqa_rad_closed",
                "qid": item.qid,
                "question": item.question,
                "answer": item.answer,
                "question_type": item.question_type,
                "organ": item.organ,
            }
            for c in CONDITIONS:
                yes, no = scores[c][j].tolist()
                pred = "yes" if yes > no else "no"
                row[c] = {"logp_yes": round(yes, 4), "logp_no": round(no, 4), "pred": pred}
                row[f"correct_{c}"] = pred == item.answer
            rows.append(row)
            done[item.qid] = row
        if run is not None:
            run.append_samples(rows)
        bar.update(len(chunk))
    bar.close()
    ordered = [done[it.qid] for it in items]
    results: dict[str, Any] = {
        "n": len(ordered),
        "method": "likelihood of yes vs no (case-insensitive first token); not generated text",
        "eval_seconds": round(time.time() - started, 2),
    }
    correct: dict[str, np.ndarray] = {
        "majority_no": np.array([r["answer"] == "no" for r in ordered], dtype=np.float64)
    }
    for c in CONDITIONS:
        correct[c] = np.array([r[f"correct_{c}"] for r in ordered], dtype=np.float64)
    for c in CONDITIONS + ("majority_no",):
        lo, hi = bootstrap_ci(lambda x: x.mean(-1), correct[c], seed=seed, vectorized=True)
        results[c] = {"accuracy": float(correct[c].mean()), "ci_low": lo, "ci_high": hi}
    for control in ("no_image", "shuffled_image", "majority_no"):
        # paired: the same questions resampled together under both conditions
        diff = correct["image"] - correct[control]
        lo, hi = bootstrap_ci(lambda x: x.mean(-1), diff, seed=seed, vectorized=True)
        results[f"image_minus_{control}"] = {
            "difference": float(diff.mean()),
            "ci_low": lo,
            "ci_high": hi,
        }
    return results


def modality_choices(
    model: MiniLlava, images: list[torch.Tensor | None], titles: list[str], batch_size: int = 32
) -> np.ndarray:
    """For each image (``None``: the question alone), the index of the modality title the model
    finds likeliest as its reply to :data:`MODALITY_QUESTION` (the question every
    instruction-tuned mini-llava was taught; ``benchmarks/vlm_image_use.py``)."""
    convs = [
        [Message("user", MODALITY_QUESTION, [] if image is None else [image])]
        for image in images
        for _ in titles
    ]
    replies = [title for _ in images for title in titles]
    with torch.no_grad():
        scores = torch.cat(
            [
                model.score(convs[i : i + batch_size], replies[i : i + batch_size])
                for i in range(0, len(convs), batch_size)
            ]
        )
    return scores.view(len(images), len(titles)).argmax(1).numpy()


def _other(i: int, permutation: np.ndarray) -> int:
    """The shuffled partner of item ``i`` (never ``i`` itself)."""
    j = int(permutation[i])
    return (i + 1) % len(permutation) if j == i else j


def load_vlm_config(path: str | Path | None, overrides: list[str] | None = None) -> VLMTrainConfig:
    """A :class:`VLMTrainConfig` from an optional YAML file plus ``key=value`` overrides.

    Raises:
        ConfigError: missing or invalid file, or invalid values.
    """
    return load_yaml_model(VLMTrainConfig, path, overrides)


def run_train_vlm(config: VLMTrainConfig, run: Run, progress: bool = True) -> dict[str, Any]:
    """Build, train, save and evaluate a mini-llava into ``run`` (the ``train-vlm`` workflow)."""
    started = time.time()
    model = build_model(config)
    load_seconds = round(time.time() - started, 2)
    examples = build_instructions(config, model.image_size)
    history = train_vlm(model, examples, config, run.path / "checkpoint", progress=progress)
    model_dir = Path(config.model_dir) if config.model_dir else run.path / "model"
    model.save(model_dir, weights=config.weights)
    if config.weights != "float32":  # evaluate what was stored
        model = MiniLlava.load(model_dir)
    (run.path / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    evaluation = evaluate_vqa_closed(
        model,
        run,
        limit=config.eval_limit,
        batch_size=config.eval_batch_size,
        data_dir=config.data_dir,
        seed=config.seed,
        progress=progress,
    )
    losses = history["losses"]
    return {
        "model_dir": str(model_dir),
        "load_seconds": load_seconds,
        "train_seconds": history["train_seconds"],
        "steps": history.get("steps_done", len(losses)),
        "examples": len(examples),
        "trainable_parameters": history["trainable_parameters"],
        "first_loss": losses[0] if losses else None,
        "last_loss_mean10": float(np.mean(losses[-10:])) if losses else None,
        "resumed_from_step": history["resumed_from_step"],
        "vqa_rad_closed": evaluation,
    }
