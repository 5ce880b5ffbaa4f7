"""The VQA-RAD closed task: yes/no classifiers with per-question class prompts, trained by every
method through the same loop, saved and loaded, and run through the study as a task."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from finetune_support import FAST, TINY_EVAL, run_method, write_study_config

from medshield.commands.studies.finetune import load_study_config, run_study_finetune
from medshield.errors import DataError, InputError
from medshield.models.mini_clip import MiniClip
from medshield.runs import Run
from medshield.train.finetune import FineTunedClassifier, load_finetuned, save_finetuned
from medshield.train.finetune.config import FineTuneConfig
from medshield.train.finetune.data import VQA_TASK, TrainData
from medshield.train.finetune.method import method_for


def test_vqa_items_carry_questions_and_start_from_zero_shot_answers(
    base: MiniClip, vqa_train: TrainData, train: TrainData
) -> None:
    assert vqa_train.modality == VQA_TASK and vqa_train.labels.tolist().count(1) == 4
    assert len(vqa_train.questions or []) == len(vqa_train.ids) == len(vqa_train.images) == 8
    assert vqa_train.images.shape[1:] == (1, 64, 64)
    clf = method_for(FineTuneConfig(method="linear-probe", **FAST)).build(
        copy.deepcopy(base), vqa_train.class_prompts
    )
    questions, x = vqa_train.questions[:3], vqa_train.images[:3]
    clf.set_questions(questions)
    with torch.no_grad():
        logits = clf.eval()(x)
        answers = base.encode_text([f"{q} {a}" for q in questions for a in ("no", "yes")])
        expected = base.logit_scale.exp() * torch.einsum(
            "nd,nkd->nk", base.encode_image(x), F.normalize(answers, dim=-1).view(3, 2, -1)
        )
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="questions"):
        clf(vqa_train.images[:2])  # 3 questions set, 2 images
    fresh = FineTunedClassifier(base, vqa_train.class_prompts)
    with pytest.raises(InputError, match="set_questions"):
        fresh(x)
    with pytest.raises(InputError, match="placeholder"):
        FineTunedClassifier(base, train.class_prompts).set_questions(questions)
    with pytest.raises(InputError, match="every class prompt"):
        FineTunedClassifier(base, [["{question} yes"], ["no"]])


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("ran", {"placement": "head", "rectifier": "mlp", "hidden": 8}), ("lora", {"rank": 2})],
)
def test_vqa_methods_train_and_round_trip(
    base: MiniClip, vqa_train: TrainData, tmp_path: Path, method: str, kwargs: dict
) -> None:
    _, result = run_method(base, vqa_train, method, kwargs=kwargs, lr=1e-2)
    clf = result.classifier
    assert clf.conditioned and result.report["history"][0]["loss"] > 0
    assert result.report["overhead"]["flops_ratio"] < 1.02
    save_finetuned(result, tmp_path / method)
    loaded, meta = load_finetuned(tmp_path / method, model=copy.deepcopy(base))
    assert meta["modality"] == VQA_TASK
    x, questions = vqa_train.images[:4], vqa_train.questions[:4]
    for c in (clf, loaded):
        c.set_questions(questions)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clf(x))


def test_study_runs_the_vqa_task_for_ran_lora_and_a_baseline(
    tmp_path: Path, data_dir: Path
) -> None:
    config = write_study_config(
        tmp_path,
        data_dir,
        methods=[
            {"method": "tecoa"},
            {"method": "lora", "kwargs": {"rank": 2}},
            {"method": "ran", "kwargs": {"placement": "head", "rectifier": "mlp", "hidden": 8}},
        ],
        modalities=[],
        vqa_closed=True,
        robust={**TINY_EVAL, "attacks": [{"name": "pgd", "steps": 1}], "batch_size": 3},
    )
    cfg = load_study_config(config)
    result = run_study_finetune(cfg, Run(tmp_path / "study", cfg), log=lambda _: None)
    assert result["modalities"] == [VQA_TASK]
    table = {row["method"]: row for row in result["table"]}
    assert set(table) == {"tecoa", "lora", "ran"}
    for row in table.values():
        assert row["modality"] == VQA_TASK
        clean, robust = row["clean_accuracy"], row["robust/worst@2"]
        assert clean["n"] == 4 and clean["ci_low"] <= clean["value"] <= clean["ci_high"]
        assert robust["n"] == 4 and robust["value"] <= clean["value"]
        assert not [k for k in row if k.startswith("retrieval")]  # no captions to retrieve
    assert VQA_TASK in (tmp_path / "study" / "table.md").read_text()
    assert (tmp_path / "study" / "robust_vs_clean_base_eps2.png").is_file()
    cell = tmp_path / "study" / "cells" / f"base__ran__{VQA_TASK}__seed0" / "results.json"
    sanity = json.loads(cell.read_text())["sanity"]
    assert any(f["name"] == "uses image" for f in sanity)
    rows = [json.loads(line) for line in (cell.parent / "samples.jsonl").read_text().splitlines()]
    by_group = {g: [r for r in rows if r.get("group") == g] for g in ("clean", "shuffled")}
    assert len(by_group["shuffled"]) == 4  # each question kept, shown another question's image
    assert [r["index"] for r in by_group["shuffled"]] == [r["index"] for r in by_group["clean"]]
    zero_grad = next(f for f in sanity if f["name"] == "zero-gradients")
    counted = int(zero_grad["detail"].split(" of ")[1].split(" correctly classified")[0])
    assert zero_grad["group"] == "inputs" and 0 <= counted <= 4  # of the 4 questions
    # 4 questions attacked in batches of 3, each question's row tagged with attack and budget
    attacked = [r for r in rows if r.get("group") == "pgd@2"]
    assert sorted(r["index"] for r in attacked) == [0, 1, 2, 3]
    assert {(r["attack"], r["eps"], r["restart"]) for r in attacked} == {("pgd", 2.0, 0)}


def test_study_without_vqa_rad_fails_before_any_cell(tmp_path: Path) -> None:
    cfg = load_study_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"data_dir={tmp_path / 'empty'}",
            "modalities=[chest_xray]",
            "seeds=[0]",
        ],
    )
    with pytest.raises(DataError, match="VQA-RAD"):
        run_study_finetune(cfg, Run(tmp_path / "study", cfg), log=lambda _: None)
    assert not (tmp_path / "study" / "cells").exists()
