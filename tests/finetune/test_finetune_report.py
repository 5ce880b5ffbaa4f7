"""The finetune study's issue-20 report on synthetic cells with known per-image hits: per-task
tables with their references, means that keep VQA-RAD and other class counts out, target
verdicts, paired ablation effects, training curves and the RAN term log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medshield.commands.finetune.config import RobustEvalConfig
from medshield.commands.studies.finetune_outputs import aggregate, curves_md, plot_curves
from medshield.commands.studies.finetune_report import (
    ablation,
    curves,
    ran_terms,
    targets,
    verdict,
    write_report,
)

EV = RobustEvalConfig(eps=[1, 2], bootstrap_resamples=200)
N = 100  # test images per seed


def cell(
    method: str,
    task: str,
    seed: int,
    clean: np.ndarray,
    worst: dict[float, np.ndarray],
    params: int = 1000,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One synthetic cell: clean and per-attack rows with the given per-image hits (the worst
    case is split over two attacks), and a report."""
    rows: list[dict[str, Any]] = [
        {"group": "clean", "index": 10 * i, "label": i % 2, "correct": bool(h)}
        for i, h in enumerate(clean)
    ]
    for eps, hits in worst.items():
        for attack, hit in (("pgd10", [True] * N), ("apgd-ce", hits)):
            rows += [
                {"group": f"{attack}@{eps:g}", "attack": attack, "eps": eps, "restart": 0}
                | {"index": i, "robust_correct": bool(h)}
                for i, h in enumerate(hit)
            ]
    report = {
        "trainable_params": params,
        "train_wall_s": 2.0,
        "overhead": {"flops_ratio": 1.0, "latency_ratio": 1.0},
        "history": history or [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(8)],
        "compute": {"image_forward": 600, "image_backward": 400, "train_wall_s": 2.0},
    }
    return {
        "cell": f"base__{method}__{task}__seed{seed}",
        "checkpoint": "base",
        "method": method,
        "modality": task,
        "seed": seed,
        "result": {"report": report, "sanity": []},
        "rows": rows,
        "lr": 0.001,
    }


