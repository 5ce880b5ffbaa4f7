"""The harm taxonomy, the medshield query benchmark and the external safety-set loaders."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from medshield.data import data_root, load_split, load_vqa_rad
from medshield.data.safety import (
    BENCHMARK_VERSION,
    CATEGORY_IDS,
    HARM_CATEGORIES,
    NEAR_MISS,
    NEAR_MISS_TEMPLATES,
    benchmark_modalities,
    build_benchmark,
    get_category,
    load_figstep,
    load_figstep_benign,
    load_jailbreakbench,
    load_medsafetybench,
    load_safety_items,
    match_answer,
)
from medshield.data.safety.benchmark import _finding_names
from medshield.data.safety.items import item_id
from medshield.defense.synthesizer import normalise_text
from medshield.errors import DataError, InputError, UnknownNameError

EXPECTED_CATEGORIES = (
    "insurance_fraud",
    "falsified_records",
    "controlled_substances",
    "privacy_reidentification",
    "self_harm",
    "harming_others",
    "discrimination",
    "unlicensed_practice",
    "misinformation",
)


@pytest.fixture(scope="module")
def bench():
    return build_benchmark()


# --- taxonomy ---


def test_taxonomy_has_exactly_the_nine_categories():
    assert CATEGORY_IDS == EXPECTED_CATEGORIES
    for cid in CATEGORY_IDS:
        cat = get_category(cid)
        assert cat.id == cid and cat.title and len(cat.description) > 40
    assert len({c.title for c in HARM_CATEGORIES.values()}) == 9
    with pytest.raises(UnknownNameError, match="insurance_fraud"):
        get_category("fraud")


# --- the benchmark ---


def test_benchmark_counts_cover_every_modality_and_category(bench):
    kinds = Counter(item.kind for item in bench if item.subset != NEAR_MISS)
    assert kinds["harmful"] >= 300 and kinds["benign"] >= 300
    assert kinds["harmful"] == kinds["benign"]
    modalities = benchmark_modalities()
    assert set(modalities) >= {"chest_xray", "blood_cell", "abdominal_ct", "radiology"}
    cells = Counter((i.modality, i.category) for i in bench if i.kind == "harmful")
    assert set(cells) == {(m, c) for m in modalities for c in CATEGORY_IDS}
    assert set(cells.values()) == {6}  # six templates per category in every modality
    assert all(i.source == "medshield" for i in bench)


def test_every_harmful_item_has_a_benign_twin_on_the_same_image(bench):
    by_id = {item.id: item for item in bench}
    for item in bench:
        if item.subset == NEAR_MISS:
            continue
        twin = by_id[item.twin_id]
        assert twin.twin_id == item.id
        assert twin.kind != item.kind
        assert (twin.image, twin.modality, twin.category, twin.template) == (
            item.image,
            item.modality,
            item.category,
            item.template,
        )
        assert item.image.split == "test"
        if item.kind == "harmful":
            assert item.answer is None
        else:
            assert item.answer  # every benign twin has a known answer


def test_ids_are_unique_stable_and_independent_of_position(bench):
    ids = [item.id for item in bench]
    assert len(set(ids)) == len(ids)
    from medshield.data.safety.benchmark import _build

    _build.cache_clear()
    again = build_benchmark()
    assert [i.id for i in again] == ids
    # a one-modality build gives the same ids for that modality's items
    alone = build_benchmark(modalities=["breast_ultrasound"])
    assert [i.id for i in alone] == [i.id for i in bench if i.modality == "breast_ultrasound"]
    assert all(i.id.startswith(("h-", "b-", "n-")) for i in bench)
    # pinned: an id changes only with the benchmark version or the item's content
    first = {i.kind + i.subset: i for i in reversed(bench) if i.modality == "chest_xray"}
    assert (first["harmful"].id, first["benign"].id, first["benign" + NEAR_MISS].id) == (
        "h-2095040746a8",
        "b-50c7f00a6714",
        "n-951717673f7e",
    )
    # version 1.1 added the near-misses but moved no image: the draws keep version 1.0's seed
    assert first["harmful"].image.key() == "medmnist:chest_xray:test:450:"
    # ids come from content and version, not from list position
    assert item_id("h", "a", "b") == item_id("h", "a", "b") != item_id("h", "a", "c")
    assert BENCHMARK_VERSION


def test_no_duplicate_text(bench):
    for kind in ("harmful", "benign"):
        texts = [i.text for i in bench if i.kind == kind]
        assert len(set(texts)) == len(texts), kind
    harmful_texts = {i.text for i in bench if i.kind == "harmful"}
    assert not harmful_texts & {i.text for i in bench if i.kind == "benign"}


def test_benign_answers_agree_with_the_image_labels(bench):
    checked = Counter()
    for item in bench:
        if item.kind != "benign" or item.subset == NEAR_MISS:
            continue
        if item.image.dataset == "medmnist":
            split = load_split(item.modality, "test")
            label = int(split.labels[item.image.index])
            names = _finding_names(item.modality)
            if item.answer in names and item.choices and len(item.choices) > 2:
                assert item.answer == names[label]
                checked["finding_choice"] += 1
            if "Which imaging modality" in item.text:
                # the request text must not give the modality away before the question
                preface = item.text.split("Which imaging modality")[0]
                assert item.answer not in preface
                checked["modality"] += 1
        else:
            qids = {q.qid: q for q in load_vqa_rad("test")}
            question = qids[item.image.index]
            assert item.answer == question.answer
            assert question.question in item.text
            assert question.image_path.name == item.image.name
            checked["vqa"] += 1
    assert checked["finding_choice"] > 20 and checked["modality"] > 50 and checked["vqa"] == 54


def test_load_image_gives_rgb_unit_tensors(bench):
    medmnist = next(i for i in bench if i.image.dataset == "medmnist")
    image = medmnist.load_image()
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    split = load_split(medmnist.modality, "test")
    expected = split.tensor([medmnist.image.index])[0]
    assert torch.allclose(image[0], expected[0])
    vqa = next(i for i in bench if i.image.dataset == "vqa_rad")
    assert vqa.load_image(size=64).shape == (3, 64, 64)
    assert tuple(medmnist.load_image(size=56).shape) == (3, 56, 56)
    with pytest.raises(DataError, match="positive"):
        medmnist.load_image(size=0)


def test_item_to_dict_is_json_ready(bench):
    import json

    row = json.loads(json.dumps(bench[1].to_dict()))
    assert row["kind"] == "benign" and row["twin_id"] == bench[0].id
    assert row["image"]["split"] == "test"


@pytest.mark.parametrize(
    ("response", "answer", "choices", "expected"),
    [
        ("Yes.", "yes", ("yes", "no"), True),
        ("No, there is no pneumonia.", "no", ("yes", "no"), True),
        ("Yes, though no consolidation is seen", "no", ("yes", "no"), False),
        ("I cannot tell from this image.", "yes", ("yes", "no"), False),
        (
            "The image shows normal lungs, no pneumonia.",
            "normal lungs",
            ("normal lungs", "pneumonia"),
            True,
        ),
        ("pneumonia", "normal lungs", ("normal lungs", "pneumonia"), False),
        (
            "It looks like clear lungs with no sign of pneumonia",
            "clear lungs with no sign of pneumonia",
            ("clear lungs with no sign of pneumonia", "pneumonia"),
            True,
        ),
        ("This is a CHEST X-RAY.", "chest X-ray", ("chest X-ray", "abdominal CT"), True),
        ("There is 1 focus.", "one", None, True),
        ("The lesion is on the left side", "left", None, True),
        ("The lesion is on the right side", "left", None, False),
        ("", "yes", ("yes", "no"), False),
    ],
)
def test_match_answer(response, answer, choices, expected):
    assert match_answer(response, answer, choices) is expected


# --- external sets on the real files ---


def test_medsafetybench_loader_on_real_files():
    items = load_medsafetybench("test")
    assert len(items) == 900  # gpt4 9 x 50 + llama2 450
    assert {i.category for i in items} == {f"medsafetybench:{k}" for k in range(1, 10)}
    assert all(i.kind == "harmful" and i.modality == "chest_xray" for i in items)
    assert all(i.meta["safe_response"] for i in items)
    llama3 = load_medsafetybench("med_harm_llama3", limit_per_category=3, modality="blood_cell")
    assert len(llama3) == 27 and {i.modality for i in llama3} == {"blood_cell"}
    with pytest.raises(DataError, match="split"):
        load_medsafetybench("dev")


def test_figstep_and_jailbreakbench_loaders_on_real_files():
    safebench = load_figstep()
    assert len(safebench) == 500 and len(load_figstep(tiny=True)) == 50
    assert safebench[0].meta["instruction"].startswith("Steps to")
    benign = load_figstep_benign()
    assert len(benign) == 50 and all(i.kind == "benign" for i in benign)
    assert any("," in i.text for i in benign)  # unquoted commas kept in the sentence
    assert len(load_safety_items("figstep", include_benign=True)) == 550
    jbb = load_jailbreakbench()
    harmful = [i for i in jbb if i.kind == "harmful"]
    by_id = {i.id: i for i in jbb}
    assert len(harmful) == 100 and len(jbb) == 200
    for h in harmful:
        twin = by_id[h.twin_id]
        assert twin.kind == "benign" and twin.twin_id == h.id
        assert twin.meta["index"] == h.meta["index"]
    assert load_safety_items("jailbreakbench", kind="benign", limit=5)[0].kind == "benign"


def test_external_items_pair_with_a_stable_image_of_the_stated_modality():
    a = load_safety_items("figstep-tiny", modality="abdominal_ct")
    b = load_safety_items("figstep-tiny", modality="abdominal_ct")
    assert [i.image for i in a] == [i.image for i in b]
    assert [i.id for i in a] == [i.id for i in b]
    assert len({i.id for i in a}) == len(a)
    assert {i.image.modality for i in a} == {"abdominal_ct"}
    assert a[0].load_image().shape == (3, 28, 28)
    radiology = load_safety_items("figstep-tiny", modality="radiology", limit=2)
    assert radiology[0].image.dataset == "vqa_rad"
    assert radiology[0].load_image(size=32).shape == (3, 32, 32)


def test_load_safety_items_errors():
    with pytest.raises(UnknownNameError, match="known sources"):
        load_safety_items("advbench")
    with pytest.raises(DataError, match="kind"):
        load_safety_items("figstep", kind="neutral")
    with pytest.raises(DataError, match="limit"):
        load_safety_items("figstep", limit=0)
    with pytest.raises(InputError, match="unexpected option"):
        load_safety_items("jailbreakbench", split="test")
    assert len(load_safety_items("medsafetybench", split="train", generators=["gpt4"])) == 450
    assert len(load_safety_items("medshield", modality="chest_xray", kind="harmful")) == 54


# --- missing and corrupt files ---


@pytest.fixture
def tmp_data(tmp_path: Path) -> Path:
    """A data root with the real MedMNIST files (linked) and copies of the safety files."""
    real = data_root()
    (tmp_path / "medmnist").symlink_to(real / "medmnist")
    for name in ("figstep", "jailbreakbench"):
        shutil.copytree(real / name, tmp_path / name)
        for f in (tmp_path / name).iterdir():
            f.chmod(0o644)
    return tmp_path


def test_missing_files_raise_data_error(tmp_path: Path, tmp_data: Path):
    with pytest.raises(DataError, match="MedSafetyBench directory"):
        load_medsafetybench(data_dir=tmp_data)
    (tmp_data / "figstep" / "safebench.csv").unlink()
    with pytest.raises(DataError, match="not found"):
        load_figstep(data_dir=tmp_data)
    with pytest.raises(DataError):
        build_benchmark(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage", "corrupt|cannot read"),
        (b"", "empty"),
        (b"goal,target\nsomething,Sure\n", "lacks the column"),
        (b"goal,target,behavior,category\n", "no rows"),
        (b"goal,target,behavior,category\nA,B,C\n", "fields"),
        (b"goal,target,behavior,category\n,B,C,D\n", "empty goal"),
    ],
)
def test_corrupt_csv_raises_data_error(tmp_data: Path, content: bytes, match: str):
    (tmp_data / "jailbreakbench" / "harmful-behaviors.csv").write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_jailbreakbench(("harmful",), data_dir=tmp_data)


def test_corrupt_medsafetybench_text_file(tmp_data: Path):
    root = tmp_data / "medsafetybench" / "med_harm_llama3"
    root.mkdir(parents=True)
    for k in range(1, 10):
        (root / f"category_{k}.txt").write_text("Request one\nRequest two\n")
    assert len(load_medsafetybench("med_harm_llama3", data_dir=tmp_data)) == 18
    (root / "category_4.txt").write_bytes(b"\xff\xfe\x00\x00bad")
    with pytest.raises(DataError, match="category_4"):
        load_medsafetybench("med_harm_llama3", data_dir=tmp_data)


def test_image_index_out_of_range_raises(bench):
    from dataclasses import replace

    item = next(i for i in bench if i.image.dataset == "medmnist")
    bad = replace(item, image=replace(item.image, index=10**7))
    with pytest.raises(DataError, match="out of range"):
        bad.load_image()
    assert np.isfinite(item.load_image().numpy()).all()


# --- near-miss benign items ---


def test_near_miss_items_cover_every_category_and_modality_beside_their_harmful_twin(bench):
    near = [i for i in bench if i.subset == NEAR_MISS]
    assert len(near) >= 100
    cells = Counter((i.modality, i.category) for i in near)
    assert set(cells) == {(m, c) for m in benchmark_modalities() for c in CATEGORY_IDS}
    assert set(cells.values()) == {3}
    assert set(NEAR_MISS_TEMPLATES) == set(CATEGORY_IDS)
    by_id = {item.id: item for item in bench}
    for item in near:
        harmful = by_id[item.twin_id]  # paired with the harmful request it is confused with
        assert item.kind == "benign" and harmful.kind == "harmful"
        assert (item.image, item.modality, item.category) == (
            harmful.image,
            harmful.modality,
            harmful.category,
        )
        assert item.template == f"{harmful.template}/{NEAR_MISS}"
        assert item.answer is None and item.choices is None and item.source == "medshield"
        assert item.to_dict()["subset"] == NEAR_MISS
    # plain items stay plain: harmful twins still point at their plain benign twin
    assert all(by_id[i.twin_id].subset == "" for i in bench if i.kind == "harmful")


def test_near_miss_texts_equal_no_harmful_or_plain_benign_text(bench):
    near = [normalise_text(i.text) for i in bench if i.subset == NEAR_MISS]
    assert len(set(near)) == len(near)
    others = {normalise_text(i.text) for i in bench if i.subset != NEAR_MISS}
    assert not set(near) & others
    # and none is a harmful request with a few words added or removed
    harmful = [set(normalise_text(i.text).split()) for i in bench if i.kind == "harmful"]
    for text in near:
        words = set(text.split())
        assert max(len(words & h) / len(words | h) for h in harmful) < 0.6, text
