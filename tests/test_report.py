"""``medshield report``: one self-contained, escaped HTML file per run kind, the CLI command,
and the report hook that never costs a run its results."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from PIL import Image
from report_support import (
    SCRIPT,
    evaluate_results,
    finetune_results,
    finetune_run_results,
    noise_results,
    parse,
    redteam_config,
    redteam_run,
    write_run,
)
from typer.testing import CliRunner

from medshield.commands.cli import app
from medshield.errors import DataError
from medshield.report import render, render_report, report_after_run, write_report
from medshield.report.kinds import RENDERERS
from medshield.runs import RUN_KINDS

runner = CliRunner()


def assert_self_contained(html: str) -> None:
    """No URL leaves the page: every src/href is a data URI or an in-page anchor."""
    links = parse(html)
    assert all(u.startswith(("data:", "#")) for u in links.urls), links.urls
    assert not links.script_src and "link" not in links.tags
    assert not re.search(r"url\(\s*(?![\"']?data:)", html)
    assert "Content-Security-Policy" in html


@pytest.fixture(scope="module")
def redteam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return redteam_run(tmp_path_factory.mktemp("report"))


def test_redteam_report_escapes_collapses_and_browses(redteam: Path) -> None:
    rows = [json.loads(line) for line in (redteam / "samples.jsonl").read_text().splitlines()]
    results = json.loads((redteam / "results.json").read_text())["redteam"]
    html = render_report(redteam)
    assert_self_contained(html)
    # the model's <script> is text, never markup
    assert SCRIPT not in html and str(escape(SCRIPT)) in html
    assert len(re.findall(r"<script>", html)) == 1  # only the report's own filter script
    # the headline numbers with their intervals
    asr = results["metrics"]["by_attack"]["figstep"]["attack_success_rate"]
    assert f"{asr['value']:.2f} [{asr['ci_low']:.2f}, {asr['ci_high']:.2f}]" in html
    for heading in ("Per attack (95% CI)", "Attack success rate by judge", "Sample browser"):
        assert heading in html
    # ASR is harmful compliance, with the refusal, non-answer and not-refused rates beside it
    for column in (
        "<th>ASR</th>",
        "<th>refusal</th>",
        "<th>non-answer</th>",
        "<th>not refused</th>",
    ):
        assert column in html
    assert "judged harmful compliance" in html
    # harmful requests and answers only inside collapsed <details>; benign ones in the open
    blocks = re.findall(r"<details class=\"harmful\">.*?</details>", html, flags=re.S)
    harmful = [r for r in rows if r["kind"] == "harmful"]
    assert len(blocks) == len(harmful) and '<details class="harmful" open' not in html
    outside = re.sub(r"<details class=\"harmful\">.*?</details>", "", html, flags=re.S)
    for r in harmful:
        assert str(escape(r["request"])) not in outside
        assert any(str(escape(r["request"])) in b for b in blocks)
    benign = next(r for r in rows if r["kind"] == "benign")
    assert str(escape(benign["request"])) in outside
    # filters for attack, verdict, modality; one row per sample with its data attributes
    assert len(re.findall(r"<tr data-attack=", html)) == len(rows)
    for name in ("attack", "verdict", "modality"):
        assert f'<select data-filter="{name}">' in html
    assert "<option>figstep</option>" in html
    # the images each row's model received, inlined once per distinct set as thumbnails
    assert html.count('class="thumb t') == len(rows)
    sets = {tuple(r["image_files"]) for r in rows}
    figsteps = sum(r["attack"] == "figstep" for r in rows)
    assert len(sets) == len({r["image_ref"] for r in rows}) + figsteps  # clean ones + FigStep's
    assert len(re.findall(r"\.t\d+ \{ background-image", html)) == len(sets)
    assert parse(html).tags["img"] >= 2  # the plots


def thumbnail_of(html: str, item_id: str, attack: str) -> Image.Image:
    """The thumbnail the sample browser shows for one row, decoded."""
    row = re.search(
        rf'<tr data-attack="{attack}"[^>]*>\s*<td><span class="thumb (t\d+)"[^>]*></span></td>'
        rf"\s*<td class=\"meta\">.*?<code>{item_id}</code>",
        html,
        flags=re.S,
    )
    assert row, (item_id, attack)
    uri = re.search(rf'\.{row.group(1)} \{{ background-image: url\("([^"]+)"\)', html)
    assert uri
    data = base64.b64decode(uri.group(1).split(",", 1)[1])
    return Image.open(io.BytesIO(data)).convert("L")


def test_redteam_thumbnails_show_the_attacked_images_and_old_rows_the_clean_one(
    redteam: Path, tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in (redteam / "samples.jsonl").read_text().splitlines()]
    figstep = next(r for r in rows if r["attack"] == "figstep")
    html = render_report(redteam)
    # FigStep's row: the X-ray and the typography it was sent beside it, side by side
    attacked = thumbnail_of(html, figstep["id"], "figstep")
    clean = thumbnail_of(html, figstep["id"], "direct")
    assert clean.width == clean.height and attacked.width > 1.8 * attacked.height
    right = np.asarray(attacked)[:, attacked.width // 2 + 2 :]
    assert 200 < right.mean() < 250 and right.min() < 200  # white paper, black text

    # rows written before image_files: the clean benchmark image, found through the item id
    old = tmp_path / "old"
    shutil.copytree(redteam, old)
    shutil.rmtree(old / "images")
    (old / "samples.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "image_files"}) + "\n" for r in rows)
    )
    html = render_report(old)
    assert_self_contained(html)
    assert html.count('class="thumb t') == len(rows)
    assert len(re.findall(r"\.t\d+ \{ background-image", html)) == len({r["id"] for r in rows})
    before = thumbnail_of(html, figstep["id"], "figstep")
    assert before.size == clean.size and np.array_equal(np.asarray(before), np.asarray(clean))


def test_evaluate_report_has_headline_bars_curve_and_sanity(tmp_path: Path) -> None:
    results = evaluate_results()
    run = write_run(tmp_path / "eval", results)
    html = render_report(run)
    assert_self_contained(html)
    zs = results["evaluate"]["metrics"]["zero_shot"]["mean"]["accuracy"]
    assert f"{zs['value']:.3f} [{zs['ci_low']:.3f}, {zs['ci_high']:.3f}]" in html
    assert "0.750" in html and "0.500" in html  # per-modality accuracies
    assert "Attack sanity flags: 1 of 2 passed" in html and '<tr class="fail">' in html
    assert "chest_xray pgd@4" in html  # the flag's modality and attack group
    assert "Robust accuracy vs attack budget" in html and "VQA-RAD not found" in html
    assert parse(html).tags["img"] == 2  # per-modality bars, robust curve
    assert "name: tiny" in html  # the configuration


def test_noise_study_report(tmp_path: Path) -> None:
    html = render_report(write_run(tmp_path / "noise", noise_results()))
    assert_self_contained(html)
    assert "noise study" in html and "0.812 [0.800, 0.830]" in html
    assert "held out (transfer): breast_ultrasound" in html
    assert parse(html).tags["img"] == 1 and "vs share of adversarial upstream pairs" in html


def test_finetune_study_report(tmp_path: Path) -> None:
    html = render_report(write_run(tmp_path / "ft", finetune_results()))
    assert_self_contained(html)
    assert "0.762 [0.662, 0.862]" in html and "8,320" in html
    assert "zero-gradients(pgd1@2)" in html and '<tr class="fail">' in html
    assert parse(html).tags["img"] == 1 and "robust vs clean per method" in html


def test_finetune_study_report_shows_targets_and_ablation(tmp_path: Path) -> None:
    """The issue-20 report keys render as tables, not as a raw dump under "Other results"."""
    gap = {"value": 0.05, "ci_low": 0.02, "ci_high": 0.08, "n": 600}
    results = {
        **finetune_results(),
        "targets": [
            {"target": 2, "checkpoint": "base", "task": "chest_xray", "paired": True, **gap}
            | {"claim": "RAN robust @2/255 >= adv-lora + 0.03", "verdict": "REACHED"},
            {"target": 1, "checkpoint": "base", "task": "chest_xray", "claim": "tecoa >= 0.40"}
            | {"verdict": "NOT MEASURED", "note": "no cells of tecoa on chest_xray (base)"},
        ],
        "ablation": [
            {"checkpoint": "base", "task": "chest_xray", "ran": "ran", "ablated": "ran-no_svd"}
            | {"term": "svd", "delta_clean": gap}
        ],
        "task_tables": [],
        "curves": [],
        "ran_terms": None,
    }
    html = render_report(write_run(tmp_path / "ft", results))
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    assert "Other results" not in text and "Targets of issue 20" in text
    assert "RAN robust @2/255 &gt;= adv-lora + 0.03 0.050 [0.020, 0.080] REACHED" in text
    assert "NOT MEASURED no cells of tecoa on chest_xray (base)" in text
    assert "ran-no_svd 0.050 [0.020, 0.080]" in text and "curves.png" in text


@pytest.mark.parametrize("layout", ["finetune run", "study cell"])
def test_finetune_run_report(tmp_path: Path, layout: str) -> None:
    results = finetune_run_results()
    if layout == "finetune run":
        results = {"finetune": results}
    html = render_report(write_run(tmp_path / "ft", results))
    assert_self_contained(html)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    assert "kind fine-tuning run" in text and "Other results" not in text
    assert "204 training items (52 more held out for validation)" in text
    assert "329,728 trainable of 26,839,939 parameters" in text
    assert "weights after step 14 kept (best validation)" in text
    assert "0.840 [0.770, 0.910]" in text and "latency x1.152" in text
    assert "Sanity flags: 1 of 2 passed" in text and '<tr class="fail">' in html
    assert "epoch step lr loss val accuracy 1 7 0.0005 0.6132 0.8077 2 14 0.0005" in text


def test_defense_study_report(redteam: Path, tmp_path: Path) -> None:
    """From the defense study's own aggregation of cell results (all cells reuse one run)."""
    from medshield.commands.studies.defense import Cell, aggregate, decide_claims

    cell_results = json.loads((redteam / "results.json").read_text())
    cells = [
        Cell("undefended", "undefended", "none", k=0),
        Cell("baseline_self-reminder", "baseline", "self-reminder"),
        Cell("baseline_real", "baseline", "demonstrations-real-images", "mixed", 2),
        *(Cell(f"mixed_k{k}", "strategy", "demonstrations", "mixed", k) for k in (1, 2)),
    ]
    points = aggregate([(cell, cell_results) for cell in cells])
    results = {
        "model": "fake-report",
        "primary_judge": "keyword",
        "budgets": [0, 1, 2],
        "strategies": ["mixed"],
        "baselines": ["none", "self-reminder", "demonstrations-real-images"],
        "cells": points,
        "claims": decide_claims(points, {}, ["mixed"]),
    }
    html = render_report(write_run(tmp_path / "defense", results))
    assert_self_contained(html)
    asr = points[0]["overall"]["attack_success_rate"]
    assert "defense study" in html and "baseline_self-reminder" in html
    assert f"{asr['value']:.2f} [{asr['ci_low']:.2f}, {asr['ci_high']:.2f}]" in html
    assert "demonstrations cut attack success" in html
    assert parse(html).tags["img"] == 1 and "vs demonstration budget" in html


