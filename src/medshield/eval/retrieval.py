"""Image-text retrieval (R@1/5/10) over a pooled set of modalities.

Every image of the given modalities gets one caption, drawn from its class's templates
(:meth:`Modality.sample_caption`) with a ``random.Random`` seeded by ``seed`` and the modality
name, so the captions do not depend on which other modalities are pooled. Image-to-text queries
rank the distinct captions of the pool (a caption drawn for many images is one candidate, else a
single wrong caption would fill every top-k slot); text-to-image queries rank all images.

Correctness: captions are made from labels, so many images share a caption and a caption fits
every image of its class equally well. A retrieved item is therefore **correct when it has the
same (modality, label) as the query**, not only when it is the query's own pair. The rank of a
query is the 0-based position of its best correct candidate when candidates are sorted by
similarity, with ties against incorrect candidates counted against the query (see
:func:`first_correct_rank`), so a model that outputs constant embeddings gets no credit.

Rows, one per query (``index`` is the image's row in the split, shared by its caption)::

    {"task": "retrieval_i2t", "modality": "blood_cell", "index": 3, "label": 5, "rank": 0}
    {"task": "retrieval_t2i", "modality": "blood_cell", "index": 3, "label": 5,
     "caption": "a peripheral blood cell image of a monocyte", "rank": 2}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medshield import data
from medshield.attacks.multimodal import MultimodalAttack
from medshield.errors import InputError
from medshield.eval.features import embed_images, embed_texts
from medshield.models.base import DualEncoder

QUERY_CHUNK = 1024  # queries per similarity block; bounds memory at QUERY_CHUNK x pool size


def first_correct_rank(
    similarity: np.ndarray | torch.Tensor,
    query_keys: Sequence[Any] | np.ndarray,
    candidate_keys: Sequence[Any] | np.ndarray,
) -> np.ndarray:
    """0-based rank of the first correct candidate of each query.

    Args:
        similarity: (Q, K) query-candidate similarities, higher is better.
        query_keys: (Q,) key of each query.
        candidate_keys: (K,) key of each candidate; a candidate is correct for a query when
            their keys are equal.

    Returns:
        (Q,) int64: the number of incorrect candidates whose similarity is at least that of the
        query's best correct candidate (ties with incorrect candidates count against the query,
        ties among correct candidates do not). A query without any correct candidate gets K,
        which no recall cut-off k <= K counts as a hit.
    """
    sim = similarity.detach().cpu().numpy() if isinstance(similarity, torch.Tensor) else similarity
    sim = np.asarray(sim)
    query_keys, candidate_keys = np.asarray(query_keys), np.asarray(candidate_keys)
    if sim.ndim != 2 or sim.shape != (len(query_keys), len(candidate_keys)):
        raise InputError(
            f"similarity must have shape (len(query_keys), len(candidate_keys)) = "
            f"({len(query_keys)}, {len(candidate_keys)}), got {sim.shape}"
        )
    correct = query_keys[:, None] == candidate_keys[None, :]
    best = np.where(correct, sim, -np.inf).max(axis=1, initial=-np.inf)
    # Without a correct candidate best is -inf, so every candidate counts: the rank is K.
    return ((sim >= best[:, None]) & ~correct).sum(axis=1).astype(np.int64)


def _ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_keys: np.ndarray,
    candidate_keys: np.ndarray,
) -> np.ndarray:
    """First-correct ranks of every query against every candidate, in query blocks."""
    return np.concatenate(
        [
            first_correct_rank(
                queries[start : start + QUERY_CHUNK] @ candidates.T,
                query_keys[start : start + QUERY_CHUNK],
                candidate_keys,
            )
            for start in range(0, len(queries), QUERY_CHUNK)
        ]
    )


def _pool(
    modalities: Sequence[str],
    split: str,
    per_class_cap: int | None,
    seed: int,
    data_dir: str | Path | None,
) -> tuple[list[dict[str, Any]], list[torch.Tensor], list[str], np.ndarray]:
    """Row metadata, [0, 1] images per modality (channel counts differ between modalities),
    one caption per image and (modality, label) keys."""
    if isinstance(modalities, str) or not modalities:
        raise InputError("modalities must be a non-empty list of modality names")
    meta: list[dict[str, Any]] = []
    images, captions, keys = [], [], []
    key_ids: dict[tuple[str, int], int] = {}
    seen: set[str] = set()
    for name in modalities:
        samples = data.load_split(name, split, data_dir)
        mod = samples.modality
        if mod.name in seen:
            raise InputError(f"modality {mod.name!r} is given twice in {list(modalities)}")
        seen.add(mod.name)
        indices = data.class_balanced_indices(samples.labels, per_class_cap, seed)
        rng = random.Random(f"{seed}:{mod.name}")
        for index, label in zip(indices, samples.labels[indices], strict=True):
            captions.append(mod.sample_caption(int(label), rng))
            keys.append(key_ids.setdefault((mod.name, int(label)), len(key_ids)))
            meta.append({"modality": mod.name, "index": int(index), "label": int(label)})
        images.append(samples.tensor(indices))
    return meta, images, captions, np.array(keys)


def _rows(
    task: str,
    meta: list[dict[str, Any]],
    image_queries: torch.Tensor,
    text_queries: torch.Tensor,
    image_gallery: torch.Tensor,
    text_gallery: torch.Tensor,
    captions: list[str],
    keys: np.ndarray,
    extra: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    first = [captions.index(c) for c in dict.fromkeys(captions)]  # one row per distinct caption
    i2t = _ranks(image_queries, text_gallery[first], keys, keys[first])
    t2i = _ranks(text_queries, image_gallery, keys, keys)
    extra = extra or [{} for _ in meta]
    return [
        {"task": f"retrieval_i2t{task}", **m, "rank": int(r)}
        for m, r in zip(meta, i2t, strict=True)
    ] + [
        {"task": f"retrieval_t2i{task}", **m, "caption": c, **e, "rank": int(r)}
        for m, c, e, r in zip(meta, captions, extra, t2i, strict=True)
    ]


def retrieval_rows(
    model: DualEncoder,
    modalities: Sequence[str],
    split: str = "test",
    per_class_cap: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Image-to-text and text-to-image retrieval over the pooled images of ``modalities``.

    Args:
        model: the dual encoder (left in the train/eval mode it was in).
        modalities: modality names to pool (at least one, no repeats).
        split: split of every modality.
        per_class_cap: keep at most this many images per class of each modality
            (:func:`medshield.data.class_balanced_indices`); None keeps all.
        seed: seed of the subsample and of the caption draw.
        data_dir: data root (see :func:`medshield.data.load_split`).
        batch_size: items per forward pass.

    Returns:
        ``retrieval_i2t`` rows (one per image), then ``retrieval_t2i`` rows (one per caption).

    Raises:
        InputError: no modality, or a modality given twice.
        DataError: a split cannot be loaded.
    """
    meta, images, captions, keys = _pool(modalities, split, per_class_cap, seed, data_dir)
    image_embeddings = torch.cat([embed_images(model, x, batch_size) for x in images])
    text_embeddings = embed_texts(model, captions, batch_size)
    return _rows(
        "",
        meta,
        image_embeddings,
        text_embeddings,
        image_embeddings,
        text_embeddings,
        captions,
        keys,
    )


