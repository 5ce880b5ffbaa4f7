"""Linear probe: logistic regression on frozen, L2-normalised image embeddings.

Features are standardised (fitted on the training rows) and a multinomial logistic regression
(sklearn, lbfgs) is fitted on them. Its inverse regularisation strength ``C`` is chosen from
:data:`C_GRID` by accuracy on the ``val`` split when one exists and is neither the train nor the
test split (ties go to the smaller ``C``); otherwise ``C = 1``. The final probe is fitted on the
training rows only. Sample rows are those of :mod:`medshield.eval.zero_shot` with task
``"linear_probe"``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from medshield import data
from medshield.errors import DataError
from medshield.eval.features import embed_images
from medshield.eval.zero_shot import balanced_subset, classification_rows
from medshield.models.base import DualEncoder

if TYPE_CHECKING:
    from medshield.data.medmnist import MedMNISTSplit

logger = logging.getLogger(__name__)

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
MAX_ITER = 3000


def _probe(c: float) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))


def linear_probe_rows(
    model: DualEncoder,
    modality: str,
    train_split: str = "train",
    test_split: str = "test",
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Fit a linear probe on ``train_split`` and classify ``test_split``; one row per test image.

    Args:
        model: the dual encoder (frozen; left in the train/eval mode it was in).
        modality: modality name, e.g. ``"blood_cell"``.
        train_split: split the probe is fitted on.
        test_split: split the rows describe.
        max_train: class-balanced subsample of about this many training images (None: all).
        max_test: class-balanced subsample of about this many test images, and of validation
            images when ``C`` is selected (None: all).
        seed: seed of the subsamples.
        data_dir: data root (see :func:`medshield.data.load_split`).
        batch_size: images per forward pass.

    Raises:
        DataError: the modality has no ``train_split`` (e.g. colon pathology ships test-only),
            the test split cannot be loaded, or the training rows hold a single class.
    """
    try:
        train = data.load_split(modality, train_split, data_dir)
    except DataError as exc:
        raise DataError(
            f"linear probe on {modality!r} needs a {train_split!r} split to fit on: {exc}"
        ) from exc
    test = data.load_split(modality, test_split, data_dir)
    mod = train.modality

    def features(
        split: MedMNISTSplit, max_items: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        indices = balanced_subset(split.labels, mod.num_classes, max_items, seed)
        x = embed_images(model, split.tensor(indices), batch_size).double().numpy()
        return indices, x, split.labels[indices]

    _, x_train, y_train = features(train, max_train)
    if len(np.unique(y_train)) < 2:
        raise DataError(
            f"linear probe on {modality!r}: the {train_split!r} rows hold a single class "
            f"({int(y_train[0])}); a probe needs at least two"
        )
    c = 1.0
    if "val" not in (train_split, test_split):
        try:
            val = data.load_split(modality, "val", data_dir)
        except DataError as exc:
            logger.info("linear probe on %s: no val split (%s), using C = 1", mod.name, exc)
        else:
            _, x_val, y_val = features(val, max_test)
            scores = [_probe(g).fit(x_train, y_train).score(x_val, y_val) for g in C_GRID]
            c = C_GRID[int(np.argmax(scores))]
            logger.info("linear probe on %s: C = %g (val accuracies %s)", mod.name, c, scores)

    probe = _probe(c).fit(x_train, y_train)
    test_indices, x_test, y_test = features(test, max_test)
    probs = np.zeros((len(x_test), mod.num_classes))
    probs[:, probe.classes_] = probe.predict_proba(x_test)  # classes absent from train stay 0
    return classification_rows("linear_probe", mod.name, test_indices, y_test, probs)
