"""Run directories: config pinning, sample rows surviving a crash, results metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from medshield.config import load_config
from medshield.errors import ConfigError, DataError, NothingMeasured
from medshield.report.rundir import load_run
from medshield.runs import Run, check_measured, has_results, read_results, read_samples


def test_reopening_with_the_same_config_keeps_rows(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=a"])
    Run(tmp_path, cfg).append_samples([{"i": 1}, {"i": 2}])
    assert Run(tmp_path, cfg).load_samples() == [{"i": 1}, {"i": 2}]


def test_complete_groups_drops_a_group_a_crash_cut_short_and_keeps_ungrouped_rows(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, load_config(None, ["name=a"]))
    whole = [{"group": "a", "n_group": 2, "i": i} for i in range(2)]
    torn = [{"group": "b", "n_group": 3, "i": 0}]
    run.append_samples([{"epoch": 1}, *whole, *torn])
    assert run.complete_groups() == {"a"}
    assert run.load_samples() == [{"epoch": 1}, *whole]
    assert run.complete_groups() == {"a"}  # nothing more to drop


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
    run.finish({}, kind="evaluate", seed=0)
    assert read_samples(run.samples_path) == [{"i": 1}, {"i": 2}]
    assert run.load_samples() == load_run(tmp_path).samples == [{"i": 1}, {"i": 2}]
    assert read_samples(tmp_path / "absent.jsonl") == []


def test_results_carry_kind_versions_seed_and_wall_time(tmp_path: Path) -> None:
    run = Run(tmp_path, load_config(None))
    assert not run.finished and not has_results(tmp_path)
    out = run.finish({"metric": 1.0}, kind="evaluate", seed=7)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == out == read_results(tmp_path)
    assert run.finished and has_results(tmp_path)
    assert list(on_disk)[:2] == ["kind", "metric"] and on_disk["kind"] == "evaluate"
    assert on_disk["seed"] == 7 and on_disk["metric"] == 1.0
    assert on_disk["versions"]["torch"] != "not installed"
    assert on_disk["wall_time_s"] >= 0


def test_results_json_is_strict_json(tmp_path: Path) -> None:
    run = Run(tmp_path, load_config(None))
    nan, inf = float("nan"), float("inf")
    results = {"loss": nan, "nested": {"x": [1.5, -inf, inf]}, "n": 3}
    out = run.finish(results, kind="evaluate", seed=0)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def strict(token: str) -> None:
        raise ValueError(token)

    on_disk = json.loads(text, parse_constant=strict)  # strict JSON parses without constants
    assert on_disk == out
    assert on_disk["loss"] is None and on_disk["nested"] == {"x": [1.5, None, None]}
    assert on_disk["n"] == 3


def test_finish_writes_the_results_before_the_report_and_refuses_an_unknown_kind(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, load_config(None))
    seen: list[dict] = []
    run.finish(
        {"metric": 1.0}, kind="pretrain", seed=0, report=lambda p: seen.append(read_results(p))
    )
    assert [r["kind"] for r in seen] == ["pretrain"]  # the hook read the finished results
    with pytest.raises(ConfigError, match="unknown run kind 'pretraining'"):
        run.finish({}, kind="pretraining", seed=0)  # type: ignore[arg-type]
    assert read_results(tmp_path)["kind"] == "pretrain"  # the refused call wrote nothing


def test_read_results_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory"):
        read_results(tmp_path / "absent")
    with pytest.raises(DataError, match="has no results.json"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("[1]")
    with pytest.raises(DataError, match="holds a list, not a JSON object"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_results(tmp_path)


def _unrelated(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return folder


def _intact(folder: Path) -> bool:
    return (folder / "notes.txt").read_text() == "precious" and (
        folder / "sub" / "data.bin"
    ).read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_never_used_or_deleted(
    tmp_path: Path, overwrite: bool
) -> None:
    folder = _unrelated(tmp_path / "mine")
    with pytest.raises(ConfigError, match="not a medshield run.*nothing was written or deleted"):
        Run(folder, load_config(None), overwrite=overwrite)
    assert _intact(folder) and not (folder / "config.yaml").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    Run(empty, load_config(None), overwrite=overwrite)  # an empty folder is fine to use
    assert (empty / "config.yaml").is_file()


def test_overwrite_refuses_links_and_folders_above_the_output_dir(tmp_path: Path) -> None:
    outputs = tmp_path / "runs"
    sibling = outputs / "other"
    Run(sibling, load_config(None, ["name=other"])).append_samples([{"i": 1}])
    (outputs / "up").symlink_to(tmp_path)
    (outputs / "here").symlink_to(outputs)
    (outputs / "link").symlink_to(sibling)
    for name, message in [("up", "symbolic link"), ("here", "symbolic link"), ("link", "link")]:
        with pytest.raises(ConfigError, match=message):
            Run(outputs / name, load_config(None, [f"name={name}"]), overwrite=True)
    assert Run(sibling, load_config(None, ["name=other"])).load_samples() == [{"i": 1}]


def test_a_run_folder_resolving_to_its_parent_is_refused(tmp_path: Path) -> None:
    Run(tmp_path / "a", load_config(None, ["name=a"]))
    with pytest.raises(ConfigError, match="output folder itself or one above it"):
        Run(tmp_path / "a" / "b" / "..", load_config(None), overwrite=True)
    assert (tmp_path / "a" / "config.yaml").is_file()


def test_an_output_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file")
    with pytest.raises(ConfigError, match=rf"{blocker}.*output_dir"):
        Run(blocker / "run", load_config(None))
    with pytest.raises(ConfigError, match="is a file"):
        Run(blocker, load_config(None))
    assert blocker.read_text() == "a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_dir_is_a_config_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=rf"Permission denied.*{locked}.*output_dir"):
            Run(locked / "run", load_config(None))
    finally:
        locked.chmod(0o700)


def test_check_measured_raises_when_everything_failed_and_logs_a_partial_run() -> None:
    logs: list[str] = []
    check_measured("groups", 3, {}, "fix it", logs.append)
    assert logs == []
    check_measured("groups", 3, {"file a missing": 1, "file b corrupt": 1}, "fix it", logs.append)
    assert logs == [
        "2 of 3 groups skipped or failed; first reason: file a missing "
        "(and 1 other reasons, in the log above)"
    ]
    with pytest.raises(NothingMeasured, match="all 2 groups.*file a missing.*; fix it") as err:
        check_measured("groups", 2, {"file a missing": 2}, "fix it", logs.append)
    assert err.value.exit_code == 1
    with pytest.raises(NothingMeasured, match="all 0 groups"):
        check_measured("groups", 0, {}, "fix it", logs.append)


def test_a_folder_the_run_may_not_create_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an unwritable output_dir gives it, also where the tests run as root."""

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(ConfigError, match=rf"Permission denied \({tmp_path / 'run'}\).*output_dir"):
        Run(tmp_path / "run", load_config(None))