def hits(share: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(N) < share


def flip(base: np.ndarray, count: int, seed: int, to: bool) -> np.ndarray:
    """``base`` with ``count`` of its images that are not ``to`` switched to ``to``."""
    out = base.copy()
    candidates = np.flatnonzero(out != to)
    out[np.random.default_rng(seed).choice(candidates, count, replace=False)] = to
    return out


def by_claim(found: list[dict[str, Any]], claim: str, task: str = "chest_xray") -> dict[str, Any]:
    return next(t for t in found if t["claim"].startswith(claim) and t["task"] == task)


def test_verdict_states_the_point_estimate_and_the_ci() -> None:
    clear = verdict({"value": 0.5, "ci_low": 0.45, "ci_high": 0.55, "n": 9}, 0.40)
    assert (clear["verdict"], clear["point_clears"], clear["ci_clears"]) == ("REACHED", True, True)
    assert "whole CI clears" in clear["note"]
    straddle = verdict({"value": 0.41, "ci_low": 0.35, "ci_high": 0.47, "n": 9}, 0.40)
    assert straddle["verdict"] == "REACHED" and not straddle["ci_clears"]
    assert "straddles" in straddle["note"]
    below = verdict({"value": 0.3, "ci_low": 0.25, "ci_high": 0.35, "n": 9}, 0.40)
    assert below["verdict"] == "NOT REACHED" and "whole CI lies below" in below["note"]
    exact = verdict({"value": 0.31 - 0.28, "ci_low": 0.01, "ci_high": 0.05, "n": 9}, 0.03)
    assert exact["verdict"] == "REACHED"  # 0.31 - 0.28 < 0.03 in floating point
    missing = verdict(None, 0.40, "no cells of tecoa")
    assert missing == {"verdict": "NOT MEASURED", "note": "no cells of tecoa"}


def test_a_gap_verdict_counts_the_seeds_that_clear_the_bar_alone() -> None:
    gap = {"value": 0.04, "ci_low": 0.01, "ci_high": 0.07, "n": 600}
    mixed = verdict({**gap, "per_seed": {"0": 0.05, "1": 0.06, "2": 0.01}}, 0.03)
    assert mixed["verdict"] == "REACHED"
    assert mixed["note"].endswith("per seed +0.050, +0.060, +0.010: 2 of 3 clear it")
    one_seed = verdict({**gap, "per_seed": {"0": 0.04}}, 0.03)
    assert "per seed" not in one_seed["note"]  # one seed says nothing the CI does not


@pytest.mark.parametrize("strong", [True, False])
def test_targets_flip_with_the_measured_accuracy(strong: bool) -> None:
    """RAN 6 points above adv-lora at 2/255 on the same images reaches target 2, level with it
    does not; 60% worst case at 1/255 reaches target 1, 20% does not; a method without cells
    is NOT MEASURED."""
    cells = []
    for seed in (0, 1, 2):
        adv = hits(0.5, seed)
        ran = flip(adv, 6, seed, True) if strong else adv
        lora_clean = hits(0.8, 10 + seed)
        one = hits(0.6 if strong else 0.2, 20 + seed)
        cells += [
            cell("ran", "chest_xray", seed, lora_clean, {1: one, 2: ran}, params=500),
            cell("adv-lora", "chest_xray", seed, lora_clean, {1: one, 2: adv}, params=800),
            cell("lora", "chest_xray", seed, lora_clean, {1: one, 2: adv}),
            cell("linear-probe", "chest_xray", seed, lora_clean, {1: one, 2: adv}),
        ]
    found = targets(cells, ["base"], 200)
    gap = by_claim(found, "RAN robust @2/255 >= adv-lora")
    assert gap["paired"] and gap["seeds"] == 3 and gap["n"] == 3 * N
    assert gap["value"] == pytest.approx(0.06 if strong else 0.0)
    assert gap["verdict"] == ("REACHED" if strong else "NOT REACHED")
    assert gap["per_seed"] == pytest.approx({s: 0.06 if strong else 0.0 for s in "012"})
    assert gap["note"].endswith(f"{3 if strong else 0} of 3 clear it")
    ran1 = by_claim(found, "ran worst-case robust accuracy @1/255")
    assert ran1["verdict"] == ("REACHED" if strong else "NOT REACHED")
    assert ran1["ci_clears"] == strong  # 0.6 of 300 images clears 0.40 with its whole CI
    assert ran1["reference"]["method"] == "linear-probe" and ran1["seeds"] == 3
    assert ran1["reference"]["worst@1"]["value"] == ran1["value"]  # the same synthetic hits
    assert by_claim(found, "tecoa")["verdict"] == "NOT MEASURED"
    assert "tecoa" in by_claim(found, "tecoa")["note"]
    assert by_claim(found, "RAN robust @2/255 >= adv-adapter")["verdict"] == "NOT MEASURED"
    clean = by_claim(found, "RAN clean >= clean LoRA")
    assert clean["value"] == 0 and clean["verdict"] == "REACHED"  # same hits: 0 >= -0.01
    params = by_claim(found, "RAN trainable parameters")
    assert params["verdict"] == "REACHED" and params["trainable_params"] == {
        "ran": 500,
        "adv-lora": 800,
    }
    assert by_claim(found, "RAN robust @2/255 >= adv-lora", "blood_cell")["verdict"] == (
        "NOT MEASURED"
    )
    assert by_claim(found, "each RAN part", "chest_xray")["verdict"] == "NOT MEASURED"


def test_ablation_pairs_each_ran_no_term_with_its_ran() -> None:
    cells = []
    for seed in (0, 1):
        full = hits(0.5, seed)
        cells += [
            cell("ran", "chest_xray", seed, full, {1: full, 2: full}),
            cell("ran-no_svd", "chest_xray", seed, flip(full, 5, seed, False), {1: full, 2: full}),
            cell("ran-no_keep", "chest_xray", seed, full, {1: full, 2: flip(full, 3, seed, True)}),
        ]
    rows = {r["ablated"]: r for r in ablation(cells, [1, 2], 200)}
    assert set(rows) == {"ran-no_svd", "ran-no_keep"}
    assert rows["ran-no_svd"]["ran"] == "ran" and rows["ran-no_svd"]["term"] == "svd"
    assert rows["ran-no_svd"]["delta_clean"]["value"] == pytest.approx(-0.05)
    assert rows["ran-no_svd"]["delta_clean"]["ci_high"] < 0  # 5 of 200 pairs, all one way
    assert rows["ran-no_svd"]["delta_worst@2"]["value"] == 0
    assert rows["ran-no_keep"]["delta_worst@2"]["value"] == pytest.approx(0.03)
    found = targets(cells, ["base"], 200)
    ablated = by_claim(found, "each RAN part")
    assert ablated["terms_measured"] == 2 and "ran-no_cov" in ablated["note"]


def test_report_files_tables_and_means_keep_vqa_and_other_class_counts_apart(
    tmp_path: Path,
) -> None:
    """Per-task tables carry chance and majority; the only mean is over the two 2-class
    modalities: VQA-RAD closed (also 2 classes) and blood cells (8) stay out of it."""
    tasks = ("chest_xray", "breast_ultrasound", "vqa_rad_closed", "blood_cell")
    ran_log = [
        {
            "epoch": 0,
            "step": s,
            "loss": 2 - 0.1 * s,
            "task_clean": 1 - 0.1 * s,
            "kl": 0.2,
            "cov": 0.1,
        }
        for s in range(6)
    ]
    cells = [
        cell(m, t, 0, hits(0.7, i), {1: hits(0.5, i), 2: hits(0.4, i)}, history=log)
        for i, t in enumerate(tasks)
        for m, log in (("lora", None), ("ran", ran_log))
    ]
    table = aggregate(cells, EV)
    result = write_report(cells, table, [1, 2], 200, tmp_path)
    assert json.loads(json.dumps(result)) == result  # results.json-ready

    by_task = {t["task"]: t for t in result["task_tables"]}
    assert by_task["blood_cell"]["chance"] == pytest.approx(1 / 8)
    assert not by_task["vqa_rad_closed"]["in_means"] and by_task["chest_xray"]["in_means"]
    row = by_task["chest_xray"]["rows"][0]
    assert row["majority"]["value"] == pytest.approx(0.5)  # labels alternate
    assert (row["image_forward"], row["image_backward"], row["lr"]) == (600, 400, [0.001])
    means = result["task_means"]
    assert {m["method"] for m in means} == {"lora", "ran"}
    assert all(m["tasks"] == ["chest_xray", "breast_ultrasound"] for m in means)
    lora = next(m for m in means if m["method"] == "lora")
    rows = [next(r for r in by_task[t]["rows"] if r["method"] == "lora") for t in tasks[:2]]
    assert lora["clean"] == pytest.approx(np.mean([r["clean"]["value"] for r in rows]))

    tables = (tmp_path / "tables.md").read_text()
    header = next(line for line in tables.splitlines() if line.startswith("| method"))
    assert "| chance |" in header and "| majority |" in header and "| lr |" in header
    assert "in no mean over tasks" in tables
    mean_section = tables.split("## Means over tasks")[1]
    assert "vqa_rad_closed" not in mean_section and "blood_cell" not in mean_section
    assert json.loads((tmp_path / "targets.json").read_text()) == result["targets"]
    assert "NOT MEASURED" in (tmp_path / "targets.md").read_text()

    ran_curve = next(
        c for c in result["curves"] if c["method"] == "ran" and c["task"] == "chest_xray"
    )
    assert ran_curve["x"] == "step" and ran_curve["steps"] == list(range(6))
    lora_curve = next(c for c in result["curves"] if c["method"] == "lora")
    assert lora_curve["x"] == "epoch" and lora_curve["flat"] is False  # 1/(e+1) still falls
    terms = result["ran_terms"]
    assert terms["cell"] == "base__ran__chest_xray__seed0"
    assert terms["inert"] == ["kl", "cov"] and "keep" in terms["not_logged"]
    for name in ("curves.png", "ran_terms.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert str(tmp_path / name) in result["report_plots"]
    assert "| step | loss | task_clean | kl | cov |" in (tmp_path / "ran_terms.md").read_text()


def test_a_flat_curve_is_flat_and_a_single_point_has_no_verdict() -> None:
    flat = [{"epoch": e, "loss": 1.0 + (0.5 if e == 0 else 0.0)} for e in range(8)]
    one = [{"epoch": 0, "loss": 1.0, "task_clean": 1.0}]
    cells = [
        cell("tecoa", "chest_xray", 0, hits(0.5, 0), {}, history=flat),
        cell("ran", "chest_xray", 0, hits(0.5, 0), {}, history=one),
    ]
    found = {c["method"]: c for c in curves(cells)}
    assert found["tecoa"]["flat"] is True and found["tecoa"]["tail_change"] == 0
    assert found["ran"]["flat"] is None
    assert ran_terms(cells)["inert"] is None  # one point: nothing can move


def test_robust_validation_accuracy_curves_say_whether_it_stopped_rising(tmp_path: Path) -> None:
    def history(robust: list[float]) -> list[dict[str, Any]]:
        return [
            {"step": 10 * (i + 1), "loss": 1.0, "val_accuracy": 0.9, "val_robust_accuracy": r}
            for i, r in enumerate(robust)
        ]

    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # last quarter 0.75, before 0.55
    level = [0.1, 0.5, 0.6, 0.6, 0.6, 0.61, 0.6, 0.6]  # 0.60 against 0.605: stopped
    cells = [
        cell("adv-lora", "chest_xray", seed, hits(0.5, 0), {}, history=history(rising))
        for seed in (0, 1)
    ] + [
        cell("ran", "chest_xray", 0, hits(0.5, 0), {}, history=history(level)),
        cell("ran", "chest_xray", 1, hits(0.5, 0), {}, history=history([0.2] + level[1:])),
        cell("lora", "chest_xray", 0, hits(0.5, 0), {}, history=[{"step": 10, "loss": 1.0}]),
    ]
    found = {c["method"]: c for c in curves(cells)}
    assert found["adv-lora"]["val_robust"] == pytest.approx(rising)
    assert found["adv-lora"]["val_robust_gain"] == pytest.approx(0.2)
    assert found["adv-lora"]["val_robust_stopped"] is False
    assert found["ran"]["val_robust"][0] == pytest.approx(0.15)  # the seed mean
    assert found["ran"]["val_robust_gain"] == pytest.approx(-0.005)
    assert found["ran"]["val_robust_stopped"] is True
    assert "val_robust" not in found["lora"]  # a clean method logs none
    table = curves_md(list(found.values()))
    assert "| last val robust | val robust gain | stopped rising |" in table
    assert plot_curves(list(found.values()), tmp_path / "curves.png").is_file()
