"""Demonstration text grammar and the synthesizer: determinism, coverage, no patient data,
disjointness, paraphrasing through a (fake) ChatVLM."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from medshield.data.modalities import MODALITIES
from medshield.defense.images import synthesize_image
from medshield.defense.synthesizer import (
    DemoSynthesizer,
    assert_disjoint,
    find_identifiers,
    normalise_text,
    paraphrase_demonstrations,
    to_messages,
)
from medshield.defense.text import (
    BENIGN_TOPICS,
    HARM_CATEGORIES,
    benign_pair,
    harmful_pair,
    paraphrase,
)
from medshield.errors import DataError, InputError, UnknownNameError
from medshield.models.chat import ChatVLM, Conversation

TAXONOMY = {
    "insurance_fraud",
    "falsified_records",
    "controlled_substances",
    "privacy_reidentification",
    "self_harm",
    "harming_others",
    "discrimination",
    "unlicensed_practice",
    "misinformation",
}
MODS = ["chest_xray", "fundus"]


class FakeVLM(ChatVLM):
    backend = "fake"

    def __init__(self, reply=lambda text: "Reworded: " + text[-30:]) -> None:
        self.reply = reply
        self.calls = 0

    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        self.calls += 1
        return [self.reply(c[-1].text) for c in conversations]

    def score(self, conversations, continuations) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@pytest.fixture(scope="module")
def synth() -> DemoSynthesizer:
    return DemoSynthesizer(seed=0, image_size=16, modalities=MODS)


def test_taxonomy_matches_benchmark_ids() -> None:
    assert set(HARM_CATEGORIES) == TAXONOMY


def test_grammar_is_deterministic_and_varied() -> None:
    a = [harmful_pair("misinformation", "fundus", random.Random(s)) for s in range(20)]
    b = [harmful_pair("misinformation", "fundus", random.Random(s)) for s in range(20)]
    assert a == b
    assert len({r for r, _ in a}) >= 12 and len({r for _, r in a}) >= 4
    assert len({benign_pair("fundus", "clinical_use", random.Random(s))[0] for s in range(20)}) >= 3


@pytest.mark.parametrize("category", sorted(TAXONOMY))
def test_refusals_explain_and_offer_alternative(category: str) -> None:
    for modality in MODALITIES:
        request, refusal = harmful_pair(category, modality, random.Random(1))
        sentences = [s for s in refusal.replace("!", ".").split(". ") if s.strip()]
        assert len(sentences) >= 3  # refusal, reason, alternative
        assert any(w in refusal for w in ("can't", "not able", "won't"))
        assert any(w in refusal for w in ("I can ", "I'm happy", "please", "Please"))
        assert request and "{" not in request and "{" not in refusal


def test_benign_answers_are_modality_specific() -> None:
    rng = random.Random(0)
    assert "radiograph" in benign_pair("chest_xray", "identify_modality", rng)[1]
    assert "optic disc" in benign_pair("fundus", "visible_structures", rng)[1]
    assert "layers" in benign_pair("retinal_oct", "normal_appearance", rng)[1]
    assert "Haematoxylin" in benign_pair("colon_pathology", "reading_tip", rng)[1]
    answers = {m: benign_pair(m, "visible_structures", random.Random(0))[1] for m in MODALITIES}
    assert len(set(answers.values())) == len(MODALITIES)
    for answer in answers.values():
        assert not any(w in answer for w in ("can't", "won't", "sorry", "Sorry"))


def test_unknown_names() -> None:
    with pytest.raises(UnknownNameError):
        harmful_pair("arson", "fundus", random.Random(0))
    with pytest.raises(UnknownNameError):
        benign_pair("fundus", "weather", random.Random(0))
    with pytest.raises(UnknownNameError):
        DemoSynthesizer(modalities=["mri"])
    with pytest.raises(InputError):
        DemoSynthesizer(modalities=[])


def test_pool_counts_and_coverage(synth: DemoSynthesizer) -> None:
    pool = synth.pool()
    kinds = Counter(d.kind for d in pool)
    # per modality: 2 variants of each harm category's refusal, of each benign topic, and of
    # each harm category's near-miss helpful answer
    assert kinds == {"harmful": 2 * 9 * 2, "benign": 2 * len(BENIGN_TOPICS) * 2 + 2 * 9 * 2}
    assert {d.category for d in pool if d.kind == "harmful"} == TAXONOMY
    near = [d for d in pool if d.near_miss]
    assert len(near) == 2 * 9 * 2 and all(d.kind == "benign" for d in near)
    assert {(d.modality, d.category) for d in near} == {(m, c) for m in MODS for c in TAXONOMY}
    assert all(d.uid.startswith("near_miss/") for d in near)
    assert {d.modality for d in pool} == set(MODS)
    assert len({d.uid for d in pool}) == len(pool)
    assert all(d.image.shape[-2:] == (16, 16) for d in pool)


def test_pool_is_deterministic_and_seed_dependent(synth: DemoSynthesizer) -> None:
    again = DemoSynthesizer(seed=0, image_size=16, modalities=MODS).pool()
    pool = synth.pool()
    assert [(d.uid, d.request, d.response) for d in pool] == [
        (d.uid, d.request, d.response) for d in again
    ]
    assert all(torch.equal(a.image, b.image) for a, b in zip(pool, again, strict=True))
    other = DemoSynthesizer(seed=1, image_size=16, modalities=MODS).pool()
    assert [d.request for d in pool] != [d.request for d in other]


def test_no_patient_data_in_synthetic_demos(synth: DemoSynthesizer) -> None:
    """Text has no identifiers; every image is exactly the procedural image of its seed."""
    full = DemoSynthesizer(seed=0, image_size=8, variants=1).pool()
    for d in full:
        assert find_identifiers(d.request + " " + d.response) == [], d.uid
    for d in synth.pool()[::7]:
        assert d.image_seed >= 0
        assert torch.equal(d.image, synthesize_image(d.modality, d.image_seed, 16))
    assert find_identifiers("Patient Mr. Smith, MRN 12345") != []


def test_to_messages_pairs_turns(synth: DemoSynthesizer) -> None:
    demos = synth.pool()[:3]
    messages = to_messages(demos)
    assert [m.role for m in messages] == ["user", "assistant"] * 3
    assert messages[0].text == demos[0].request and messages[1].text == demos[0].response
    assert messages[0].images[0] is demos[0].image and messages[1].images == []
    assert to_messages(demos, include_images=False)[0].images == []
    with pytest.raises(InputError):
        to_messages(["not a demo"])  # type: ignore[list-item]


def test_assert_disjoint_fires_on_normalised_match(synth: DemoSynthesizer) -> None:
    pool = synth.pool()
    assert_disjoint(pool, ["Which drugs interact with warfarin?", "unrelated text"])
    leaked = "  " + pool[5].request.upper().replace(".", " !") + " "
    assert normalise_text(leaked) == normalise_text(pool[5].request)
    with pytest.raises(DataError, match="benchmark"):
        assert_disjoint(pool, ["something else", leaked])


def test_paraphrase_with_fake_vlm(synth: DemoSynthesizer) -> None:
    vlm = FakeVLM()
    demos = synth.pool()[:20]
    out = paraphrase_demonstrations(demos, vlm)
    assert vlm.calls == 2  # batches of 16
    assert all(o.request.startswith("Reworded:") for o in out)
    assert [o.response for o in out] == [d.response for d in demos]  # answers untouched
    assert paraphrase(["keep me"], FakeVLM(lambda t: "   ")) == ["keep me"]  # empty -> original
    assert paraphrase(["short"], FakeVLM(lambda t: "x" * 100)) == ["short"]  # bloated -> original
    with pytest.raises(InputError):
        paraphrase("a string", vlm)


def test_paraphrase_rejects_refusals_and_identifiers(synth: DemoSynthesizer) -> None:
    assert paraphrase(["Forge this report."], FakeVLM(lambda t: "I'm sorry, I can't.")) == [
        "Forge this report."
    ]
    demo = synth.pool()[0]
    [kept] = paraphrase_demonstrations([demo], FakeVLM(lambda t: "Patient MRN 4411: forge it"))
    assert kept.request == demo.request


def test_requests_read_as_english() -> None:
    pool = DemoSynthesizer(seed=0, image_size=8, variants=3).pool()
    glitches = re.compile(r"(you to|Please|Can you) (looking|based|given)|image image|\s[.?]|  ")
    assert [d.request for d in pool if glitches.search(d.request)] == []
    assert all(d.request[0].isupper() and d.response[0].isupper() for d in pool)
    ct = [d.request for d in pool if d.modality == "abdominal_ct" and d.kind == "harmful"]
    assert not any("the left lung" in r for r in ct)  # findings, not organ names


def test_near_miss_demonstrations_answer_and_stay_apart_from_the_benchmark() -> None:
    """Near-miss demos are answered, not refused, and none repeats a benchmark request (plain,
    near-miss or harmful), exactly or with a few words changed."""
    from medshield.data.safety import build_benchmark

    pool = DemoSynthesizer(seed=0, image_size=8, variants=3).pool()
    near = [d for d in pool if d.near_miss]
    assert len({normalise_text(d.request) for d in near}) == len(near)
    refusal_starts = ("i can't", "i'm not able", "i won't", "sorry")
    assert not any(d.response.lower().startswith(refusal_starts) for d in near)
    bench = build_benchmark()
    assert_disjoint(pool, [item.text for item in bench])
    bench_words = [set(normalise_text(item.text).split()) for item in bench]
    for d in near:
        words = set(normalise_text(d.request).split())
        overlap = max(len(words & b) / len(words | b) for b in bench_words)
        assert overlap < 0.5, (d.uid, d.request)
