"""Run directories: config pinning, sample rows surviving a crash, results metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medshield.config import load_config
from medshield.errors import ConfigError
from medshield.report.rundir import load_run
from medshield.runs import Run, read_samples


def test_reopening_with_the_same_config_keeps_rows(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=a"])
    Run(tmp_path, cfg).append_samples([{"i": 1}, {"i": 2}])
    assert Run(tmp_path, cfg).load_samples() == [{"i": 1}, {"i": 2}]


def test_a_different_config_is_refused_unless_overwriting(tmp_path: Path) -> None:
    Run(tmp_path, load_config(None, ["name=a"])).append_samples([{"i": 1}])
    (tmp_path / "checkpoints").mkdir()
    other = load_config(None, ["name=a", "seed=1"])
    with pytest.raises(ConfigError, match="different config"):
        Run(tmp_path, other)
    run = Run(tmp_path, other, overwrite=True)
    assert run.load_samples() == []
    assert not (tmp_path / "checkpoints").exists()  # an old checkpoint must not be resumed
    assert "seed: 1" in (tmp_path / "config.yaml").read_text()


def test_a_run_saved_before_a_field_existed_resumes_with_its_default(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=a"])
    Run(tmp_path, cfg).append_samples([{"i": 1}])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["seed"]  # as if the field was added after the run (the default seed is 0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert Run(tmp_path, cfg).load_samples() == [{"i": 1}]
    with pytest.raises(ConfigError, match="different config"):
        Run(tmp_path, load_config(None, ["name=a", "seed=1"]))  # the default is not seed 1
    saved["no_such_field"] = 1  # a field this version does not know: not the same run
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ConfigError, match="different config"):
        Run(tmp_path, cfg)


def test_a_torn_last_line_is_skipped_and_appending_continues_cleanly(tmp_path: Path) -> None:
    run = Run(tmp_path, load_config(None))
    run.append_samples([{"i": 1}])
    with run.samples_path.open("a") as f:
        f.write('{"i": 2, "trunc')  # the process died mid-write
    assert run.load_samples() == [{"i": 1}]
    run.append_samples([{"i": 3}])
    assert run.load_samples() == [{"i": 1}, {"i": 3}]


def test_runs_and_reports_read_the_same_rows_skipping_what_is_not_an_object(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, load_config(None))
    run.append_samples([{"i": 1}])
    with run.samples_path.open("ab") as f:
        f.write(b'[1, 2]\n"text"\n{"i": "\xff"\n{"i": 2}\n')  # hand-edited, a bad byte
    run.write_results({}, seed=0)
    assert read_samples(run.samples_path) == [{"i": 1}, {"i": 2}]
    assert run.load_samples() == load_run(tmp_path).samples == [{"i": 1}, {"i": 2}]
    assert read_samples(tmp_path / "absent.jsonl") == []


def test_results_carry_versions_seed_and_wall_time(tmp_path: Path) -> None:
    run = Run(tmp_path, load_config(None))
    out = run.write_results({"metric": 1.0}, seed=7)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == out
    assert on_disk["seed"] == 7 and on_disk["metric"] == 1.0
    assert on_disk["versions"]["torch"] != "not installed"
    assert on_disk["wall_time_s"] >= 0
