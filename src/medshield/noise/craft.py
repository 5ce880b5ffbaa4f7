"""Craft a noisy upstream dataset: a fraction of image-caption pairs replaced by adversarial ones.

:func:`craft_noisy_dataset` picks ``ratio * N`` rows of a clean :class:`ImageCaptionDataset`
(seeded, stratified by modality), runs a multimodal attack against a surrogate dual encoder on
them in batches, and writes the result to a directory that
:class:`medshield.noise.NoisyCaptionDataset` reads back::

    progress.json                  the crafting arguments (written first; a rerun must match them)
    perturbed-00000.safetensors    one shard per finished batch of perturbed rows: uint8 images
    perturbed-00001.safetensors    (B, C, H, W), int64 dataset indices, and per-row metadata
    ...                            (caption, text edits, L-inf) in the safetensors header
    clean.safetensors              uint8 images and indices of the rows left clean
    rows.jsonl                     one row per item, by index: index, modality, label, caption,
                                   perturbed, text_edits, linf_255
    manifest.json                  written LAST: its presence means the dataset is complete

Images are stored losslessly as uint8 (no pickle, no npz). Rounding to uint8 moves a pixel by
at most 0.5/255, so every stored adversarial image must lie within ``eps + 0.5`` (in /255 units,
L-inf) of its clean image; a larger distance is an attack bug and stops crafting.

Crafting resumes: each batch is written atomically as its own shard, so a rerun with the same
arguments skips the finished shards and, because every batch's random state is seeded from
``(seed, batch)``, ends with byte-identical files (the manifest's ``created`` time aside).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import medshield
from medshield.data.captions import ImageCaptionDataset
from medshield.errors import ConfigError, DataError, InputError
from medshield.models.base import DualEncoder
from medshield.runs import write_atomic

if TYPE_CHECKING:
    from medshield.attacks.multimodal import MultimodalAttack, MultimodalResult

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ROWS = "rows.jsonl"
CLEAN_SHARD = "clean.safetensors"
SHARD_PATTERN = "perturbed-{:05d}.safetensors"
ROUNDING_SLACK_255 = 0.5  # uint8 rounding moves a pixel by at most half a level
FLOAT_TOLERANCE_255 = 1e-3  # float32 error of 255 * x on clean pixels


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (e.g. a surrogate's ``model.safetensors``)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 over a model's state dict: every key, dtype, shape and tensor bytes, by key."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 levels (rounded to nearest), on the CPU."""
    return (images.detach().cpu().double() * 255).round().clamp(0, 255).to(torch.uint8)


def choose_perturbed(modality_of: list[str], ratio: float, seed: int) -> list[int]:
    """The sorted row indices to perturb: exactly ``ratio * N`` rounded half up, stratified.

    Each modality gets its share of the total by largest remainder (ties: modality order of
    first appearance), and its rows are the first ones of a permutation drawn by a generator
    seeded with ``seed``. So for one seed the choice is nested: the rows chosen at a smaller
    ratio are among those chosen at a larger one (a noise-ratio sweep adds noise, it does not
    draw a new sample at every ratio).

    Raises:
        InputError: ``ratio`` outside [0, 1].
    """
    if not (isinstance(ratio, int | float) and 0.0 <= ratio <= 1.0):
        raise InputError(
            f"ratio is the fraction of pairs to perturb and must lie in [0, 1], got {ratio!r}"
        )
    n = len(modality_of)
    total = math.floor(ratio * n + 0.5)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(modality_of):
        groups.setdefault(name, []).append(i)
    shares = {name: ratio * len(rows) for name, rows in groups.items()}
    counts = {name: math.floor(share) for name, share in shares.items()}
    by_remainder = sorted(groups, key=lambda name: -(shares[name] - counts[name]))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for name, rows in groups.items():
        chosen.extend(int(i) for i in rng.permutation(rows)[: counts[name]])
    return sorted(chosen)


def describe_clean(clean: ImageCaptionDataset) -> dict[str, Any]:
    """What identifies the clean dataset: its construction arguments and a checksum of its
    uint8 images, labels and source rows (so two different datasets never compare equal)."""
    digest = hashlib.sha256()
    digest.update(to_uint8(clean.images).numpy().tobytes())
    digest.update(np.asarray(clean.labels, dtype=np.int64).tobytes())
    digest.update(np.asarray(clean.source_indices, dtype=np.int64).tobytes())
    digest.update(json.dumps(clean.modality_of).encode())
    return {
        "modalities": list(clean.modalities),
        "split": clean.split,
        "seed": clean.seed,
        "per_class_cap": getattr(clean, "per_class_cap", None),
        "len": len(clean),
        "image_shape": list(clean.images.shape[1:]),
        "content_sha256": digest.hexdigest(),
    }