def adversarial_retrieval_rows(
    model: DualEncoder,
    modalities: Sequence[str],
    attack: MultimodalAttack,
    split: str = "test",
    per_class_cap: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Retrieval with every query attacked by a multimodal attack on its image-caption pair.

    Each (image, caption) pair of the pool (the same pool and captions as
    :func:`retrieval_rows` with the same arguments) is perturbed together by ``attack``, as in
    the Co-Attack and SGA papers' retrieval evaluation: image-to-text queries are the
    adversarial images, ranked against the clean distinct captions; text-to-image queries are
    the adversarial captions, ranked against the clean images. Rows have tasks
    ``retrieval_i2t_adv`` / ``retrieval_t2i_adv``; text rows also record ``adv_caption``.

    Args:
        model: the dual encoder attacked and evaluated (white-box).
        modalities, split, per_class_cap, seed, data_dir: as in :func:`retrieval_rows`.
        attack: a multimodal attack, e.g. :class:`~medshield.attacks.CoAttack`.
        batch_size: pairs per attack call.
    """
    meta, images, captions, keys = _pool(modalities, split, per_class_cap, seed, data_dir)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    batches = [(x, start) for x in images for start in range(0, len(x), batch_size)]
    adv_embeddings, adv_captions = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, start in tqdm(batches, desc=f"retrieval under {attack.name}", unit="batch"):
            batch = x[start : start + batch_size]
            first = len(adv_captions)  # batches run in pool order, so captions line up
            result = attack(model, batch.to(device), captions[first : first + len(batch)])
            adv_embeddings.append(embed_images(model, result.images.detach().cpu()))
            adv_captions.extend(result.captions)
    clean_images = torch.cat([embed_images(model, x) for x in images])
    clean_texts = embed_texts(model, captions)
    return _rows(
        "_adv",
        meta,
        torch.cat(adv_embeddings),
        embed_texts(model, adv_captions),
        clean_images,
        clean_texts,
        captions,
        keys,
        extra=[{"adv_caption": c} for c in adv_captions],
    )
