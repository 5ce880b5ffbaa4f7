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
    from medshield.commands.demo import DemoConfig, load_demo_config

    assert load_demo_config(CONFIGS / "demo.yaml") == DemoConfig()


def _loader(path: Path) -> Callable[[Path], BaseModel]:
    """Each shipped config validates against the model of the command that reads it."""
    from medshield.commands.demo import load_demo_config
    from medshield.commands.redteam import load_redteam_config
    from medshield.commands.serve import load_serve_config
    from medshield.commands.studies.defense import load_defense_study_config
    from medshield.commands.studies.finetune import load_study_config
    from medshield.commands.studies.noise import load_noise_study_config
    from medshield.commands.train_vlm import load_vlm_config

    special = {
        "demo.yaml": load_demo_config,
        "study_noise.yaml": load_noise_study_config,
        "study_defense.yaml": load_defense_study_config,
        "redteam_quick.yaml": load_redteam_config,
        "serve.yaml": load_serve_config,
        "train_vlm_shipped.yaml": load_vlm_config,
    }
    if path.name.startswith("study_finetune"):
        return load_study_config
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


def _loaders() -> dict[str, Callable[[list[str]], BaseModel]]:
    """Every command's config loader, by command."""
    from medshield.commands.demo import load_demo_config
    from medshield.commands.finetune import load_finetune_config
    from medshield.commands.redteam import load_redteam_config
    from medshield.commands.studies.defense import load_defense_study_config
    from medshield.commands.studies.finetune import load_study_config
    from medshield.commands.studies.noise import load_noise_study_config
    from medshield.commands.train_vlm import load_vlm_config

    return {
        "pretrain": lambda o: load_config(None, o),
        "demo": lambda o: load_demo_config(None, o),
        "redteam": lambda o: load_redteam_config(None, o),
        "finetune": lambda o: load_finetune_config(None, o),
        "train-vlm": lambda o: load_vlm_config(None, o),
        "study noise": lambda o: load_noise_study_config(None, o),
        "study finetune": lambda o: load_study_config(None, o),
        "study defense": lambda o: load_defense_study_config(None, o),
    }


@pytest.mark.parametrize("command", list(_loaders()))
@pytest.mark.parametrize("name", ["/abs/folder", ".", "..", "../escaped", "a/b", "a\\b", "''"])
def test_a_run_name_is_one_folder_name_in_every_config(command: str, name: str) -> None:
    load = _loaders()[command]
    assert load(["name=ok-name_1.2"]).name == "ok-name_1.2"
    with pytest.raises(ConfigError, match="must be a single folder name"):
        load([f"name={name}"])


def test_study_labels_that_name_cell_folders_are_folder_names() -> None:
    from medshield.commands.studies.finetune import load_study_config

    with pytest.raises(ConfigError, match="'runs/x' must be a single folder name"):
        load_study_config(None, ["checkpoints={runs/x: null}"])
    with pytest.raises(ConfigError, match="'../up' must be a single folder name"):
        load_study_config(None, ["methods=[{method: lora, label: ../up}]"])


def test_every_config_model_refuses_non_finite_numbers() -> None:
    import medshield.commands.demo  # noqa: F401  (imports every command's config models)
    import medshield.commands.serve  # noqa: F401
    import medshield.commands.studies.defense  # noqa: F401
    import medshield.commands.studies.finetune  # noqa: F401
    import medshield.commands.studies.noise  # noqa: F401
    import medshield.train.finetune  # noqa: F401
    from medshield.config import StrictModel

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in [sub, *subclasses(sub)]]

    models = subclasses(StrictModel)
    assert len(models) > 25
    assert all(m.model_config.get("allow_inf_nan") is False for m in models)


@pytest.mark.parametrize(
    "command, override",
    [
        ("pretrain", "pretrain.lr=.inf"),
        ("pretrain", "pretrain.weight_decay=.nan"),
        ("pretrain", "evaluate.robust_eps=[1.0, .inf]"),
        ("pretrain", "noise.eps=.inf"),
        ("redteam", "generation.temperature=.nan"),
        ("finetune", "finetune.lr=.inf"),
        ("train-vlm", "lr=-.inf"),
    ],
)
def test_non_finite_numbers_are_config_errors(command: str, override: str) -> None:
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises(ConfigError, match=rf"(?s){key}.*finite number"):
        _loaders()[command]([override])


@pytest.mark.parametrize("value", ["[1, 2", "{a: 1", "a: b: c", "'unclosed"])
def test_bad_yaml_in_an_override_names_the_override_and_the_fix(value: str) -> None:
    with pytest.raises(ConfigError, match=r"override .data.modalities=.*not valid YAML.*quote"):
        load_config(None, [f"data.modalities={value}"])
