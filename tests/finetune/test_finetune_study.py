"""`medshield study finetune`: cells, the aggregated table with CIs, plots, resume, bad config."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_support import write_study_config

from medshield.errors import ConfigError
from medshield.runs import Run
from medshield.studies.finetune import load_study_config, run_study_finetune


def test_study_runs_cells_aggregates_with_cis_plots_and_resumes(
    tmp_path: Path, data_dir: Path
) -> None:
    config = write_study_config(
        tmp_path,
        data_dir,
        methods=[
            {"method": "linear-probe"},
            {"method": "ran", "kwargs": {"rectifier": "linear", "rank": 4}},
        ],
        ran_ablations=["svd"],
        modalities=["chest_xray"],
        vqa_closed=False,
    )
    cfg = load_study_config(config)
    run = Run(tmp_path / "study", cfg)
    result = run_study_finetune(cfg, run, log=lambda _: None)
    table = {row["method"]: row for row in result["table"]}
    assert set(table) == {"linear-probe", "ran", "ran-no_svd"}
    for row in table.values():
        clean = row["clean_accuracy"]
        assert clean["n"] == 4 and clean["ci_low"] <= clean["value"] <= clean["ci_high"]
        assert "robust/pgd1@2" in row and "robust/worst@2" in row
        for task in ("retrieval_i2t", "retrieval_i2t_adv", "retrieval_t2i", "retrieval_t2i_adv"):
            recall = row[f"{task}/R@1"]
            assert recall["n"] == 4 and recall["ci_low"] <= recall["value"] <= recall["ci_high"]
    assert table["ran"]["flops_ratio"] == pytest.approx(1.0)  # folded linear rectifier
    assert table["ran"]["trainable_params"] < 10_000
    assert (tmp_path / "study" / "table.md").is_file() and (
        tmp_path / "study" / "table.csv"
    ).is_file()
    assert (tmp_path / "study" / "robust_vs_clean_base_eps2.png").stat().st_size > 1000
    assert (tmp_path / "study" / "retrieval_i2t_base.png").stat().st_size > 1000
    assert "retrieval_t2i_adv/R@1" in (tmp_path / "study" / "table.md").read_text()
    logs: list[str] = []
    again = run_study_finetune(cfg, Run(tmp_path / "study", cfg), log=logs.append)
    assert logs == [] and again["table"] == result["table"]

    bad = config.read_text().replace('"svd"', '"spectrum"')
    config.write_text(bad)
    with pytest.raises(ConfigError, match="unknown RAN terms"):
        load_study_config(config)
