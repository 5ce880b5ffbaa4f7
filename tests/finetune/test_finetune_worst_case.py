"""The fine-tuning evaluation's attacks from the config list (registry names with their
arguments), the clear errors for bad lists and old fields, an attack registered outside the
library, and the per-image worst case over every attack and restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from finetune_support import TINY_EVAL, run_config
from torch import nn

from medshield.attacks import APGD, APGDDLR, PGD, Attack
from medshield.attacks.pgd import pgd_step_size
from medshield.commands.finetune import load_finetune_config, run_finetune
from medshield.commands.finetune.config import DEFAULT_ATTACKS, RobustEvalConfig
from medshield.config import load_config
from medshield.errors import ConfigError
from medshield.eval.robust import build_attack, worst_case
from medshield.registry import IMAGE_ATTACKS
from medshield.runs import Run


class Shift(Attack):
    """A test's own image attack: every pixel moved by ``shift`` x eps, a fixed direction."""

    def __init__(self, model: nn.Module, eps: float = 8.0, shift: float = 1.0) -> None:
        super().__init__(model, eps)
        self.shift = shift

    def perturb(self, images, labels, target_labels):
        return (images + self.shift * self.eps / 255).clamp(0, 1)


@pytest.fixture
def shift_registered():
    IMAGE_ATTACKS.register("test-shift", "a fixed shift of every pixel (tests only)")(Shift)
    yield
    IMAGE_ATTACKS._entries.pop("test-shift")


def test_the_default_attacks_are_pgd_10_and_50_with_restarts_apgd_ce_and_dlr() -> None:
    ev = RobustEvalConfig(retrieval=False)
    assert [e.model_dump() for e in ev.attacks] == [
        {"name": "pgd", "restarts": 2, "steps": 10},
        {"name": "pgd", "restarts": 2, "steps": 50},
        {"name": "apgd-ce", "restarts": 1, "steps": 50},
        {"name": "apgd-dlr", "restarts": 1, "steps": 50},
    ]
    assert len(DEFAULT_ATTACKS) == 4
    model = nn.Linear(4, 3)
    built = [build_attack(e, model, 2.0) for e in ev.attacks]
    pgd10, pgd50, ce, dlr = built
    assert type(pgd10) is PGD and pgd10.steps == 10 and pgd10.restarts == 1  # restarts: rows
    assert pgd10.alpha == pgd_step_size(2.0, 10) and pgd50.alpha == pgd_step_size(2.0, 50)
    assert type(ce) is APGD and ce.steps == 50 and ce.eps == 2.0
    assert isinstance(dlr, APGDDLR) and dlr.steps == 50


@pytest.mark.parametrize(
    ("robust", "message"),
    [
        ({"attacks": [{"name": "pgdx"}]}, r"'pgdx' is not a registered image attack.*apgd-ce"),
        ({"attacks": [{"name": "co-attack"}]}, r"'co-attack' is not a registered image attack"),
        ({"attacks": [{"name": "pgd", "stepz": 3}]}, r"do not fit attack 'pgd'.*stepz"),
        ({"attacks": [{"name": "pgd", "steps": 0}]}, r"do not fit attack 'pgd'"),
        ({"attacks": [{"name": "pgd", "eps": 4}]}, r"'eps' is not an entry argument"),
        ({"attacks": [{"name": "pgd"}, {"name": "pgd"}]}, r"need distinct 'steps'"),
        ({"attacks": []}, r"list at least one attack"),
        ({"attacks": [{"name": "pgd", "restarts": 0}]}, r"restarts"),
        ({"pgd_steps": [10]}, r"'pgd_steps' is gone: list the attacks under robust.attacks"),
        ({"apgd_dlr": False}, r"'apgd_dlr' is gone.*\{name: apgd-ce, steps: 50\}"),
        ({"apgd": False, "restarts": 1}, r"'restarts', 'apgd' are gone: list the attacks"),
    ],
)
def test_bad_attack_lists_and_old_fields_are_clear_config_errors(
    robust: dict, message: str
) -> None:
    sets = [f"robust.{k}={v!r}".replace("'", '"') for k, v in robust.items()]
    with pytest.raises(ConfigError, match=message):
        load_finetune_config(None, [*sets, "robust.retrieval=false"])


def test_old_evaluate_field_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'attack_steps' is gone.*robust_attacks"):
        load_config(None, ["evaluate.attack_steps=5"])


def test_a_newly_registered_attack_runs_from_the_config(
    shift_registered, tmp_path: Path, data_dir: Path
) -> None:
    sets = ["robust.attacks=[{name: test-shift, shift: -1}, {name: pgd, steps: 1}]"]
    assert load_finetune_config(None, sets).robust.attacks[0].kwargs == {"shift": -1}
    with pytest.raises(ConfigError, match=r"do not fit attack 'test-shift'.*size"):
        load_finetune_config(None, ["robust.attacks=[{name: test-shift, size: 2}]"])
    cfg = run_config(tmp_path, data_dir)
    attacks = [{"name": "test-shift", "shift": -1}, {"name": "pgd", "steps": 1}]
    cfg.robust = RobustEvalConfig(**{**TINY_EVAL, "retrieval": False, "attacks": attacks})
    result = run_finetune(cfg, Run(tmp_path / "ft", cfg), log=lambda _: None, progress=False)
    rows = Run(tmp_path / "ft", cfg).load_samples()
    shifted = [r for r in rows if r.get("attack") == "test-shift"]
    assert len(shifted) == 4 and {r["group"] for r in shifted} == {"test-shift@2"}
    assert all(r["linf"] <= 2 + 1e-3 for r in shifted)
    m = result["metrics"]
    hits = [r["robust_correct"] for r in sorted(shifted, key=lambda r: r["index"])]
    assert m["robust_accuracy/test-shift@2"]["value"] == pytest.approx(sum(hits) / 4)
    assert m["robust_accuracy/worst@2"]["value"] <= m["robust_accuracy/test-shift@2"]["value"]
    assert ("budget", "test-shift@2") in {(f["name"], f["group"]) for f in result["sanity"]}


def test_worst_case_is_the_per_image_minimum_over_every_attack_and_restart() -> None:
    def rows(attack: str, eps: float, robust: list[bool], restart: int = 0) -> list[dict]:
        return [
            {"attack": attack, "eps": eps, "restart": restart, "index": i, "robust_correct": r}
            for i, r in enumerate(robust)
        ]

    attacked = [
        *rows("pgd10", 2.0, [True, True, False, True]),
        *rows("pgd10", 2.0, [True, True, True, False], restart=1),  # restart 1 breaks image 3
        *rows("apgd-ce", 2.0, [True, True, True, True]),
        *rows("apgd-dlr", 2.0, [True, False, True, True]),  # only APGD-DLR breaks image 1
        *rows("apgd-dlr", 1.0, [False, False, False, False]),  # another budget: not counted at 2
        {"group": "clean", "index": 3, "correct": True},
    ]
    assert worst_case(attacked, 2.0) == [True, False, False, False]
    assert worst_case(attacked, 2.0, "pgd10") == [True, True, False, False]
    without_dlr = [r for r in attacked if r.get("attack") != "apgd-dlr"]
    assert worst_case(without_dlr, 2.0) == [True, True, False, False]
    assert torch.tensor(worst_case(attacked, 1.0)).sum() == 0
