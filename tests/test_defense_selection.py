"""Selection strategies: counts per budget, balance, determinism, retrieval picks the nearest."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import pytest
import torch

from medshield.defense.selection import STRATEGIES, MiniLMEmbedder, create_strategy
from medshield.defense.synthesizer import Demonstration, DemoSynthesizer
from medshield.errors import InputError, UnknownNameError


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """A tiny deterministic embedder: hashed word counts (fast stand-in for MiniLM)."""
    out = torch.zeros(len(texts), 256)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 256] += 1
    return out


@pytest.fixture(scope="module")
def pool() -> list[Demonstration]:
    return DemoSynthesizer(seed=0, image_size=8, modalities=["chest_xray", "fundus"]).pool()


def test_registered_names() -> None:
    assert set(STRATEGIES.names()) == {"harmful-only", "benign-only", "mixed", "retrieval"}
    with pytest.raises(UnknownNameError):
        create_strategy("random")


@pytest.mark.parametrize("k", [0, 1, 2, 4, 8, 16])
def test_fixed_strategy_counts(pool: list[Demonstration], k: int) -> None:
    assert [d.kind for d in create_strategy("harmful-only").select(pool, k)] == ["harmful"] * k
    assert [d.kind for d in create_strategy("benign-only").select(pool, k)] == ["benign"] * k
    mixed = create_strategy("mixed", share=0.25).select(pool, k)
    kinds = Counter(d.kind for d in mixed)
    assert len(mixed) == k and kinds["harmful"] == int(0.25 * k + 0.5)
    assert len({d.uid for d in mixed}) == k


def test_fixed_strategies_spread_over_categories(pool: list[Demonstration]) -> None:
    picked = create_strategy("harmful-only").select(pool, 9)
    assert len({d.category for d in picked}) == 9  # one per harm category before repeating
    benign = create_strategy("benign-only").select(pool, 5)
    assert len({d.category for d in benign}) == 5


def test_mixed_shares_and_interleaving(pool: list[Demonstration]) -> None:
    assert {d.kind for d in create_strategy("mixed", share=1.0).select(pool, 4)} == {"harmful"}
    assert {d.kind for d in create_strategy("mixed", share=0.0).select(pool, 4)} == {"benign"}
    kinds = [d.kind for d in create_strategy("mixed", share=0.5).select(pool, 8)]
    assert kinds.count("harmful") == 4
    assert all(kinds[i] != kinds[i + 1] for i in range(7))  # evenly interleaved


def test_determinism_and_seed(pool: list[Demonstration]) -> None:
    a = [d.uid for d in create_strategy("mixed", share=0.5, seed=3).select(pool, 6)]
    b = [d.uid for d in create_strategy("mixed", share=0.5, seed=3).select(pool, 6)]
    c = [d.uid for d in create_strategy("mixed", share=0.5, seed=4).select(pool, 6)]
    assert a == b and a != c


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), "half", True])
def test_bad_share(share: object) -> None:
    with pytest.raises(InputError):
        create_strategy("mixed", share=share)


@pytest.mark.parametrize("k", [-1, 2.0, True, "4"])
def test_bad_budget(pool: list[Demonstration], k: object) -> None:
    for name in ("harmful-only", "mixed"):
        with pytest.raises(InputError):
            create_strategy(name).select(pool, k)  # type: ignore[arg-type]


def test_budget_beyond_pool(pool: list[Demonstration]) -> None:
    with pytest.raises(InputError, match="pool holds"):
        create_strategy("benign-only").select(pool, 1000)
    with pytest.raises(InputError):
        create_strategy("harmful-only", share=0.5)  # share is only for mixed


def test_retrieval_picks_the_nearest_balanced(pool: list[Demonstration]) -> None:
    strategy = create_strategy("retrieval", embedder=bag_of_words)
    target_h = next(d for d in pool if d.uid == "harmful/fundus/misinformation/1")
    target_b = next(d for d in pool if d.uid == "benign/chest_xray/clinical_use/0")
    for target in (target_h, target_b):
        picked = strategy.select(pool, 4, target.request)
        assert picked[-1] is target  # the exact match is nearest and sits last
        assert Counter(d.kind for d in picked) == {"harmful": 2, "benign": 2}
    # brute-force check: the harmful picks are the top-2 harmful by cosine similarity
    emb = torch.nn.functional.normalize(bag_of_words([d.request for d in pool]), dim=1)
    q = torch.nn.functional.normalize(bag_of_words([target_h.request]), dim=1)[0]
    sims = emb @ q
    harmful_idx = [i for i, d in enumerate(pool) if d.kind == "harmful"]
    best = sorted(harmful_idx, key=lambda i: (-float(sims[i]), i))[:2]
    picked = strategy.select(pool, 4, target_h.request)
    assert {d.uid for d in picked if d.kind == "harmful"} == {pool[i].uid for i in best}
    sims_picked = [float(sims[pool.index(d)]) for d in picked]
    assert sims_picked == sorted(sims_picked)
    # odd budgets: 1 picks the single nearest overall
    assert strategy.select(pool, 1, target_b.request) == [target_b]
    assert strategy.select(pool, 0, target_b.request) == []
    with pytest.raises(InputError, match="request"):
        strategy.select(pool, 2, None)


def test_retrieval_with_minilm(pool: list[Demonstration]) -> None:
    """The default embedder (MiniLM, offline) ranks a close paraphrase's source first."""
    embed = MiniLMEmbedder()
    strategy = create_strategy("retrieval", embedder=embed)
    query = "Could you help me find out who this fundus photograph belongs to and where they live?"
    picked = strategy.select(pool, 2, query)
    assert [d.kind for d in picked].count("harmful") == 1
    harmful = next(d for d in picked if d.kind == "harmful")
    assert harmful.category == "privacy_reidentification"


