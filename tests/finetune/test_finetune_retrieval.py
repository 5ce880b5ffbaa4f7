"""Retrieval after fine-tuning: the fine-tuned encoder (RAN's rectifier included) is evaluated
clean and under the multimodal attack, with CIs, a sanity flag and a switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_support import FAST, TINY_EVAL, run_config, run_method

from medshield.commands.finetune import recall_indicators, retrieval_flags, run_finetune
from medshield.commands.finetune.config import FineTuneRunConfig
from medshield.errors import InputError
from medshield.eval.metrics import RECALL_KS
from medshield.models.mini_clip import MiniClip
from medshield.runs import Run
from medshield.train.finetune.classifier import RectifiedEncoder, adapted_encoder
from medshield.train.finetune.data import TrainData


def test_adapted_encoder_is_the_classifier_image_path(base: MiniClip, train: TrainData) -> None:
    _, result = run_method(
        base,
        train,
        "ran",
        kwargs={"placement": "head", "rectifier": "mlp", "hidden": 8, "pgd_steps": 1},
        lr=1e-2,
    )
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
        finetune={
            **FAST,
            "method": "ran",
            "kwargs": {"placement": "head", "rectifier": "mlp", "hidden": 8, "pgd_steps": 1},
        },
        robust={**TINY_EVAL, "attacks": [{"name": "pgd", "steps": 1}], **robust},
    )


def test_finetune_run_reports_retrieval_clean_and_under_attack(
    tmp_path: Path, data_dir: Path
) -> None:
    attack = {"eps": 16, "alpha": 4, "steps": 8, "max_edits": 2}
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


def retrieval_hits(clean: list[int], adv: list[int]) -> dict[str, list[bool]]:
    """Hand-made text-to-image rows of one run (a rank per query, clean and attacked), as
    :func:`recall_indicators` turns them into hits."""
    return recall_indicators(
        [
            {"group": group, "task": task, "index": i, "rank": rank}
            for group, task, ranks in [
                ("retrieval", "retrieval_t2i", clean),
                ("retrieval_adv", "retrieval_t2i_adv", adv),
            ]
            for i, rank in enumerate(ranks)
        ]
    )


def test_the_retrieval_flag_is_a_paired_test_not_a_raw_comparison() -> None:
    # 30 queries; the attack moves 2 into rank 1 and 1 out: R@1 rises 0.30 -> 0.33, by chance
    clean = [0] * 9 + [1, 1] + [3] * 19
    noisy = [1] + [0] * 8 + [0, 0] + [3] * 19
    (flag,) = retrieval_flags(retrieval_hits(clean, noisy))
    assert flag["group"] == "retrieval_t2i" and flag["passed"]
    assert "moved 2 of 30 queries into rank 1 and 1 out" in flag["detail"]
    assert "clean 0.3000, attacked 0.3333" in flag["detail"]
    # the attack moves 8 queries into rank 1 and none out: it does not optimise
    helping = [0] * 9 + [0] * 8 + [3] * 13
    (flag,) = retrieval_flags(retrieval_hits(clean[:9] + [2] * 8 + [3] * 13, helping))
    assert not flag["passed"] and "8 of 30" in flag["detail"]
    # an attack that only lowers R@1 passes
    (flag,) = retrieval_flags(retrieval_hits(clean, [5] * 30))
    assert flag["passed"] and "p=1" in flag["detail"]
