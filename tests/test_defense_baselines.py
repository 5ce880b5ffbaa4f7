"""Defenses: registration, conversation order, system prompt placement, budget 0, no mutation,
the real-image ablation."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from medshield.defense import DemoSynthesizer, create_defense
from medshield.defense.baselines import (
    ADASHIELD_STATIC_PROMPT,
    SELF_REMINDER_SUFFIX,
    SELF_REMINDER_SYSTEM,
    DemonstrationDefense,
)
from medshield.defense.images import synthesize_image
from medshield.errors import DataError, InputError, UnknownNameError
from medshield.models.chat import ChatVLM, Message
from medshield.registry import DEFENSES

MODS = ["chest_xray", "fundus"]


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """Hashed word counts: a fast, deterministic stand-in for MiniLM."""
    out = torch.zeros(len(texts), 256)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 256] += 1
    return out


IMAGE = torch.rand(3, 16, 16)


def user_only() -> list[Message]:
    return [Message("user", "Which drugs can I get with this scan?", [IMAGE])]


def with_system() -> list[Message]:
    return [Message("system", "You are a radiology assistant."), *user_only()]


@pytest.fixture(scope="module")
def synth() -> DemoSynthesizer:
    return DemoSynthesizer(seed=0, image_size=16, modalities=MODS)


def test_all_defenses_registered_with_descriptions() -> None:
    names = {
        "none",
        "self-reminder",
        "adashield-static",
        "demonstrations",
        "demonstrations-real-images",
    }
    assert names <= set(DEFENSES.names())
    assert all(e.description for e in DEFENSES.entries() if e.name in names)
    with pytest.raises(UnknownNameError):
        create_defense("firewall")
    with pytest.raises(InputError):
        create_defense("none", k=3)


def test_none_copies_and_does_not_mutate() -> None:
    conv = with_system()
    out = create_defense("none").apply(conv)
    assert [(m.role, m.text) for m in out] == [(m.role, m.text) for m in conv]
    assert out is not conv and out[0] is not conv[0]
    with pytest.raises(InputError):
        create_defense("none").apply([Message("assistant", "hi")])


def test_self_reminder_placement() -> None:
    defense = create_defense("self-reminder")
    out = defense.apply(user_only())
    assert out[0].role == "system" and out[0].text == SELF_REMINDER_SYSTEM
    assert out[-1].text.endswith(SELF_REMINDER_SUFFIX) and out[-1].images == [IMAGE]
    conv = with_system()
    out = defense.apply(conv)
    assert len(out) == 2 and sum(m.role == "system" for m in out) == 1
    assert out[0].text.startswith(SELF_REMINDER_SYSTEM)
    assert out[0].text.endswith("You are a radiology assistant.")
    assert conv[0].text == "You are a radiology assistant."  # input untouched
    assert conv[1].text == "Which drugs can I get with this scan?"


def test_adashield_static_appends_to_user_turn() -> None:
    out = create_defense("adashield-static").apply(with_system())
    assert out[0].text == "You are a radiology assistant."
    assert out[-1].role == "user" and out[-1].text.endswith(ADASHIELD_STATIC_PROMPT)
    assert out[-1].text.startswith("Which drugs") and "image" in ADASHIELD_STATIC_PROMPT
    with pytest.raises(InputError):
        create_defense("adashield-static", prompt=" ")


@pytest.mark.parametrize("strategy", ["harmful-only", "benign-only", "mixed"])
def test_demonstrations_before_users_turn(synth: DemoSynthesizer, strategy: str) -> None:
    defense = create_defense("demonstrations", strategy=strategy, k=4, synthesizer=synth)
    conv = with_system()
    out = defense.apply(conv)
    assert len(out) == 2 + 2 * 4
    assert out[0].text == "You are a radiology assistant."  # system prompt stays first
    assert [m.role for m in out[1:-1]] == ["user", "assistant"] * 4
    assert out[-1].text == conv[-1].text and out[-1].images == [IMAGE]  # user's turn last
    demos = defense.select()
    assert [m.text for m in out[1:-1:2]] == [d.request for d in demos]
    assert all(
        m.images and m.images[0].shape == (1 if d.modality == "chest_xray" else 3, 16, 16)
        for m, d in zip(out[1:-1:2], demos, strict=True)
    )
    no_system = defense.apply(user_only())
    assert no_system[0].role == "user" and len(no_system) == 9
    assert len(conv) == 2  # not mutated


def test_budget_zero_is_unchanged(synth: DemoSynthesizer) -> None:
    for strategy in ("mixed", "retrieval"):
        defense = create_defense("demonstrations", strategy=strategy, k=0, synthesizer=synth)
        out = defense.apply(with_system())
        assert [(m.role, m.text, m.images) for m in out] == [
            (m.role, m.text, m.images) for m in with_system()
        ]


def test_demonstration_validation(synth: DemoSynthesizer) -> None:
    with pytest.raises(InputError):
        create_defense("demonstrations", k=-1, synthesizer=synth)
    with pytest.raises(InputError):
        create_defense("demonstrations", strategy="mixed", share=2.0, synthesizer=synth)
    with pytest.raises(InputError, match="pool"):
        create_defense("demonstrations", strategy="benign-only", k=500, synthesizer=synth)
    with pytest.raises(UnknownNameError):
        create_defense("demonstrations", strategy="random", synthesizer=synth)


def test_retrieval_defense_uses_last_user_turn(synth: DemoSynthesizer) -> None:
    defense = DemonstrationDefense("retrieval", k=2, synthesizer=synth, embedder=bag_of_words)
    target = next(d for d in synth.pool() if d.uid == "harmful/fundus/self_harm/0")
    out = defense.apply([Message("user", target.request, [IMAGE])])
    assert [m.role for m in out] == ["user", "assistant", "user", "assistant", "user"]
    assert out[2].text == target.request and out[3].text == target.response


def test_text_only_demonstrations(synth: DemoSynthesizer) -> None:
    defense = create_defense("demonstrations", k=2, include_images=False, synthesizer=synth)
    assert all(m.images == [] for m in defense.apply(user_only())[:-1])


def test_real_image_ablation(data_dir) -> None:
    defense = create_defense(
        "demonstrations-real-images",
        strategy="mixed",
        k=4,
        seed=0,
        image_size=16,
        modalities=["chest_xray", "fundus", "dermatoscopy"],
    )
    pool = defense.pool()
    assert {d.modality for d in pool} == {"chest_xray", "fundus"}  # no dermamnist file: skipped
    for d in pool[::9]:
        assert d.image_seed == -1 and d.image.shape[-2:] == (16, 16)
        assert 0 <= float(d.image.min()) and float(d.image.max()) <= 1
        assert not torch.equal(d.image, synthesize_image(d.modality, 0, 16))
    out = defense.apply(user_only())
    assert len(out) == 9 and out[-1].text == user_only()[0].text
    with pytest.raises(DataError):
        create_defense(
            "demonstrations-real-images", k=2, image_size=16, modalities=["dermatoscopy"]
        )
    with pytest.raises(DataError):
        create_defense(
            "demonstrations-real-images",
            k=2,
            image_size=16,
            missing="error",
            modalities=["fundus", "dermatoscopy"],
        )


class _Rewriter(ChatVLM):
    backend = "fake"

    def generate(self, conversations, max_new_tokens=128, temperature=0.0) -> list[str]:
        return ["Reworded request " + c[-1].text.split("Request: ")[-1][:20] for c in conversations]

    def score(self, conversations, continuations) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def test_paraphraser_rewords_pool_once() -> None:
    synth = DemoSynthesizer(seed=0, image_size=8, modalities=["fundus"], variants=1)
    defense = create_defense("demonstrations", k=2, synthesizer=synth, paraphraser=_Rewriter())
    assert all(d.request.startswith("Reworded request") for d in defense.pool())
    assert [d.response for d in defense.pool()] == [d.response for d in synth.pool()]


def test_selection_key(synth: DemoSynthesizer) -> None:
    fixed = create_defense("demonstrations", strategy="mixed", k=4, synthesizer=synth)
    assert fixed.selection_key("a") == fixed.selection_key("b") and len(fixed.selection_key()) == 4
    retrieval = create_defense(
        "demonstrations", strategy="retrieval", k=2, synthesizer=synth, embedder=bag_of_words
    )
    pool = synth.pool()
    assert retrieval.selection_key(pool[0].request) != retrieval.selection_key(pool[-1].request)
