"""The speed options of a fine-tuning run (issue 22): early stopping of the evaluation
attacks, bf16 autocast, the per-process cache of base models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from finetune_support import TINY_EVAL, run_config

from medshield.commands.finetune import load_base, load_finetune_config, run_finetune
from medshield.config import dump_config
from medshield.device import autocast, check_precision
from medshield.errors import ConfigError
from medshield.runs import Run

EVAL = {
    **TINY_EVAL,
    "max_test_items": 16,
    "attacks": [
        {"name": "pgd", "steps": 3, "restarts": 2},
        {"name": "apgd-ce", "steps": 4},
        {"name": "apgd-dlr", "steps": 4},
    ],
}
EVAL["retrieval"] = False


def robust_by_group(run: Run) -> dict[str, dict[int, bool]]:
    out: dict[str, dict[int, bool]] = {}
    for r in run.load_samples():
        if "robust_correct" in r:
            out.setdefault(r["group"], {})[r["index"]] = r["robust_correct"]
    return out


def test_early_stop_never_raises_robust_accuracy_of_a_run(tmp_path: Path, data_dir: Path) -> None:
    runs = {}
    for stop in (False, True):
        cfg = run_config(
            tmp_path, data_dir, name=f"stop{stop}", robust={**EVAL, "early_stop": stop}
        )
        run = Run(tmp_path / cfg.name, cfg)
        metrics = run_finetune(cfg, run, log=lambda _: None)["metrics"]
        runs[stop] = robust_by_group(run), metrics
    (off, metrics_off), (on, metrics_on) = runs[False], runs[True]
    assert set(off) == set(on) == {"pgd@2", "apgd-ce@2", "apgd-dlr@2"}
    for group in off:
        assert not any(on[group][i] and not off[group][i] for i in off[group]), group
    assert 0 < metrics_off["robust_accuracy/worst@2"]["value"] < 1  # some images hold
    # on this seeded case the accuracies are the same, not only no higher
    for name, value in metrics_off.items():
        assert metrics_on[name]["value"] == value["value"], name


def test_early_stop_is_on_by_default_and_keeps_older_runs_resumable() -> None:
    cfg = load_finetune_config(None, [])
    assert cfg.robust.early_stop is True
    assert load_finetune_config(None, ["robust.early_stop=false"]).robust.early_stop is False


def test_bf16_runs_on_the_cpu_and_its_robust_accuracy_is_close_to_fp32(
    tmp_path: Path, data_dir: Path
) -> None:
    metrics = {}
    for precision in ("fp32", "bf16"):
        cfg = run_config(
            tmp_path, data_dir, name=precision, precision=precision, device="cpu", robust=EVAL
        )
        result = run_finetune(cfg, Run(tmp_path / precision, cfg), log=lambda _: None)
        assert result["precision"] == precision
        metrics[precision] = result["metrics"]
    for name, value in metrics["fp32"].items():
        if name.startswith(("robust_accuracy/", "clean_accuracy")):
            # the stated tolerance: 2 of 16 images (bf16 keeps 8 bits of mantissa)
            assert abs(metrics["bf16"][name]["value"] - value["value"]) <= 2 / 16, name


def test_precision_is_checked_and_not_part_of_a_runs_identity(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="precision"):
        load_finetune_config(None, ["precision=fp16"])
    fp32 = run_config(tmp_path, data_dir, precision="fp32")
    bf16 = run_config(tmp_path, data_dir, precision="bf16")
    assert "precision" not in yaml.safe_load(dump_config(bf16))
    assert dump_config(fp32) == dump_config(bf16)
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    # a GPU without native bfloat16 (before Ampere) is refused with the fix
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 has no native bfloat16.*precision: fp32"):
        check_precision(torch.device("cuda"), "bf16")
    check_precision(torch.device("cuda"), "fp32")


def test_a_base_model_is_loaded_once_per_process(tmp_path: Path, data_dir: Path) -> None:
    cfg = run_config(tmp_path, data_dir, seed=11)
    first = load_base(cfg)
    after_build = torch.rand(3)
    torch.manual_seed(123)  # whatever ran in between
    second = load_base(cfg)
    assert torch.equal(torch.rand(3), after_build)  # the random state building leaves
    assert second is not first
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with torch.no_grad():
        next(second.parameters()).add_(1.0)  # a cell fine-tunes its copy in place
    third = load_base(cfg)
    assert torch.equal(next(third.parameters()), next(first.parameters()))


def test_early_stop_is_off_for_a_question_conditioned_classifier() -> None:
    from medshield.commands.finetune import attacks_stop_early
    from medshield.commands.finetune.config import RobustEvalConfig
    from medshield.eval.robust import build_attack

    class Conditioned(torch.nn.Linear):
        conditioned = True  # one question per image of the batch: no dropping images

    ev = RobustEvalConfig(retrieval=False)
    plain, conditioned = torch.nn.Linear(2, 2), Conditioned(2, 2)
    assert attacks_stop_early(ev, plain) and not attacks_stop_early(ev, conditioned)
    for model in (plain, conditioned):
        stop = attacks_stop_early(ev, model)
        assert all(build_attack(e, model, 2.0, stop).early_stop == stop for e in ev.attacks)


def test_a_checkpoint_saved_again_is_loaded_again(tmp_path: Path, data_dir: Path) -> None:
    from finetune_support import TINY_MODEL

    from medshield.models import create_model, save_model

    torch.manual_seed(0)
    save_model(create_model(TINY_MODEL["backend"], **TINY_MODEL["kwargs"]), tmp_path / "base")
    cfg = run_config(tmp_path, data_dir, model={"checkpoint": str(tmp_path / "base")})
    first = load_base(cfg)

    def same(model: torch.nn.Module) -> bool:
        pairs = zip(model.state_dict().values(), first.state_dict().values(), strict=True)
        return all(torch.equal(a, b) for a, b in pairs)

    assert same(load_base(cfg))
    torch.manual_seed(1)
    save_model(create_model(TINY_MODEL["backend"], **TINY_MODEL["kwargs"]), tmp_path / "base")
    assert not same(load_base(cfg))  # the new weights, not the cached ones
