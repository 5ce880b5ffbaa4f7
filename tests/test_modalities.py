"""The nine-modality registry: names, templates, class names and agreement with medmnist.INFO."""

from __future__ import annotations

import random

import pytest

from medshield.data import MODALITIES, get_modality
from medshield.errors import UnknownNameError


def test_nine_modalities() -> None:
    assert len(MODALITIES) == 9
    assert all(name == m.name for name, m in MODALITIES.items())


@pytest.mark.parametrize("name", list(MODALITIES))
def test_modality_is_complete(name: str) -> None:
    m = MODALITIES[name]
    assert len(m.templates) >= 3
    assert all(t.count("{}") == 1 for t in m.templates)
    assert len(m.class_names) == len(m.medmnist_labels) == m.num_classes >= 2
    assert len(set(m.class_names)) == m.num_classes
    assert m.subsets
    prompts = m.prompts()
    assert len(prompts) == m.num_classes and all(len(p) == len(m.templates) for p in prompts)
    assert m.sample_caption(0, random.Random(0)) in m.captions(0)


def test_lookup_by_subset_and_unknown() -> None:
    assert get_modality("organsmnist").name == "abdominal_ct"
    with pytest.raises(UnknownNameError, match="known modalities: chest_xray"):
        get_modality("ct")


def test_labels_match_medmnist_info() -> None:
    medmnist = pytest.importorskip("medmnist")
    for m in MODALITIES.values():
        for subset in m.subsets:
            labels = medmnist.INFO[subset]["label"]
            assert tuple(labels[str(i)] for i in range(len(labels))) == m.medmnist_labels, subset
