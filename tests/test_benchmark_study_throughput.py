"""benchmarks/study_throughput.py runs each code path's own CLI module (it moved after the old
ref, which once made the old path fail at its first call)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "study_throughput", REPO / "benchmarks/study_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_source_tree_gets_its_own_cli_module(tmp_path: Path) -> None:
    bench = load_benchmark()
    assert bench.cli_module(REPO / "src") == "medshield.commands.cli"
    (tmp_path / "medshield").mkdir()
    (tmp_path / "medshield" / "cli.py").write_text("")
    assert bench.cli_module(tmp_path) == "medshield.cli"  # the layout of the old ref


def test_metrics_are_compared_under_the_old_paths_names() -> None:
    bench = load_benchmark()
    before_issue_24 = {"robust_accuracy/pgd10@2": 0.5, "robust_accuracy/apgd-ce@2": 0.4}
    assert bench.old_name("robust_accuracy/pgd@2", before_issue_24) == "robust_accuracy/pgd10@2"
    apgd = "robust_accuracy/apgd-ce@2"
    assert bench.old_name(apgd, before_issue_24) == apgd
    after = {"robust_accuracy/pgd@2": 0.5}
    assert bench.old_name("robust_accuracy/pgd@2", after) == "robust_accuracy/pgd@2"


def test_each_source_tree_gets_the_attack_config_it_reads(tmp_path: Path) -> None:
    bench = load_benchmark()
    assert bench.attack_form(REPO / "src") == "new"
    (tmp_path / "medshield").mkdir()
    (tmp_path / "medshield" / "config.py").write_text("pgd_steps: list[int] = [10]\n")
    assert bench.attack_form(tmp_path) == "old"  # before issue 24's attack lists