def test_unknown_kind_renders_config_and_numbers(tmp_path: Path) -> None:
    results = {"thing": {"score": 0.4567, "m": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}}}
    html = render_report(write_run(tmp_path / "odd", results))
    assert_self_contained(html)
    assert "unknown (generic table)" in html and "name: tiny" in html
    assert "thing.score" in html and "0.457" in html and "0.500 [0.400, 0.600]" in html


def test_the_kind_picks_the_renderers_and_old_runs_fall_back_to_the_shape(tmp_path: Path) -> None:
    assert set(RENDERERS) == set(RUN_KINDS)

    def kind_row(results: dict) -> str:
        html = render_report(write_run(tmp_path / str(len(list(tmp_path.iterdir()))), results))
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
        return re.search(r"kind (.*?) seed", text).group(1).strip()

    both = {**noise_results(), **evaluate_results()}  # the shape of two kinds at once
    assert kind_row(both) == "evaluate, noise study"  # no kind: a run written before kinds
    assert kind_row({"kind": "study-noise", **both}) == "noise study"
    assert kind_row({"kind": "evaluate", **both}) == "evaluate"
    assert kind_row({"kind": "craft-noise", **noise_results()}) == "craft-noise (generic table)"
    assert kind_row({"kind": "from-a-newer-version", **both}) == (
        "from-a-newer-version (generic table)"
    )


