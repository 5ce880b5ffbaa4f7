"""A downstream task's items as tensors (:class:`TrainData`): a modality's MedMNIST split or
:data:`VQA_TASK`, the closed VQA-RAD questions answered "yes" or "no" (:func:`load_train_data`;
the few closed questions with another answer are left out), the validation split, and
predictions over them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medshield import data
from medshield.errors import DataError
from medshield.eval.features import classify_images
from medshield.eval.zero_shot import balanced_subset
from medshield.train.finetune.classifier import QUESTION_FIELD, FineTunedClassifier

VQA_TASK = "vqa_rad_closed"
VQA_ANSWERS = ("no", "yes")
VQA_CLASS_PROMPTS = [[f"{QUESTION_FIELD} {answer}"] for answer in VQA_ANSWERS]
VQA_IMAGE_SIZE = 64  # side VQA-RAD images are loaded at, as in medshield.eval.vqa


@dataclass
class TrainData:
    """One split of a downstream task (a modality, or :data:`VQA_TASK`), as tensors.

    Attributes:
        images: [0, 1] NCHW images.
        labels: (N,) class indices.
        modality: the task's name.
        class_prompts: per class, its prompts (with ``{question}`` for VQA).
        questions: one question per item (VQA), else None.
        ids: each item's row in its split (the question id for VQA).
    """

    images: torch.Tensor
    labels: torch.Tensor
    modality: str
    class_prompts: list[list[str]]
    questions: list[str] | None = None
    ids: list[int] = field(default_factory=list)


def task_name(name: str) -> str:
    """The canonical name of a downstream task: :data:`VQA_TASK` or a modality's name."""
    return VQA_TASK if name == VQA_TASK else data.get_modality(name).name


def task_prompts(name: str) -> list[list[str]]:
    """The class prompts of a downstream task (see :func:`task_name`)."""
    if name == VQA_TASK:
        return [list(prompts) for prompts in VQA_CLASS_PROMPTS]
    return data.get_modality(name).prompts()


def load_train_data(
    modality: str,
    max_items: int | None,
    seed: int,
    data_dir: str | Path | None = None,
    split: str = "train",
    exclude: Collection[int] = (),
) -> TrainData:
    """A class-balanced subsample of about ``max_items`` items of one task's split, drawn from
    the items whose id (:attr:`TrainData.ids`: the row, or the VQA question id) is not in
    ``exclude``.

    ``modality`` is a modality (its MedMNIST split) or :data:`VQA_TASK` (the closed VQA-RAD
    questions whose answer is "yes" or "no", images loaded at :data:`VQA_IMAGE_SIZE`).
    """
    if modality != VQA_TASK:
        samples = data.load_split(modality, split, data_dir)
        mod = samples.modality
        pool = np.setdiff1d(np.arange(len(samples.labels)), np.asarray(list(exclude), dtype=int))
        idx = pool[balanced_subset(samples.labels[pool], mod.num_classes, max_items, seed)]
        labels = torch.as_tensor(samples.labels[idx], dtype=torch.long)
        return TrainData(samples.tensor(idx), labels, mod.name, mod.prompts(), ids=idx.tolist())
    excluded = set(exclude)
    items = [
        item
        for item in data.load_vqa_rad(split, data_dir, answer_type="closed")
        if item.answer in VQA_ANSWERS and item.qid not in excluded
    ]
    if not items:
        raise DataError(f"VQA-RAD has no closed yes/no questions in its {split} split")
    answers = np.array([VQA_ANSWERS.index(item.answer) for item in items])
    chosen = [items[i] for i in balanced_subset(answers, len(VQA_ANSWERS), max_items, seed)]
    return TrainData(
        torch.stack([data.load_vqa_image(item.image_path, VQA_IMAGE_SIZE) for item in chosen]),
        torch.tensor([VQA_ANSWERS.index(item.answer) for item in chosen]),
        VQA_TASK,
        task_prompts(VQA_TASK),
        questions=[item.question for item in chosen],
        ids=[item.qid for item in chosen],
    )


def split_validation(train: TrainData, fraction: float, seed: int) -> tuple[TrainData, TrainData]:
    """``train`` split into (fit, validation) with ``fraction`` of the items, stratified by
    class, in the validation part (scikit-learn's ``train_test_split``).

    Raises:
        DataError: a class too small to appear in both parts, or a validation part smaller
            than the number of classes.
    """
    from sklearn.model_selection import train_test_split

    try:
        fit, val = train_test_split(
            np.arange(len(train.labels)),
            test_size=fraction,
            random_state=seed,
            stratify=train.labels.numpy(),
        )
    except ValueError as exc:
        raise DataError(
            f"cannot hold out {fraction:g} of the {len(train.labels)} {train.modality} training "
            f"items as a validation set stratified by class: {exc}"
        ) from None
    return _subset(train, np.sort(fit)), _subset(train, np.sort(val))


def _subset(items: TrainData, idx: np.ndarray) -> TrainData:
    index = torch.as_tensor(idx, dtype=torch.long)
    return TrainData(
        items.images[index],
        items.labels[index],
        items.modality,
        items.class_prompts,
        questions=None if items.questions is None else [items.questions[i] for i in idx],
        ids=[items.ids[i] for i in idx] if items.ids else [],
    )


def item_slices(classifier: nn.Module, items: TrainData, batch_size: int) -> Iterator[slice]:
    """The slices of ``items`` to evaluate together: all at once on a modality; on the VQA
    task ``batch_size`` at a time, each with the classifier's questions set to its items'."""
    if items.questions is None:
        yield slice(0, len(items.images))
        return
    assert isinstance(classifier, FineTunedClassifier)
    for start in range(0, len(items.images), batch_size):
        part = slice(start, start + batch_size)
        classifier.set_questions(items.questions[part])
        yield part


def predict_classes(
    classifier: nn.Module, items: TrainData, shown: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """The predicted class of each of ``items`` when shown the images ``shown`` (its own, or
    another arrangement of them; on the VQA task with each item's own question), on the CPU."""
    return torch.cat(
        [
            classify_images(classifier, shown[part], batch_size)
            for part in item_slices(classifier, items, batch_size)
        ]
    ).argmax(1)


def validation_accuracy(classifier: nn.Module, val: TrainData, batch_size: int) -> float:
    """Clean accuracy of the classifier being trained on the held-out items (a live head's
    class embeddings are refreshed from the current text tower first)."""
    if isinstance(classifier, FineTunedClassifier):
        classifier.refresh_class_embeddings()
    pred = predict_classes(classifier, val, val.images, batch_size)
    return float((pred == val.labels).float().mean())
