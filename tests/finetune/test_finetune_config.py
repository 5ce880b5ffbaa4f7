"""Fine-tuning configs: bad methods, weights, options, LoRA targets and retrieval settings fail
before training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from finetune_support import FAST

from medshield.commands.finetune import load_finetune_config, run_finetune
from medshield.commands.finetune.config import FineTuneRunConfig
from medshield.commands.studies.finetune import load_study_config
from medshield.config import ModelConfig
from medshield.errors import ConfigError, DataError
from medshield.models import save_model
from medshield.models.mini_clip import MiniClip
from medshield.runs import Run
from medshield.train.finetune import finetune
from medshield.train.finetune.config import parse_finetune_config
from medshield.train.finetune.data import TrainData


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"method": "no-such-method"}, "unknown fine-tuning method"),
        ({"method": "ran", "kwargs": {"cov": -1}}, "cov must be >= 0"),
        ({"method": "ran", "kwargs": {"beta": -0.5}}, "beta must be >= 0"),
        ({"method": "ran", "kwargs": {"pgd_steps": 0}}, "pgd_steps must be at least 1"),
        ({"method": "ran", "kwargs": {"task_clean": 0, "contrastive": 0}}, "teaches the labels"),
        ({"method": "ran", "kwargs": {"depths": ["deep"]}}, "early"),
        ({"method": "ran", "kwargs": {"hidden": 8}}, "only apply with placement: head"),
        ({"method": "ran", "kwargs": {"placement": "head", "depths": [1]}}, "placement: tower"),
        ({"method": "lora", "kwargs": {"rnk": 4}}, "rnk"),
        ({"method": "ran", "lr": 0}, "greater than 0"),
        ({"method": "tecoa", "adversary": {"eps": 0}}, "greater than 0"),
        ({"keep_best": True}, "set val_fraction above 0"),
        ({"val_fraction": 0.6}, "less than or equal to 0.5"),
        ({"val_fraction": -0.1}, "greater than or equal to 0"),
    ],
)
def test_bad_configs_are_clear_config_errors(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_finetune_config(raw)


def test_lora_target_matching_nothing_fails_before_training(
    base: MiniClip, train: TrainData
) -> None:
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="matches no Conv2d or Linear"):
        finetune(
            model,
            {**FAST, "method": "lora", "kwargs": {"text_targets": r"text_tower\.nothing"}},
            train.modality,
            train=train,
            progress=False,
        )
    assert set(model.state_dict()) == set(before)  # nothing injected, nothing trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_of_the_wrong_architecture_fails_before_training(
    base: MiniClip, tmp_path: Path, data_dir: Path
) -> None:
    save_model(base, tmp_path / "base")
    meta_path = tmp_path / "base" / "medshield_model.json"
    meta = json.loads(meta_path.read_text())
    meta["init_kwargs"]["embed_dim"] = 48  # the weights are 64-d
    meta_path.write_text(json.dumps(meta))
    cfg = FineTuneRunConfig(
        name="ft",
        output_dir=str(tmp_path),
        data_dir=str(data_dir),
        model={"checkpoint": str(tmp_path / "base")},
        finetune={**FAST, "method": "ran"},
    )
    with pytest.raises(DataError, match="saved with embed_dim=64"):
        run_finetune(cfg, Run(tmp_path / "ft", cfg))
    assert not (tmp_path / "ft" / "finetuned").exists()
    # a fine-tuned directory given as the base checkpoint is refused with its own message
    (tmp_path / "ft" / "finetuned").mkdir()
    (tmp_path / "ft" / "finetuned" / "finetune.json").write_text("{}")
    wrong = cfg.model_copy(
        update={"model": ModelConfig(checkpoint=str(tmp_path / "ft" / "finetuned"))}
    )
    with pytest.raises(DataError, match="fine-tuned classifier, not a base"):
        run_finetune(wrong, Run(tmp_path / "ft2", wrong))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["robust.retrieval_attack=pgd"],
            "multimodal attack 'pgd'; registered multimodal attacks: co-",
        ),
        (["robust.retrieval_attack=no-such-attack"], "unknown multimodal attack"),
        (["robust.retrieval_attack_kwargs={eps: -1}"], "do not fit"),
        (["robust.retrieval_attack_kwargs={epsilon: 2}"], "do not fit"),
        (["robust.retrieval_per_class_cap=0"], "greater than or equal to 1"),
        (["robust.retrieval=maybe"], "valid boolean"),
    ],
)
def test_bad_retrieval_settings_are_clear_config_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_finetune_config(None, overrides)
    with pytest.raises(ConfigError, match=match):
        load_study_config(None, overrides)


def test_retrieval_switched_off_ignores_its_attack_and_vqa_flag_is_a_bool() -> None:
    cfg = load_finetune_config(None, ["robust.retrieval=false", "robust.retrieval_attack=pgd"])
    assert cfg.robust.retrieval is False
    assert load_study_config(None, ["vqa_closed=false"]).vqa_closed is False
    with pytest.raises(ConfigError, match="valid boolean"):
        load_study_config(None, ["vqa_closed=perhaps"])
