"""Retrieval after fine-tuning: the fine-tuned encoder (RAN's rectifier included) is evaluated
clean and under the multimodal attack, with CIs, a sanity flag and a switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_support import FAST, TINY_EVAL, run_config, run_method

from medshield.errors import InputError
from medshield.eval.metrics import RECALL_KS
from medshield.models.mini_clip import MiniClip
from medshield.runs import Run
from medshield.train.finetune.common import RectifiedEncoder, TrainData, adapted_encoder
from medshield.train.finetune.workflow import FineTuneRunConfig, run_finetune


def test_adapted_encoder_is_the_classifier_image_path(base: MiniClip, train: TrainData) -> None:
    _, result = run_method(base, train, "ran", kwargs={"rectifier": "mlp", "hidden": 8}, lr=1e-2)
    clf = result.classifier
    encoder = adapted_encoder(clf)
    assert isinstance(encoder, RectifiedEncoder)
    x = train.images[:3]
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(x), clf.image_embeddings(x))
        assert not torch.allclose(encoder.encode_image(x), base.encode_image(x))
        torch.testing.assert_close(encoder.encode_text(["a"]), base.encode_text(["a"]))
    probe_model, probe = run_method(base, train, "linear-probe")
    assert adapted_encoder(probe.classifier) is probe_model  # no rectifier: the model itself
    with pytest.raises(InputError, match="FineTunedClassifier"):
        adapted_encoder(torch.nn.Identity())


def _config(tmp_path: Path, data_dir: Path, name: str, **robust: Any) -> FineTuneRunConfig:
    return run_config(
        tmp_path,
        data_dir,
        name=name,
        finetune={**FAST, "method": "ran", "kwargs": {"rectifier": "mlp", "hidden": 8}},
        robust={**TINY_EVAL, "pgd_steps": [1], "apgd": False, **robust},
    )


def test_finetune_run_reports_retrieval_clean_and_under_attack(
    tmp_path: Path, data_dir: Path
) -> None:
    attack = {"eps": 16, "alpha": 4, "steps": 3, "max_edits": 1}
    cfg = _config(
        tmp_path, data_dir, "ft", retrieval_per_class_cap=3, retrieval_attack_kwargs=attack
    )
    run = Run(tmp_path / "ft", cfg)
    result = run_finetune(cfg, run, log=lambda _: None)
    m = result["metrics"]
    for direction in ("i2t", "t2i"):
        for k in RECALL_KS:
            for task in (f"retrieval_{direction}", f"retrieval_{direction}_adv"):
                metric = m[f"{task}/R@{k}"]
                assert metric["n"] == 6  # 2 classes x 3 images
                assert metric["ci_low"] <= metric["value"] <= metric["ci_high"]
        assert (
            m[f"retrieval_{direction}_adv/R@1"]["value"] <= m[f"retrieval_{direction}/R@1"]["value"]
        )
    rows = run.load_samples()
    ranks = {
        task: sum(r["rank"] for r in rows if r.get("task") == task)
        for task in ("retrieval_i2t", "retrieval_i2t_adv")
    }
    assert ranks["retrieval_i2t_adv"] >= ranks["retrieval_i2t"]
    flags = [f for f in result["sanity"] if f["name"] == "retrieval adv<=clean"]
    assert [f["group"] for f in flags] == ["retrieval_i2t", "retrieval_t2i"]
    assert all(f["passed"] for f in flags)

    off = _config(tmp_path, data_dir, "ft-off", retrieval=False)
    result = run_finetune(off, Run(tmp_path / "ft-off", off), log=lambda _: None)
    assert not [k for k in result["metrics"] if k.startswith("retrieval")]