def test_cli_writes_the_report_and_reports_its_size(redteam: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "rt.html"
    result = runner.invoke(app, ["report", str(redteam), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "KiB" in result.output and "rt.html" in result.output
    assert write_report(redteam) == redteam / "report.html"


def test_directory_without_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no results.json"):
        render_report(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path)])
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2
    assert "has no results.json" in output and "Traceback" not in output


def test_a_report_that_fails_only_warns_and_keeps_the_results(tmp_path: Path) -> None:
    run = write_run(tmp_path / "bad", {"evaluate": {"metrics": {"zero_shot": "garbage"}}})
    logs: list[str] = []
    assert report_after_run(run, log=logs.append) is None
    assert logs and logs[0].startswith("warning: could not write the report")
    assert (run / "results.json").is_file() and not (run / "report.html").exists()


def test_runs_write_their_report_and_a_failed_report_keeps_the_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "rt.yaml"
    config.write_text(json.dumps(redteam_config(tmp_path)))
    first = runner.invoke(app, ["redteam", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "rt" / "report.html").is_file() and "report.html" in first.output
    assert json.loads((tmp_path / "rt" / "results.json").read_text())["kind"] == "redteam"
    # the report is written when the run finishes; its line still closes the output
    assert first.output.rstrip().splitlines()[-1].startswith("report: ")

    def broken(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("matplotlib [exploded]")

    monkeypatch.setattr(render, "write_report", broken)
    (tmp_path / "rt" / "report.html").unlink()
    again = runner.invoke(app, ["redteam", "--config", str(config)])  # resumes: nothing to run
    assert again.exit_code == 0, again.output
    assert "warning: could not write the report" in again.output
    assert "matplotlib [exploded]" in again.output  # printed as text, not as rich markup
    assert (tmp_path / "rt" / "results.json").is_file()


def test_browser_inlines_image_paths_and_shows_the_id_of_missing_ones(tmp_path: Path) -> None:
    run = tmp_path / "paths"
    run.mkdir()
    Image.new("L", (28, 28), 128).save(run / "xray.png")
    base = {"kind": "benign", "attack": "direct", "modality": "chest_xray", "verdict": "refusal"}
    rows = [
        {**base, "id": "b-1", "image": "xray.png", "prompt": "Is it normal?", "response": "No."},
        {**base, "id": "b-2", "image": "gone.png", "prompt": "And this?", "response": "Yes."},
    ]
    results = {"redteam": {"metrics": {"overall": {}}, "n_items": {"harmful": 0, "benign": 2}}}
    html = render_report(write_run(run, results, rows))
    assert_self_contained(html)
    assert html.count('class="thumb t0"') == 1 and '<span class="noimg">b-2</span>' in html
    assert "1 image not found (ids shown instead)" in html


def test_scatter_has_a_legend_entry_per_method_and_per_task_not_per_point() -> None:
    from medshield.report import plots

    methods, tasks = ["lora", "adapter", "ran"], ["chest_xray", "fundus", "vqa_rad_closed"]
    points = [
        (m, t, (0.5 + 0.1 * i, 0.4, 0.6), (0.1 * j, 0.0, 0.2))
        for i, m in enumerate(methods)
        for j, t in enumerate(tasks)
    ]
    fig = plots.scatter_figure(points, "clean", "robust", "title")
    ax = fig.axes[0]
    legends = [a for a in ax.get_children() if type(a).__name__ == "Legend"]
    labels = sorted(tuple(t.get_text() for t in legend.get_texts()) for legend in legends)
    assert labels == sorted([tuple(methods), tuple(tasks)])
    data = [line for line in ax.get_lines() if line.get_marker() not in ("None", "_", "|")]
    assert len(data) == 9  # error-bar caps and the diagonal left out
    assert len({line.get_marker() for line in data}) == 3  # one shape per task
    assert len({line.get_color() for line in data}) == 3  # one colour per method
    one_task = plots.scatter_figure(points[:1], "clean", "robust", "title")
    assert len([a for a in one_task.axes[0].get_children() if type(a).__name__ == "Legend"]) == 1
    assert plots.scatter(points, "clean", "robust", "title").src.startswith("data:image/png")
