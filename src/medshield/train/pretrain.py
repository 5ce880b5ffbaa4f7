"""Contrastive (symmetric InfoNCE) pretraining of a :class:`DualEncoder` under HF Accelerate.

The same function runs on one CPU, one GPU or, through ``accelerate launch``, on several
processes or machines (DDP) with no code change. Image and text embeddings are gathered across
processes with gradients, so every process computes the loss over the whole global batch and
the result matches a single process (up to floating point).

Checkpoints: after every epoch ``<checkpoint_dir>/last/`` holds the model (safetensors) and the
optimizer/scheduler state; calling :func:`pretrain` again with the same directory resumes after
the last finished epoch. Data order and stochastic layers are seeded from (seed, epoch), so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medshield.config import PretrainConfig
from medshield.errors import ConfigError
from medshield.models.base import DualEncoder
from medshield.models.io import save_model
from medshield.runs import swap_directory
from medshield.train import check_finite_loss

EpochCallback = Callable[[int, dict[str, Any]], None]


def set_trainable(model: DualEncoder, image_layers: int, text_layers: int) -> list[nn.Module]:
    """Freeze all but the last ``image_layers`` / ``text_layers`` tower stages (-1 = all).

    Projection heads and the logit scale always train. Returns the frozen stages, which the
    training loop keeps in eval mode (frozen BatchNorm statistics and no dropout).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head_parameters():
        p.requires_grad_(True)
    frozen: list[nn.Module] = []
    for blocks, n in ((model.image_blocks(), image_layers), (model.text_blocks(), text_layers)):
        n = len(blocks) if n == -1 else min(n, len(blocks))
        for block in blocks[len(blocks) - n :]:
            for p in block.parameters():
                p.requires_grad_(True)
        frozen.extend(blocks[: len(blocks) - n])
    return frozen


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, captions: list[str]
) -> torch.Tensor:
    """Symmetric InfoNCE where pairs with identical captions count as positives.

    Captions built from class names repeat within a batch; treating those duplicates as
    negatives would push apart images of the same class, so the targets spread evenly over
    every column with the same caption.
    """
    logits = scale * image_emb @ text_emb.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    keys = torch.tensor([ids[c] for c in captions], device=logits.device)
    same = (keys[:, None] == keys[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i2t = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t2i = torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def _gather_with_grad(x: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0)


def _gather_strings(items: list[str], accelerator: Accelerator) -> list[str]:
    if accelerator.num_processes == 1:
        return items
    import torch.distributed as dist

    parts: list[list[str] | None] = [None] * accelerator.num_processes
    dist.all_gather_object(parts, items)
    return [s for part in parts for s in (part or [])]


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
    }


def pretrain(
    model: DualEncoder,
    dataset: Dataset,
    config: PretrainConfig,
    checkpoint_dir: str | Path,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` contrastively on ``dataset`` (items with ``image`` and ``caption``).

    Args:
        model: any DualEncoder; trained in place (the unwrapped model keeps the final weights).
        dataset: e.g. :class:`medshield.data.ImageCaptionDataset`; ``set_epoch`` is called each
            epoch when the dataset has it, to resample captions.
        config: epochs, batch size (global, split across processes), learning rates, schedule
            and which tower stages train.
        checkpoint_dir: where ``last/`` is written after every epoch and resumed from.
        seed: seeds data order and stochastic layers per epoch.
        accelerator: an existing Accelerator (one is made when None).
        on_epoch_end: called as ``on_epoch_end(epoch, history)`` after each checkpoint.
        progress: show a progress bar on the main process.

    Returns:
        The training history: per-epoch mean loss, wall time and peak memory, trainable
        parameter count, and the epoch training resumed from.
    """
    accelerator = accelerator or Accelerator(
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True)
    )
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"pretrain.batch_size {config.batch_size} must be divisible by the "
            f"{accelerator.num_processes} processes; choose a multiple of "
            f"{accelerator.num_processes}"
        )
    size = len(dataset)  # type: ignore[arg-type]
    if size < config.batch_size:
        lower = f"lower it (e.g. --set pretrain.batch_size={size}) or " if size >= 2 else ""
        raise ConfigError(
            f"the training data has {size} image-caption pairs, fewer than one batch of "
            f"pretrain.batch_size={config.batch_size} (every step needs a full batch). Fix: "
            f"{lower}add data (more modalities, a higher data.train_per_class_cap)"
        )
    checkpoint_dir = Path(checkpoint_dir)
    last = checkpoint_dir / "last"
    torch.manual_seed(seed)

    frozen = set_trainable(model, config.image_layers, config.text_layers)
    head_ids = {id(p) for p in model.head_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in head_ids], "lr": config.lr},
        {"params": [p for p in params if id(p) not in head_ids], "lr": config.tower_lr},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=_collate,
        generator=generator,
    )
    steps_per_epoch = len(loader)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total = steps_per_epoch * config.epochs
    from transformers import get_cosine_schedule_with_warmup  # a heavy import, when needed

    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_fraction * total), total
    )
    history: dict[str, Any] = {
        "epochs": [],
        "trainable_parameters": sum(p.numel() for p in params),
        "resumed_from_epoch": None,
    }
    state = None
    if (last / "trainer_state.pt").exists():
        safetensors.torch.load_model(model, last / "model.safetensors")
        state = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=True)
        history = json.loads((last / "history.json").read_text())

    wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history["resumed_from_epoch"] = start_epoch
    unwrapped: DualEncoder = accelerator.unwrap_model(wrapped)

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(seed + 1000 * (epoch + 1))  # stochastic depth / dropout per epoch
        loader.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        wrapped.train()
        for module in frozen:
            module.eval()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started, losses = time.time(), []
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"pretrain epoch {epoch + 1}/{config.epochs}",
            disable=not (progress and accelerator.is_main_process),
        )
        for step, batch in enumerate(loader):
            if step >= steps_per_epoch:
                break
            image_emb, text_emb, scale = wrapped(batch["image"], batch["caption"])
            loss = contrastive_loss(
                _gather_with_grad(image_emb, accelerator),
                _gather_with_grad(text_emb, accelerator),
                scale,
                _gather_strings(batch["caption"], accelerator),
            )
            check_finite_loss(
                loss, f"pretrain epoch {epoch + 1} step {step + 1}", "pretrain.lr", config.lr
            )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # CLIP's clamp keeps the temperature from exploding
                unwrapped.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
        bar.close()
        history["epochs"].append(
            {
                "epoch": epoch,
                "mean_loss": sum(losses) / len(losses),
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "steps": len(losses),
                "wall_time_s": round(time.time() - started, 2),
                "peak_memory_mb": _peak_memory_mb(),
            }
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_checkpoint(last, unwrapped, optimizer, scheduler, epoch, history)
        accelerator.wait_for_everyone()
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    return history


def _save_checkpoint(
    directory: Path,
    model: DualEncoder,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    history: dict[str, Any],
) -> None:
    """Write the checkpoint to a temporary folder, then swap it in, so a crash never leaves a
    half-written ``last/``."""
    tmp = directory.with_name(directory.name + ".tmp")
    save_model(model, tmp)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch},
        tmp / "trainer_state.pt",
    )
    (tmp / "history.json").write_text(json.dumps(history, indent=2))
    swap_directory(tmp, directory)


def _peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated GPU memory."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