def craft_noisy_dataset(
    clean: ImageCaptionDataset,
    surrogate: DualEncoder,
    attack: MultimodalAttack,
    ratio: float,
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    surrogate_checksum: str | None = None,
) -> Path:
    """Write a noisy copy of ``clean`` to ``out_dir``, or finish one an earlier call started.

    Args:
        clean: the clean upstream dataset; its epoch-0 captions are the captions stored.
        surrogate: the dual encoder the attack runs against.
        attack: a multimodal attack; its ``config()`` must hold ``eps`` (L-inf, /255 units).
        ratio: the fraction of pairs replaced by adversarial pairs, in [0, 1].
        out_dir: the output directory (created; a partial one with the same arguments resumes).
        seed: picks the perturbed rows and seeds each batch's random state.
        batch_size: perturbed rows per attack call and per shard.
        progress: show a progress bar over batches.
        surrogate_checksum: sha256 of the surrogate's weights file, recorded in the manifest;
            when None, :func:`state_dict_sha256` of ``surrogate`` is recorded.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        InputError: ``ratio`` outside [0, 1], ``batch_size`` < 1, or an attack config without a
            numeric ``eps`` or with a norm other than L-inf.
        ConfigError: ``out_dir`` holds a noisy dataset crafted with other arguments, or files
            that are not a noisy dataset.
        DataError: the attack returned malformed output or broke its budget.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    perturbed = choose_perturbed(clean.modality_of, ratio, seed)
    attack_config = attack.config()
    eps = attack_config.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise InputError(
            f"attack {attack.name!r} has no numeric 'eps' in its config() ({attack_config}); "
            "the budget check needs it (L-inf, /255 units)"
        )
    norm = attack_config.get("norm", "Linf")
    if norm != "Linf":
        raise InputError(f"noisy datasets check L-inf budgets; attack {attack.name!r} uses {norm}")
    args = {
        "format": FORMAT,
        "clean": describe_clean(clean),
        "ratio": ratio,
        "seed": seed,
        "batch_size": batch_size,
        "attack": {"name": attack.name, "config": attack_config},
        "eps": eps,
        "surrogate_sha256": surrogate_checksum or state_dict_sha256(surrogate),
        "perturbed_indices": perturbed,
    }
    out = Path(out_dir)
    _start_or_resume(out, args)
    if (out / MANIFEST).exists():
        return out

    captions = epoch0_captions(clean)
    budget_255 = float(eps) + ROUNDING_SLACK_255
    batches = [perturbed[i : i + batch_size] for i in range(0, len(perturbed), batch_size)]
    todo = [b for b in range(len(batches)) if not (out / SHARD_PATTERN.format(b)).exists()]
    device = next(surrogate.parameters()).device
    bar = tqdm(
        total=len(batches),
        initial=len(batches) - len(todo),
        desc="craft noise",
        unit="batch",
        disable=not progress,
    )
    for b in todo:
        rows = batches[b]
        images = clean.images[rows]
        with _seeded(seed * 1_000_003 + b, device):
            result = attack(surrogate, images.to(device), [captions[i] for i in rows])
        adv = _check_result(result, images, len(rows), attack.name)
        adv_u8 = to_uint8(adv)
        linf = _linf_255(adv_u8, images)
        worst = int(linf.argmax())
        if linf[worst] > budget_255 + FLOAT_TOLERANCE_255:
            raise DataError(
                f"attack {attack.name!r} broke its budget: row {rows[worst]} is "
                f"{linf[worst]:.3f}/255 from its clean image after uint8 rounding, more than "
                f"eps {eps:g}/255 + {ROUNDING_SLACK_255}/255 rounding"
            )
        meta = [
            {"index": i, "caption": c, "text_edits": int(e), "linf_255": round(float(d), 6)}
            for i, c, e, d in zip(rows, result.captions, result.text_edits, linf, strict=True)
        ]
        _save_shard(out / SHARD_PATTERN.format(b), adv_u8, rows, meta)
        bar.update()
    bar.close()
    _finalize(out, clean, captions, args, len(batches))
    return out


def _start_or_resume(out: Path, args: dict[str, Any]) -> None:
    """Record the arguments in a new directory, or check them against a started one."""
    progress_path = out / PROGRESS
    if progress_path.exists():
        try:
            old = json.loads(progress_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{progress_path} is not valid JSON: {e}") from e
        # round-trip through JSON so tuples and lists compare equal
        new = json.loads(json.dumps(args))
        if old != new:
            differ = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
            raise ConfigError(
                f"{out} holds a noisy dataset crafted with different arguments (they differ in: "
                f"{', '.join(differ)}); choose another output directory or delete this one"
            )
        for stale in out.glob("*.tmp"):
            stale.unlink()
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"{out} is not empty and holds no {PROGRESS}: it is not a noisy dataset in progress; "
            "choose an empty or new output directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(progress_path, (json.dumps(args, indent=2) + "\n").encode())


def epoch0_captions(clean: ImageCaptionDataset) -> list[str]:
    """Every item's caption at epoch 0, leaving the dataset's own epoch as it was."""
    epoch = clean.epoch
    clean.set_epoch(0)
    try:
        return [clean.caption(i) for i in range(len(clean))]
    finally:
        clean.set_epoch(epoch)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and Python's ``random`` inside the block; restore both states afterwards."""
    devices = [device] if device.type == "cuda" else []
    state = random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _check_result(
    result: MultimodalResult, images: torch.Tensor, n: int, name: str
) -> torch.Tensor:
    """The result's adversarial images, after checking the result's shape, range and lengths."""
    adv = result.images
    if not isinstance(adv, torch.Tensor) or tuple(adv.shape) != tuple(images.shape):
        shape = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
        raise DataError(f"attack {name!r} returned images {shape}, expected {tuple(images.shape)}")
    if not adv.is_floating_point() or not bool(torch.isfinite(adv).all()):
        raise DataError(f"attack {name!r} returned non-float or non-finite images")
    if adv.min() < 0 or adv.max() > 1:
        raise DataError(f"attack {name!r} returned images outside [0, 1]")
    if len(result.captions) != n or len(result.text_edits) != n:
        raise DataError(
            f"attack {name!r} returned {len(result.captions)} captions and "
            f"{len(result.text_edits)} text_edits for {n} pairs"
        )
    for c in result.captions:
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"attack {name!r} returned an empty or non-string caption: {c!r}")
    return adv


