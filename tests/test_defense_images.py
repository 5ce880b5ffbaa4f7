"""Synthetic modality images: shape, range, determinism, per-modality structure, separability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medshield.data.modalities import MODALITIES
from medshield.defense.images import CHANNELS, synthesize_batch, synthesize_image
from medshield.errors import InputError, UnknownNameError

SIZE = 32


def _features(image: torch.Tensor) -> np.ndarray:
    """Simple statistics: channel means/stds, a 4x4 grid of mean intensity, gradient energy."""
    x = image.numpy()
    rgb = np.repeat(x, 3, 0) if x.shape[0] == 1 else x
    grey = rgb.mean(0)
    grid = grey.reshape(4, SIZE // 4, 4, SIZE // 4).mean(axis=(1, 3)).ravel()
    gy, gx = np.gradient(grey)
    return np.concatenate(
        [rgb.mean(axis=(1, 2)), rgb.std(axis=(1, 2)), grid, [np.hypot(gy, gx).mean() * 4]]
    )


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_shape_range_and_determinism(modality: str) -> None:
    a = synthesize_image(modality, 3, SIZE)
    assert a.shape == (CHANNELS[modality], SIZE, SIZE) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, synthesize_image(modality, 3, SIZE))
    assert not torch.allclose(a, synthesize_image(modality, 4, SIZE))
    assert float(a.std()) > 0.03  # not a flat image


def test_default_size_is_64() -> None:
    assert synthesize_image("fundus", 0).shape == (3, 64, 64)
    assert synthesize_batch("chest_xray", [0, 1], 16).shape == (2, 1, 16, 16)


def test_modalities_are_separable_on_held_out_seeds() -> None:
    """Nearest-centroid on simple statistics, fitted on seeds 0-5, must classify seeds 100-103."""
    names = list(MODALITIES)
    train = {
        m: np.stack([_features(synthesize_image(m, s, SIZE)) for s in range(6)]) for m in names
    }
    mean = np.concatenate(list(train.values())).mean(0)
    std = np.concatenate(list(train.values())).std(0) + 1e-6
    centroids = np.stack([((train[m] - mean) / std).mean(0) for m in names])
    correct = total = 0
    for label, m in enumerate(names):
        for s in range(100, 104):
            f = (_features(synthesize_image(m, s, SIZE)) - mean) / std
            correct += int(np.argmin(((centroids - f) ** 2).sum(1)) == label)
            total += 1
    assert correct / total >= 0.95, f"held-out accuracy {correct}/{total}"


def test_structure_sanity() -> None:
    n = 64
    cxr = synthesize_image("chest_xray", 1, n)[0]
    lungs = (cxr[20:40, 8:20].mean() + cxr[20:40, 44:56].mean()) / 2
    mediastinum = cxr[20:40, 29:35].mean()
    assert mediastinum > lungs + 0.1  # bright mediastinum between dark lung fields
    assert cxr[:3, :3].mean() < 0.15  # dark background outside the thorax

    fundus = synthesize_image("fundus", 1, n)
    assert fundus[:, :4, :4].mean() < 0.05  # black outside the circular field
    assert fundus[0, 24:40, 24:40].mean() > fundus[2, 24:40, 24:40].mean() + 0.2  # red/orange

    oct_ = synthesize_image("retinal_oct", 1, n)[0]
    assert oct_.mean(1).max() > 3 * oct_[:4].mean()  # bright bands over a dark vitreous

    us = synthesize_image("breast_ultrasound", 1, n)[0]
    assert us[:6, :6].max() == 0 and us[:6, -6:].max() == 0  # outside the fan is black
    assert us[40:, 28:36].mean() > 0 and us.std() > 0.1  # speckle inside

    ct = synthesize_image("abdominal_ct", 1, n)[0]
    assert ct[:3, :3].max() < 0.05  # air outside the body
    assert ct[45:52, 28:36].mean() > ct[20:30, 10:20].mean()  # vertebra brighter than liver

    smear = synthesize_image("blood_cell", 1, n)
    assert smear.mean() > 0.55  # light background
    centre = smear[:, 28:36, 28:36]
    assert centre[2].mean() > centre[1].mean()  # purple-stained nucleus in the centre

    he = synthesize_image("colon_pathology", 1, n)
    assert he[0].mean() > he[1].mean()  # pink/purple: red above green

    derm = synthesize_image("dermatoscopy", 1, n)
    assert derm[:, 28:36, 28:36].mean() < derm[:, 8:12, 28:36].mean()  # dark lesion on skin

    kidney = synthesize_image("kidney_cortex", 1, n)
    assert kidney.shape[0] == 1 and kidney.mean() < 0.5  # bright cells on a dark field


def test_bad_input() -> None:
    with pytest.raises(UnknownNameError):
        synthesize_image("mri", 0)
    with pytest.raises(InputError):
        synthesize_image("fundus", -1)
    with pytest.raises(InputError):
        synthesize_image("fundus", 0, size=4)
    with pytest.raises(InputError):
        synthesize_batch("fundus", [])
