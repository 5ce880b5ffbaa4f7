"""The items a red-teaming run sends: loaded from the configured source, subsampled, and paired
with the attacks that run on them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from medshield.commands.redteam.config import BENIGN_ATTACK, RedteamConfig
from medshield.errors import ConfigError


def load_items(config: RedteamConfig) -> list[Any]:
    """Every item of ``config.source`` in the configured modalities (duplicates dropped)."""
    from medshield.data.safety import load_safety_items

    modalities: Sequence[str | None] = config.modalities or [None]
    items: dict[str, Any] = {}
    for modality in modalities:
        for item in load_safety_items(
            config.source,
            modality=modality,
            data_dir=config.data_dir,
            path=config.query_file,
            **config.source_options,
        ):
            items.setdefault(item.id, item)
    if not items:
        source = config.query_file or repr(config.source)
        raise ConfigError(f"source {source} gave no items for modalities {modalities}")
    return list(items.values())


def select_items(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """At most ``limit`` harmful, ``limit`` plain benign and ``limit`` near-miss benign items, in
    their original order.

    Harmful items are a seeded random sample (so a small limit still spans modalities and
    categories); benign items are first the twins of the chosen harmful ones, then a seeded
    sample of the rest; near-miss items (``subset`` ``"near_miss"``) likewise, apart from the
    plain benign ones, first those whose harmful twin was chosen.
    """
    if limit is None:
        return list(items)
    from medshield.data.safety import NEAR_MISS

    rng = random.Random(f"redteam-select\x1f{seed}")
    harmful = [i for i in items if i.kind == "harmful"]
    chosen_harmful = rng.sample(harmful, min(limit, len(harmful)))
    keep = {i.id for i in chosen_harmful}
    twins = {i.twin_id for i in chosen_harmful if i.twin_id}
    near_miss = [i for i in items if i.kind == "benign" and i.subset == NEAR_MISS]
    plain = [i for i in items if i.kind == "benign" and i.subset != NEAR_MISS]
    for benign in (plain, near_miss):
        first = [i for i in benign if i.id in twins or i.twin_id in keep]
        rest = [i for i in benign if i.id not in {f.id for f in first}]
        keep |= {i.id for i in (first + rng.sample(rest, len(rest)))[:limit]}
    return [i for i in items if i.id in keep]


def plan(items: Sequence[Any], attacks: Sequence[str]) -> list[tuple[Any, str]]:
    """Every (item, attack) to run: harmful items under each attack, benign ones ``direct``.

    Grouped by attack (``direct`` first, with the benign items), so a batch holds one attack
    and its per-row latency is that attack's.
    """
    order = list(dict.fromkeys([BENIGN_ATTACK, *attacks]))
    work = []
    for attack in order:
        for item in items:
            if (item.kind == "harmful" and attack in attacks) or (
                item.kind != "harmful" and attack == BENIGN_ATTACK
            ):
                work.append((item, attack))
    return work
