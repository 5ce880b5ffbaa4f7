"""Build registered dual encoders by name, and save / load them as safetensors directories.

A saved model is a directory::

    model.safetensors       all tensors (safetensors: no pickle, so loading runs no code); its
                            header records the init_kwargs the model was saved with
    medshield_model.json    {"format": 1, "backend": ..., "init_kwargs": {...}, ...}
    ...                     backend extras written by ``save_extra`` (configs, tokenizer files)

:func:`load_model` checks ``init_kwargs`` against the constructor and against the record in the
weights (an edited ``image_size`` changes no tensor shape, so only the record catches it),
rebuilds the architecture from ``backend`` + ``init_kwargs`` without pretrained weights, then
fills every tensor from ``model.safetensors``. It never calls ``torch.load`` / pickle on a user
file.

Example::

    model = create_model("mini-clip")
    save_model(model, "runs/clip")
    same = load_model("runs/clip")
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _load_safetensors
from safetensors.torch import save_model as _save_safetensors

import medshield
from medshield.errors import DataError, MedshieldError, UnknownNameError, UnsafeFileError
from medshield.models.base import DualEncoder
from medshield.registry import MODELS

FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "medshield_model.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
INIT_KWARGS_KEY = "medshield_init_kwargs"  # safetensors header: the init_kwargs at save time
# How to turn a trusted pickle into safetensors: a medshield model, a Hugging Face folder.
_CONVERT_MEDSHIELD = (
    "build the model with medshield.models.create_model(...), call "
    "model.load_state_dict(torch.load(path, weights_only=True)) and save it with "
    "medshield.models.save_model(model, directory)"
)
_CONVERT_HF = (
    "load it once with transformers' from_pretrained and write "
    "save_pretrained(directory, safe_serialization=True), or download the repository's "
    "model.safetensors"
)


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
    record = init_kwargs_record(model.init_kwargs)
    _save_safetensors(model, str(directory / WEIGHTS_FILE), metadata=record)
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
            malformed or its ``init_kwargs`` differ from those recorded in the weights, or the
            weights are corrupt or do not fit the architecture.
        UnsafeFileError: the directory holds only pickle checkpoints (``.pt``, ``.bin``, ...).
        UnknownNameError: the saved backend is not registered.
    """
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is a file, not a directory" if directory.exists() else "does not exist"
        raise DataError(
            f"model directory {directory} {problem}; pass the directory a medshield run saved "
            "its model to (e.g. runs/<name>/model)"
        )
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        refuse_pickles(directory, _CONVERT_MEDSHIELD)
        raise DataError(
            f"{directory} is not a saved medshield model: {META_FILE} is missing (a saved model "
            f"holds {META_FILE} and {WEIGHTS_FILE}, as `medshield pretrain` writes them)"
        )
    backend, init_kwargs = _read_meta(directory)
    try:
        cls = MODELS.get(backend)
    except UnknownNameError as e:
        raise UnknownNameError(
            f"{meta_path} names backend {backend!r}, which is not registered: {e}. Install the "
            "plugin that provides it, or fix 'backend' in that file"
        ) from e
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights} is missing; {directory} holds {META_FILE} but no weights")
    _check_init_kwargs(cls, backend, init_kwargs, meta_path)
    check_init_kwargs_record(init_kwargs, weights, meta_path)
    for_loading = getattr(cls, "for_loading", None)
    try:
        if for_loading is not None:
            model = for_loading(directory, init_kwargs)
        else:
            model = cls(**{**init_kwargs, "pretrained": False})
    except MedshieldError:
        raise
    except (TypeError, ValueError) as e:
        raise DataError(
            f"cannot build the {backend!r} model from init_kwargs={init_kwargs} in {meta_path} "
            f"({type(e).__name__}: {e}); restore the values the model was saved with"
        ) from e
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


def refuse_pickles(directory: Path, convert: str) -> None:
    """Raise :class:`UnsafeFileError` when ``directory`` holds pickle checkpoints.

    Args:
        directory: the model directory.
        convert: how to turn the pickle into safetensors (the fix in the message).
    """
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(
            f"refusing to unpickle {', '.join(pickles)} in {directory}: unpickling a file can run "
            "arbitrary code, so medshield loads safetensors only. If you trust the file, convert "
            f"it: {convert}"
        )


def require_hf_safetensors(directory: Path, what: str) -> None:
    """Check that a Hugging Face directory holds ``.safetensors`` weights before loading it.

    Raises:
        UnsafeFileError: only pickle weights (``pytorch_model.bin``, ...).
        DataError: no weights at all.
    """
    if any(directory.glob("*.safetensors")):
        return
    refuse_pickles(directory, _CONVERT_HF)
    present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    raise DataError(
        f"cannot load {what} weights from {directory}: it holds no model.safetensors (it "
        f"holds {present}). Download the repository with its safetensors weights "
        "(`huggingface-cli download REPO --local-dir DIR`)"
    )


def _check_init_kwargs(
    cls: type, backend: str, init_kwargs: dict[str, Any], meta_path: Path
) -> None:
    """Unknown ``init_kwargs`` keys (an edited metadata file) as a DataError naming them."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(init_kwargs) - set(params))
    if unknown:
        accepted = ", ".join(n for n in params if n != "pretrained")
        raise DataError(
            f"{meta_path}: init_kwargs has unknown key(s) {', '.join(unknown)}; the "
            f"{backend!r} backend accepts {accepted}. Remove them (the file was edited or "
            "written by another version)"
        )


def init_kwargs_record(init_kwargs: dict[str, Any]) -> dict[str, str]:
    """The safetensors header entry that records ``init_kwargs`` next to the weights."""
    return {INIT_KWARGS_KEY: json.dumps(init_kwargs, sort_keys=True)}


def check_init_kwargs_record(init_kwargs: dict[str, Any], weights: Path, meta_path: Path) -> None:
    """Compare ``init_kwargs`` read from ``meta_path`` with the record in the weights' header
    (see :func:`init_kwargs_record`).

    Some settings (mini-clip's ``image_size``) change no tensor shape, so only this record
    tells an edited metadata file apart. Weights saved before the record existed cannot be
    checked: a warning says which values are used.

    Raises:
        DataError: the values differ, or the weights are not a readable safetensors file.
    """
    try:
        with safe_open(str(weights), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DataError(
            f"{weights} is not a readable safetensors file ({e}); it is corrupt or truncated. "
            "Save the model again (or copy it again from where it was trained)"
        ) from e
    if INIT_KWARGS_KEY not in header:
        warnings.warn(
            f"{weights} does not record the settings it was trained with (saved by an older "
            f"medshield), so {meta_path.name} cannot be checked against it; using {init_kwargs}",
            stacklevel=3,
        )
        return
    try:
        saved = json.loads(header[INIT_KWARGS_KEY])
    except json.JSONDecodeError as e:
        raise DataError(f"{weights}: the {INIT_KWARGS_KEY} header is not JSON: {e}") from e
    differ = sorted(k for k in {*saved, *init_kwargs} if saved.get(k) != init_kwargs.get(k))
    if differ:
        said = ", ".join(f"{k}={init_kwargs.get(k)!r}" for k in differ)
        trained = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
        raise DataError(
            f"{meta_path} says {said} but the weights in {weights} were saved with {trained}. "
            f"Restore those values in {meta_path.name} (a model built otherwise would run silently "
            "with settings it was not trained for)"
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
