"""Prefix KV caching for the local chat backends (``mini-llava`` and ``hf``).

A defended conversation repeats the same turns before the user's own turn: the synthetic
demonstrations of :class:`~medshield.defense.DemonstrationDefense` (user turns with an image and
an assistant answer), the system prompt, or an earlier dialogue. The backends split every
conversation at the start of its **last user turn**; what comes before it is the conversation's
*prefix*. The prefix's keys and values (the decoder's KV cache) are computed once, kept in a
:class:`PrefixCache`, and reused for every request with the same prefix; only the rest (the
*tail*: the user's turn, the generation prompt and, when scoring, the continuation) runs through
the decoder, batched behind the cached prefixes.

Cache key
    ``(token ids of the prefix, digests of the prefix's images)``: the ids hold one placeholder
    per image slot, so two prefixes with the same text but different images are told apart by
    :func:`image_digest` (a BLAKE2b hash of the image tensor's shape, dtype and bytes). A fixed
    demonstration set is one key; retrieval selection, which picks a set per request, gives one key
    per selected set.

Batching
    Rows may have different prefixes (retrieval) or none. :func:`batch_prefix_cache` left-pads
    each row's cached keys/values to the longest prefix of the batch and returns the matching
    attention mask, so the batch's layout is ``[pad | prefix | pad | tail]``; the tail's position
    ids continue from the row's own prefix length, which gives the same positions as a run
    without the cache.

Validity
    Entries hold for one set of weights. :func:`weights_fingerprint` (device, dtype and every
    parameter's in-place version counter) changes on an optimizer step, ``load_state_dict`` or
    any in-place edit of a parameter, and :meth:`PrefixCache.check` then drops every entry. The
    backends use the cache only while no parameter requires grad, and never for a prefix holding
    an image that requires grad (its gradient must reach the image). Memory is bounded by an
    entry count and a byte budget, least recently used entries first out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

PrefixKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One prefix's cached keys and values: per decoder layer, (keys, values) of shape
(1, kv_heads, prefix_length, head_dim)."""
PrefixKey = tuple[tuple[int, ...], tuple[bytes, ...]]
"""(token ids of the prefix, :func:`image_digest` of each of its images)."""

MIN_PREFIX_TOKENS = 4  # shorter prefixes are not worth an entry
#: The KV-cache argument of transformers' ``forward`` / ``generate`` (renamed in 5.x).
CACHE_ARG = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)


def image_digest(image: torch.Tensor) -> bytes:
    """A 16-byte BLAKE2b digest of an image tensor's shape, dtype and values."""
    tensor = image.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def weights_fingerprint(module: nn.Module) -> tuple[Any, ...]:
    """What cached activations of ``module`` depend on: the device and dtype of its parameters and
    their in-place version counters (bumped by optimizer steps, ``load_state_dict``, ...)."""
    params = list(module.parameters())
    head = (str(params[0].device), str(params[0].dtype)) if params else ()
    return (*head, hash(tuple(p._version for p in params)))


def kv_of(cache: Any) -> PrefixKV:
    """The per-layer (keys, values) of a transformers ``DynamicCache`` of batch size 1."""
    return tuple((layer.keys, layer.values) for layer in cache.layers)


class PrefixCache:
    """A bounded LRU of prefix KV caches (see the module docstring).

    Args:
        max_entries: the most prefixes kept.
        max_bytes: the most bytes of keys and values kept (a prefix larger than this is computed
            and used but not kept).

    Attributes:
        hits: lookups answered from the cache.
        misses: lookups that had to compute their prefix.
    """

    def __init__(self, max_entries: int = 16, max_bytes: int = 512 * 2**20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PrefixKey, PrefixKV] = OrderedDict()
        self._fingerprint: tuple[Any, ...] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        return sum(_nbytes(kv) for kv in self._entries.values())

    def clear(self) -> None:
        """Drop every entry (the hit and miss counts are kept)."""
        self._entries.clear()

    def check(self, fingerprint: tuple[Any, ...]) -> None:
        """Drop every entry if the weights changed since the entries were computed."""
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint

    def get(self, key: PrefixKey) -> PrefixKV | None:
        """The cached prefix for ``key`` (marked most recently used), or None."""
        kv = self._entries.get(key)
        if kv is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return kv

    def put(self, key: PrefixKey, kv: PrefixKV) -> None:
        """Keep ``kv`` for ``key``, evicting least recently used entries to stay in bounds."""
        size = _nbytes(kv)
        if size > self.max_bytes or self.max_entries < 1:
            return
        self._entries.pop(key, None)
        held = self.nbytes
        while self._entries and (
            len(self._entries) >= self.max_entries or held + size > self.max_bytes
        ):
            _, old = self._entries.popitem(last=False)
            held -= _nbytes(old)
        self._entries[key] = kv


def _nbytes(kv: PrefixKV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def batch_prefix_cache(
    entries: Sequence[PrefixKV | None], config: Any, device: torch.device
) -> tuple[Any, torch.Tensor]:
    """One batch's KV cache from per-row cached prefixes (None: the row has no cached prefix).

    Each row's keys/values are left-padded to the longest prefix P with zeros that the returned
    (batch, P) attention mask hides. Returns ``(None, (batch, 0) mask)`` when no row has a
    prefix.

    Args:
        entries: per row, a prefix from :class:`PrefixCache` or None.
        config: the decoder's model config (``DynamicCache`` reads its layer types from it).
        device: where the mask goes.
    """
    lengths = [0 if kv is None else kv[0][0].shape[-2] for kv in entries]
    longest = max(lengths, default=0)
    mask = torch.zeros((len(entries), longest), dtype=torch.long, device=device)
    if not longest:
        return None, mask
    from transformers import DynamicCache

    template = next(kv for kv in entries if kv is not None)
    layers = []
    for layer, (k0, v0) in enumerate(template):
        keys = k0.new_zeros((len(entries), k0.shape[1], longest, k0.shape[3]))
        values = v0.new_zeros((len(entries), v0.shape[1], longest, v0.shape[3]))
        for row, (kv, n) in enumerate(zip(entries, lengths, strict=True)):
            if kv is not None:
                keys[row, :, longest - n :] = kv[layer][0][0]
                values[row, :, longest - n :] = kv[layer][1][0]
        layers.append((keys, values))
    for row, n in enumerate(lengths):
        mask[row, longest - n :] = 1
    return DynamicCache(layers, config=config), mask


def cache_inputs(past: Any) -> dict[str, Any]:
    """``{name: past}`` for a transformers ``forward`` or ``generate``: newer releases call the
    KV cache ``cache`` (and warn on every call that passes ``past_key_values``), older ones
    ``past_key_values``; the name their model outputs use tells which."""
    return {CACHE_ARG: past}


def output_cache(output: Any) -> Any:
    """The KV cache of a transformers model output, under either name (None when absent)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
