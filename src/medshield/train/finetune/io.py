"""Save and load a fine-tuned classifier: :func:`save_finetuned` / :func:`load_finetuned` store
the base model reference, the method's state (only the tensors that differ from the base model)
as safetensors and the config as JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import medshield
from medshield.errors import DataError
from medshield.models.base import DualEncoder
from medshield.models.io import read_record
from medshield.train.finetune.classifier import clear_text_cache
from medshield.train.finetune.config import parse_finetune_config
from medshield.train.finetune.data import task_prompts
from medshield.train.finetune.loop import FineTuneResult
from medshield.train.finetune.method import freeze, method_for

FORMAT = 1
STATE_FILE = "method.safetensors"
META_FILE = "finetune.json"


def _base_key(key: str) -> str:
    """State key of the unmodified base model for a key of the classifier (LoRA wraps layers)."""
    return key.removeprefix("model.").replace(".base_layer", "")


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and bytes of a state dict (identifies a base model)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(
            tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
    return digest.hexdigest()


def save_finetuned(result: FineTuneResult, directory: str | Path) -> Path:
    """Write ``method.safetensors`` (the tensors that differ from the base model) and
    ``finetune.json`` (base reference, config, report) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in result.classifier.state_dict().items():
        base_value = result.base_state.get(_base_key(key)) if key.startswith("model.") else None
        if (
            base_value is None
            or base_value.shape != value.shape
            or not torch.equal(base_value, value.detach().cpu())
        ):
            state[key] = value.detach().cpu().contiguous()
    save_file(state, str(directory / STATE_FILE))
    meta = {
        "format": FORMAT,
        "medshield_version": medshield.__version__,
        "method": result.config.method,
        "config": result.config.model_dump(mode="json"),
        "modality": result.modality,
        "seed": result.seed,
        "base": result.base_ref,
        "base_fingerprint": state_fingerprint(result.base_state),
        "structure": getattr(result.classifier, "structure_meta", {}),
        "report": result.report,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def build_base(base_ref: dict[str, Any]) -> DualEncoder:
    """Rebuild a base model from a reference: ``{"checkpoint": dir}`` or
    ``{"backend": name, "kwargs": {...}, "seed": int}`` (new heads seeded as in training)."""
    from medshield.models import create_model, load_model

    if base_ref.get("checkpoint"):
        return load_model(base_ref["checkpoint"])
    if "backend" not in base_ref:
        raise DataError(f"base model reference {base_ref} names neither a checkpoint nor a backend")
    torch.manual_seed(int(base_ref.get("seed", 0)))
    return create_model(base_ref["backend"], **base_ref.get("kwargs", {}))


def read_finetuned_meta(directory: str | Path) -> dict[str, Any]:
    meta = read_record(directory, META_FILE, "fine-tuned medshield model")
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{Path(directory) / META_FILE} is not a format-{FORMAT} fine-tuning record"
        )
    return meta


def load_finetuned(
    directory: str | Path, model: DualEncoder | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a classifier saved by :func:`save_finetuned`, in eval mode.

    Args:
        directory: the saved directory.
        model: the base model, when the caller already has it; by default it is rebuilt from
            the saved reference. It must be the same base the method was trained from.

    Returns:
        (classifier, metadata from ``finetune.json``).

    Raises:
        DataError: missing or malformed files, a base model other than the one trained from,
            or saved tensors that do not fit the rebuilt architecture.
    """
    directory = Path(directory)
    meta = read_finetuned_meta(directory)
    config = parse_finetune_config(meta["config"])
    if model is None:
        model = build_base(meta.get("base") or {})
    fingerprint = state_fingerprint(model.state_dict())
    if fingerprint != meta.get("base_fingerprint"):
        raise DataError(
            f"the base model given for {directory} is not the one {meta['method']!r} was "
            "fine-tuned from (its weights differ); pass the original base checkpoint"
        )
    method = method_for(config)
    method.check(model)
    prompts = task_prompts(meta["modality"])
    torch.manual_seed(int(meta.get("seed", 0)))
    classifier = method.build(model, prompts)
    classifier = method.restore_structure(classifier, meta.get("structure", {}))
    try:
        state = load_file(str(directory / STATE_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise DataError(f"cannot read {directory / STATE_FILE}: {exc}") from exc
    try:
        result = classifier.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise DataError(f"tensors in {directory} do not fit the rebuilt classifier: {exc}") from exc
    if result.unexpected_keys:
        raise DataError(
            f"{directory / STATE_FILE} holds tensors the rebuilt {meta['method']!r} classifier "
            f"does not have: {result.unexpected_keys[:5]}"
        )
    clear_text_cache(model)
    freeze(classifier)
    return classifier.eval(), meta