def _linf_255(stored: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
    """Per-row L-inf distance, in /255 units, of stored uint8 images from clean float images."""
    diff = stored.double() - clean.detach().cpu().double() * 255
    return diff.abs().flatten(1).amax(1).numpy()


def _save_shard(path: Path, images: torch.Tensor, rows: list[int], meta: list[dict]) -> None:
    tensors = {"images": images.contiguous(), "indices": torch.tensor(rows, dtype=torch.int64)}
    data = safetensors.torch.save(tensors, metadata={"rows": json.dumps(meta)})
    write_atomic(path, data)


def read_shard(path: Path) -> tuple[torch.Tensor, list[int], list[dict[str, Any]]]:
    """(uint8 images, dataset indices, per-row metadata) of one shard.

    Raises:
        DataError: the file is not a readable shard.
    """
    try:
        with safe_open(str(path), "pt") as f:
            images, indices = f.get_tensor("images"), f.get_tensor("indices")
            meta = json.loads((f.metadata() or {}).get("rows", "[]"))
    except Exception as e:  # safetensors raises several types on a corrupt header or body
        raise DataError(f"{path} is not a readable noisy-dataset shard: {e}") from e
    return images, indices.tolist(), meta


def _finalize(
    out: Path,
    clean: ImageCaptionDataset,
    captions: list[str],
    args: dict[str, Any],
    num_shards: int,
) -> None:
    """Write the clean shard, ``rows.jsonl`` and, last, the manifest."""
    is_perturbed = np.zeros(len(clean), dtype=bool)
    is_perturbed[args["perturbed_indices"]] = True
    kept = [int(i) for i in np.flatnonzero(~is_perturbed)]
    kept_images = clean.images[kept]
    kept_u8 = to_uint8(kept_images)
    kept_linf = _linf_255(kept_u8, kept_images)
    clean_meta = [
        {"index": i, "caption": captions[i], "text_edits": 0, "linf_255": round(float(d), 6)}
        for i, d in zip(kept, kept_linf, strict=True)
    ]
    _save_shard(out / CLEAN_SHARD, kept_u8, kept, clean_meta)
    shard_names = [SHARD_PATTERN.format(b) for b in range(num_shards)]
    meta = {row["index"]: row for row in clean_meta}
    for name in shard_names:
        meta.update((row["index"], row) for row in read_shard(out / name)[2])
    rows = [
        {
            "index": i,
            "modality": clean.modality_of[i],
            "label": int(clean.labels[i]),
            "caption": meta[i]["caption"],
            "perturbed": bool(is_perturbed[i]),
            "text_edits": meta[i]["text_edits"],
            "linf_255": meta[i]["linf_255"],
        }
        for i in range(len(clean))
    ]
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomic(out / ROWS, lines.encode())

    files = [PROGRESS, CLEAN_SHARD, *shard_names, ROWS]
    linf_perturbed = [meta[i]["linf_255"] for i in args["perturbed_indices"]]
    manifest = {
        "format": FORMAT,
        "medshield_version": medshield.__version__,
        "clean": args["clean"],
        "ratio": args["ratio"],
        "num_rows": len(clean),
        "num_perturbed": len(args["perturbed_indices"]),
        "attack": args["attack"],
        "eps": args["eps"],
        "norm": "Linf",
        "budget_linf_255": args["eps"] + ROUNDING_SLACK_255,
        "max_linf_255": max(linf_perturbed, default=0.0),
        "surrogate_sha256": args["surrogate_sha256"],
        "seed": args["seed"],
        "batch_size": args["batch_size"],
        "perturbed_indices": args["perturbed_indices"],
        "shards": shard_names,
        "files": {name: file_sha256(out / name) for name in files},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
