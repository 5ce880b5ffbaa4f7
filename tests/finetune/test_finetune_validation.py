"""A validation split held out of the training items: scored after every epoch, and with
``keep_best`` the epoch of highest validation accuracy is the one kept."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from finetune_support import run_method

from medshield.errors import DataError
from medshield.models.mini_clip import MiniClip
from medshield.train.finetune.data import (
    TrainData,
    load_train_data,
    predict_classes,
    split_validation,
)


@pytest.fixture(scope="module")
def train24(data_dir: Path) -> TrainData:
    return load_train_data("chest_xray", 24, seed=0, data_dir=data_dir)


def _accuracy(classifier: torch.nn.Module, items: TrainData) -> float:
    pred = predict_classes(classifier, items, items.images, 8)
    return float((pred == items.labels).float().mean())


def test_split_is_stratified_disjoint_and_keeps_ids_and_questions(
    train24: TrainData, vqa_train: TrainData
) -> None:
    fit, val = split_validation(train24, 0.25, seed=0)
    assert len(fit.images) == 18 and len(val.images) == 6
    assert Counter(val.labels.tolist()) == {0: 3, 1: 3}  # chest X-ray: 12 per class
    assert sorted(fit.ids + val.ids) == sorted(train24.ids) and not set(fit.ids) & set(val.ids)
    row = {i: n for n, i in enumerate(train24.ids)}
    for part in (fit, val):
        assert torch.equal(part.images, train24.images[[row[i] for i in part.ids]])
    assert split_validation(train24, 0.25, seed=0)[1].ids == val.ids
    assert split_validation(train24, 0.25, seed=1)[1].ids != val.ids

    vfit, vval = split_validation(vqa_train, 0.25, seed=0)
    questions = dict(zip(vqa_train.ids, vqa_train.questions or [], strict=True))
    assert vval.questions == [questions[i] for i in vval.ids]
    assert len(vfit.questions or []) == len(vfit.images)


def test_a_validation_set_too_small_for_the_classes_is_a_data_error(train: TrainData) -> None:
    with pytest.raises(DataError, match="validation set stratified by class"):
        split_validation(train, 0.1, seed=0)  # 8 items: 0.8 of an item for 2 classes


def test_each_epoch_is_scored_on_the_held_out_items(
    base: MiniClip, train24: TrainData, vqa_train: TrainData
) -> None:
    # full fine-tuning has a live head: the score must use the current text tower's classes
    for method, items in (("full", train24), ("linear-probe", vqa_train)):
        _, result = run_method(
            base, items, method, epochs=3, max_train_items=None, val_fraction=0.25, lr=1e-3
        )
        report = result.report
        assert report["train_items"] + report["val_items"] == len(items.images)
        history = report["history"]
        assert [h["epoch"] for h in history] == [0, 1, 2]
        assert all(0 <= h["val_accuracy"] <= 1 for h in history)
        _, val = split_validation(items, 0.25, seed=0)
        assert _accuracy(result.classifier, val) == pytest.approx(history[-1]["val_accuracy"])
        assert "best_step" not in report


def test_keep_best_ends_with_the_best_entrys_weights(base: MiniClip, train24: TrainData) -> None:
    settings = {"max_train_items": None, "val_fraction": 0.25, "lr": 0.5}  # a lr that overshoots
    _, best = run_method(base, train24, "linear-probe", epochs=6, keep_best=True, **settings)
    scores = [h["val_accuracy"] for h in best.report["history"]]
    epoch = scores.index(max(scores))
    assert best.report["best_step"] == best.report["history"][epoch]["step"]
    _, val = split_validation(train24, 0.25, seed=0)
    assert _accuracy(best.classifier, val) == pytest.approx(max(scores))
    # the same training stopped after that epoch has the same weights
    _, stopped = run_method(base, train24, "linear-probe", epochs=epoch + 1, **settings)
    kept, reference = best.classifier.state_dict(), stopped.classifier.state_dict()
    assert all(torch.equal(kept[k], reference[k]) for k in reference)
