"""The fine-tuning evaluation's attacks: APGD-DLR next to PGD and APGD-CE, its config switch,
and the per-image worst case over every attack."""

from __future__ import annotations

from torch import nn

from medshield.attacks import APGD, APGDDLR, PGD
from medshield.train.finetune.workflow import RobustEvalConfig, _attacks, worst_case


def test_apgd_dlr_runs_with_apgd_ce_steps_and_the_switch_removes_it() -> None:
    model = nn.Linear(4, 3)
    ev = RobustEvalConfig(pgd_steps=[10], apgd_steps=7, retrieval=False)
    attacks = dict(_attacks(model, ev, 2.0))
    assert list(attacks) == ["pgd10", "apgd-ce", "apgd-dlr"]
    assert isinstance(attacks["pgd10"], PGD) and type(attacks["apgd-ce"]) is APGD
    dlr = attacks["apgd-dlr"]
    assert isinstance(dlr, APGDDLR) and dlr.steps == 7 and dlr.eps == 2.0
    off = RobustEvalConfig(pgd_steps=[10], apgd_dlr=False, retrieval=False)
    assert [name for name, _ in _attacks(model, off, 2.0)] == ["pgd10", "apgd-ce"]


def test_worst_case_is_the_per_image_minimum_over_every_attack() -> None:
    def rows(group: str, robust: list[bool]) -> list[dict]:
        return [{"group": group, "index": i, "robust_correct": r} for i, r in enumerate(robust)]

    attacked = [
        *rows("pgd10@2", [True, True, False, True]),
        *rows("apgd-ce@2", [True, True, True, True]),
        *rows("apgd-dlr@2", [True, False, True, True]),  # only APGD-DLR breaks image 1
        *rows("apgd-dlr@1", [False, False, False, False]),  # another budget: not counted at 2
        {"group": "zero-grad@2", "passed": True, "detail": ""},
        {"group": "clean", "index": 3, "correct": True},
    ]
    assert worst_case(attacked, 2.0) == [True, False, False, True]
    without_dlr = [r for r in attacked if r["group"] != "apgd-dlr@2"]
    assert worst_case(without_dlr, 2.0) == [True, True, False, True]
