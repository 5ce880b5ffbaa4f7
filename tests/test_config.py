"""Run configs: YAML loading, CLI-style overrides, validation errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from medshield.config import load_config
from medshield.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_demo_config_equals_the_built_in_default() -> None:
    from medshield.demo import DemoConfig, load_demo_config

    assert load_demo_config(CONFIGS / "demo.yaml") == DemoConfig()


def _loader(path: Path) -> Callable[[Path], BaseModel]:
    """Each shipped config validates against the model of the command that reads it."""
    from medshield.demo import load_demo_config
    from medshield.safety.redteam import load_redteam_config
    from medshield.serve import load_serve_config
    from medshield.studies.defense import load_defense_study_config
    from medshield.studies.finetune import load_study_config
    from medshield.studies.noise import load_noise_study_config

    special = {
        "demo.yaml": load_demo_config,
        "study_noise.yaml": load_noise_study_config,
        "study_finetune.yaml": load_study_config,
        "study_finetune_ablation.yaml": load_study_config,
        "study_defense.yaml": load_defense_study_config,
        "redteam_quick.yaml": load_redteam_config,
        "serve.yaml": load_serve_config,
    }
    return special.get(path.name, load_config)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    assert isinstance(_loader(path)(path), BaseModel)


def test_overrides_parse_yaml_values_into_nested_sections() -> None:
    cfg = load_config(
        None,
        [
            "pretrain.epochs=1",
            "data.modalities=[chest_xray, fundus]",
            "model.kwargs.image_size=32",
            "name=x",
        ],
    )
    assert cfg.pretrain.epochs == 1
    assert cfg.data.modalities == ["chest_xray", "fundus"]
    assert cfg.model.kwargs == {"image_size": 32}
    assert cfg.name == "x"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pretrain.epochs=0"], "epochs"),
        (["pretrain.epoch=2"], "epoch"),  # typo: unknown keys are refused
        (["evaluate.tasks=[zero_shot, teleport]"], "tasks"),
        (["pretrain.epochs"], "key.sub=value"),
        (["name.sub=1"], "name"),
        (["pretrain.lr=5", "pretrain.lr.x=1"], "not a section"),
    ],
)
def test_bad_overrides_give_clear_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
