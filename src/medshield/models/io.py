"""Build registered dual encoders by name, and save / load them as safetensors directories.

A saved model is a directory::

    model.safetensors       all tensors (safetensors: no pickle, so loading runs no code)
    medshield_model.json    {"format": 1, "backend": ..., "init_kwargs": {...}, ...}
    ...                     backend extras written by ``save_extra`` (configs, tokenizer files)

:func:`load_model` rebuilds the architecture from ``backend`` + ``init_kwargs`` without
pretrained weights, then fills every tensor from ``model.safetensors``. It never calls
``torch.load`` / pickle on a user file.

Example::

    model = create_model("mini-clip")
    save_model(model, "runs/clip")
    same = load_model("runs/clip")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as _load_safetensors
from safetensors.torch import save_model as _save_safetensors

import medshield
from medshield.errors import DataError, UnsafeFileError
from medshield.models.base import DualEncoder
from medshield.registry import MODELS

FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "medshield_model.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def create_model(name: str, **kwargs: Any) -> DualEncoder:
    """Build the dual encoder registered as ``name`` with constructor ``kwargs``.

    Raises:
        UnknownNameError: ``name`` is not registered; the message lists the registered names.

    Example::

        model = create_model("open_clip", model_name="ViT-B-32", pretrained="laion2b_s34b_b79k")
    """
    return MODELS.get(name)(**kwargs)


def save_model(model: DualEncoder, directory: str | Path) -> Path:
    """Save ``model`` to ``directory`` (created if needed) so :func:`load_model` can rebuild it.

    Writes ``model.safetensors`` (shared tensors stored once), ``medshield_model.json`` and,
    if the model class defines ``save_extra(directory)``, whatever that hook writes (for
    example the config and tokenizer files a backend needs to rebuild without its source).

    Returns:
        The directory as a :class:`~pathlib.Path`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_safetensors(model, str(directory / WEIGHTS_FILE))
    save_extra = getattr(model, "save_extra", None)
    if save_extra is not None:
        save_extra(directory)
    meta = {
        "format": FORMAT,
        "backend": model.backend,
        "init_kwargs": model.init_kwargs,
        "medshield_version": medshield.__version__,
        "embed_dim": _embed_dim(model),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> DualEncoder:
    """Load a model saved by :func:`save_model`, in eval mode, on ``map_location``.

    The backend class rebuilds the architecture with ``cls.for_loading(directory, init_kwargs)``
    when it defines that classmethod, else with ``cls(**init_kwargs, pretrained=False)``; the
    tensors then come from ``model.safetensors`` with strict key and shape checks.

    Raises:
        DataError: the directory or a file in it is missing, ``medshield_model.json`` is
            malformed, or the weights do not fit the architecture.
        UnsafeFileError: the directory holds only pickle checkpoints (``.pt``, ``.bin``, ...).
        UnknownNameError: the saved backend is not registered.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"model directory {directory} does not exist")
    if not (directory / META_FILE).is_file():
        _refuse_pickles(directory)
    backend, init_kwargs = _read_meta(directory)
    cls = MODELS.get(backend)
    for_loading = getattr(cls, "for_loading", None)
    if for_loading is not None:
        model = for_loading(directory, init_kwargs)
    else:
        model = cls(**{**init_kwargs, "pretrained": False})

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights} is missing; {directory} holds {META_FILE} but no weights")
    try:
        _load_safetensors(model, str(weights), strict=True)
    except (RuntimeError, SafetensorError) as e:
        raise DataError(
            f"weights in {weights} do not fit the {backend!r} model built from {META_FILE} "
            f"(init_kwargs={init_kwargs}): {e}"
        ) from e
    return model.to(map_location).eval()


def _embed_dim(model: DualEncoder) -> int:
    """The embedding size: the model's ``embed_dim`` attribute, else measured on one text."""
    embed_dim = getattr(model, "embed_dim", None)
    if embed_dim is None:
        with torch.no_grad():
            embed_dim = model.encode_text(["a"]).shape[-1]
    return int(embed_dim)


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(
            f"refusing to unpickle {', '.join(pickles)} in {directory}: unpickling a file can run "
            "arbitrary code, so medshield loads safetensors only. If you trust the file, convert "
            "it: build the model with medshield.models.create_model(...), call "
            "model.load_state_dict(torch.load(path, weights_only=True)) and save it with "
            "medshield.models.save_model(model, directory)"
        )


def read_record(directory: str | Path, name: str, what: str) -> dict[str, Any]:
    """The JSON object in ``directory / name``, the file that makes ``directory`` a saved
    ``what`` (e.g. ``medshield_model.json`` of a saved medshield model).

    Raises:
        DataError: the file is missing, is not valid JSON, or holds no JSON object.
    """
    path = Path(directory) / name
    if not path.is_file():
        raise DataError(f"{directory} is not a {what}: {name} is missing")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(record).__name__}")
    return record


def _read_meta(directory: Path) -> tuple[str, dict[str, Any]]:
    path = directory / META_FILE
    meta = read_record(directory, META_FILE, "saved medshield model")
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{path} has format {meta.get('format')!r}; this medshield "
            f"({medshield.__version__}) reads format {FORMAT}"
        )
    backend, init_kwargs = meta.get("backend"), meta.get("init_kwargs")
    if not isinstance(backend, str) or not isinstance(init_kwargs, dict):
        raise DataError(f"{path} needs a string 'backend' and an object 'init_kwargs'")
    return backend, init_kwargs