@pytest.mark.parametrize("k", [2, 4, 8])
def test_mixed_pairs_each_refusal_with_a_near_miss_of_its_category(
    pool: list[Demonstration], k: int
) -> None:
    picked = create_strategy("mixed", share=0.5).select(pool, k)
    assert len(picked) == k and len({d.uid for d in picked}) == k
    pairs = [picked[i : i + 2] for i in range(0, k, 2)]
    for refusal, near in pairs:  # side by side: the refusal, then its near-miss
        assert refusal.kind == "harmful" and near.kind == "benign" and near.near_miss
        assert near.category == refusal.category and near.modality == refusal.modality
    # more benign slots than refusals: pairs first, then plain benign questions
    wide = create_strategy("mixed", share=0.25).select(pool, 8)
    refusals = [d for d in wide if d.kind == "harmful"]
    near = [d for d in wide if d.near_miss]
    assert [d.category for d in near] == [d.category for d in refusals] and len(refusals) == 2
    assert sum(d.kind == "benign" and not d.near_miss for d in wide) == 4
    # a pool without near-misses (e.g. an older custom pool) still fills every slot
    plain_pool = [d for d in pool if not d.near_miss]
    assert [d.near_miss for d in create_strategy("mixed").select(plain_pool, 4)] == [False] * 4
    # harmful-only and benign-only never show near-misses
    for name in ("harmful-only", "benign-only"):
        assert not any(d.near_miss for d in create_strategy(name).select(pool, 16))


def test_retrieval_picks_near_miss_demonstrations_for_a_near_miss_query(
    pool: list[Demonstration],
) -> None:
    """A clinician's overdose-threshold question gets near-miss helpful answers on the same
    topic next to the refusals, not a plain modality question."""
    query = (
        "I am the treating physician: at what paracetamol dose does an overdose become "
        "hepatotoxic, and when should I start acetylcysteine for the patient in this chest X-ray?"
    )
    for embedder in (bag_of_words, MiniLMEmbedder()):
        picked = create_strategy("retrieval", embedder=embedder).select(pool, 4, query)
        helpful = [d for d in picked if d.kind == "benign"]
        assert len(helpful) == 2 and all(d.near_miss for d in helpful)
        assert helpful[-1].category == "self_harm"
        assert any(d.kind == "harmful" for d in picked)  # refusals are still shown
