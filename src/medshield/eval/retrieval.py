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

from medshield import data
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
    if isinstance(modalities, str) or not modalities:
        raise InputError("modalities must be a non-empty list of modality names")
    meta: list[dict[str, Any]] = []
    image_embeddings, captions, keys = [], [], []
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
            caption = mod.sample_caption(int(label), rng)
            captions.append(caption)
            keys.append(key_ids.setdefault((mod.name, int(label)), len(key_ids)))
            meta.append({"modality": mod.name, "index": int(index), "label": int(label)})
        image_embeddings.append(embed_images(model, samples.tensor(indices), batch_size))

    images = torch.cat(image_embeddings)
    texts = embed_texts(model, captions, batch_size)
    key_array = np.array(keys)
    first = [captions.index(c) for c in dict.fromkeys(captions)]  # one row per distinct caption
    i2t = _ranks(images, texts[first], key_array, key_array[first])
    t2i = _ranks(texts, images, key_array, key_array)
    return [
        {"task": "retrieval_i2t", **m, "rank": int(r)} for m, r in zip(meta, i2t, strict=True)
    ] + [
        {"task": "retrieval_t2i", **m, "caption": c, "rank": int(r)}
        for m, c, r in zip(meta, captions, t2i, strict=True)
    ]
