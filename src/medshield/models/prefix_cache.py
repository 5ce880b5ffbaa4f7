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

Shared prefix (``mini-llava``)
    When every row of a batch sits behind the same prefix (a fixed demonstration set, or just
    the system turn), copying it into each row makes decoding memory-bound: each new token
    attends over the whole prefix once per row, transformers' ``DynamicCache`` concatenates the
    whole cache at every step, and sdpa with a padding mask repeats the keys/values for every
    query head of a group. :class:`SharedPrefixCache` keeps the prefix once and the rows' own
    positions in preallocated buffers; :func:`shared_prefix_attention` (installed by
    :func:`use_shared_prefix_attention` as a transformers attention implementation, sdpa in
    every other call) reads the prefix once for the whole batch. This took the defended cost at
    k = 8 with a **fixed** demonstration set from 1.35-1.47x to 1.17-1.30x the undefended one
    (``benchmarks/prefix_cache.py``). Retrieval gains only when a selected set repeats: a new
    set is computed like an uncached prefix, and a batch of different sets gets per-row copies.
    The ``hf`` backend hands its cache to ``model.generate`` and keeps per-row copies.

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

from medshield.errors import InputError

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
        max_entries: the most prefixes kept (at least 1; a backend's ``prefix_cache_entries``).
        max_bytes: the most bytes of keys and values kept (a prefix larger than this is computed
            and used but not kept).

    Attributes:
        hits: lookups answered from the cache.
        misses: lookups that had to compute their prefix.
    """

    def __init__(self, max_entries: int = 16, max_bytes: int = 512 * 2**20) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise InputError(
                f"prefix_cache_entries must be an integer >= 1, got {max_entries!r} "
                "(prefix_cache=False turns caching off)"
            )
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
        if size > self.max_bytes:
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


SHARED_PREFIX_ATTENTION = "medshield_shared_prefix"
"""The attention implementation :func:`use_shared_prefix_attention` installs: transformers'
``sdpa``, except in calls that pass ``shared_prefix`` (see :class:`SharedPrefixCache`)."""


class SharedPrefixCache:
    """The decoder KV cache of a batch whose rows all sit behind one cached prefix.

    :func:`batch_prefix_cache` copies the prefix into every row and lets transformers'
    ``DynamicCache`` grow by concatenation; behind a long prefix (k demonstrations) that makes
    decoding memory-bound: every step copies the whole cache and, with a padding mask, sdpa
    repeats the keys/values for each query head of a group. Here the prefix's keys/values are
    kept **once** (batch 1) and only the rows' own positions (tail and generated tokens) go into
    buffers preallocated for ``capacity`` positions. :func:`shared_prefix_attention` attends to
    both: the prefix is visible to every query, the rows' positions through the 4-D mask of
    :meth:`attention_mask` (padding and causality). The result equals that of a full run.

    Pass it to the decoder with :meth:`decoder_inputs` (the cache, ``shared_prefix`` and the
    mask); the decoder must use :func:`use_shared_prefix_attention`.

    Args:
        prefix: the shared prefix, from :class:`PrefixCache`.
        capacity: the most row positions (tail + new tokens) this cache will hold.
    """

    def __init__(self, prefix: PrefixKV, capacity: int) -> None:
        self.prefix = prefix
        self.capacity = capacity
        self._keys: list[torch.Tensor | None] = [None] * len(prefix)
        self._values: list[torch.Tensor | None] = [None] * len(prefix)
        self._filled = [0] * len(prefix)

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one layer's new keys/values (batch, kv_heads, n, head_dim); return all of
        that layer's row positions so far (the prefix is read by the attention itself)."""
        start = self._filled[layer_idx]
        end = start + keys.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"SharedPrefixCache holds {self.capacity} positions, {end} needed")
        if self._keys[layer_idx] is None:
            shape = (keys.shape[0], keys.shape[1], self.capacity, keys.shape[3])
            self._keys[layer_idx] = keys.new_empty(shape)
            self._values[layer_idx] = values.new_empty(shape)
        stored_keys, stored_values = self._keys[layer_idx], self._values[layer_idx]
        stored_keys[:, :, start:end] = keys
        stored_values[:, :, start:end] = values
        self._filled[layer_idx] = end
        return stored_keys[:, :, :end], stored_values[:, :, :end]

    def attention_mask(self, mask: torch.Tensor, query_length: int) -> torch.Tensor:
        """The (batch, 1, query_length, n) boolean mask over the rows' n positions for queries
        that are the last ``query_length`` of them: ``mask`` (batch, n; 0 = padding) and causal."""
        n = mask.shape[1]
        keys = torch.arange(n, device=mask.device)
        queries = torch.arange(n - query_length, n, device=mask.device)
        causal = keys[None, :] <= queries[:, None]
        return mask.bool()[:, None, None, :] & causal[None, None]

    def decoder_inputs(self, mask: torch.Tensor, query_length: int) -> dict[str, Any]:
        """Keyword arguments for the decoder's ``forward``: the cache (under
        :data:`CACHE_ARG`), ``shared_prefix`` and the 4-D attention mask."""
        return {
            CACHE_ARG: self,
            "shared_prefix": self,
            "attention_mask": self.attention_mask(mask, query_length),
        }


def shared_prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prefix: SharedPrefixCache | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a :class:`SharedPrefixCache`'s prefix and the rows' own positions
    (``key``/``value``, masked by ``attention_mask``); without ``shared_prefix``, transformers'
    sdpa. Shapes: query (batch, heads, q, head_dim), key/value (batch, kv_heads, n, head_dim);
    returns (batch, q, heads, head_dim) like every transformers attention function.

    Grouped query heads are folded into the query length, so the prefix's keys/values are read
    once for the whole batch and never repeated per head; one softmax runs over prefix and rows.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, q, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    prefix_keys, prefix_values = shared_prefix.prefix[module.layer_idx]  # (1, kv_heads, P, dim)
    p = prefix_keys.shape[2]
    grouped = query.reshape(batch, kv_heads, group * q, dim)
    # prefix: (kv_heads, batch * group * q, dim) @ (kv_heads, dim, P), one matmul per kv head
    folded = grouped.transpose(0, 1).reshape(kv_heads, batch * group * q, dim)
    prefix_scores = torch.matmul(folded, prefix_keys[0].transpose(1, 2)) * scale
    prefix_scores = prefix_scores.view(kv_heads, batch, group * q, p).transpose(0, 1)
    row_scores = torch.matmul(grouped, key.transpose(2, 3)) * scale  # (batch, kv, group*q, n)
    if attention_mask is not None:
        hidden = ~attention_mask.view(batch, 1, 1, q, n)
        row_scores = row_scores.view(batch, kv_heads, group, q, n).masked_fill(hidden, -torch.inf)
        row_scores = row_scores.view(batch, kv_heads, group * q, n)
    scores = torch.cat([prefix_scores, row_scores], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    prefix_weights = weights[..., :p].transpose(0, 1).reshape(kv_heads, batch * group * q, p)
    out = torch.matmul(prefix_weights, prefix_values[0])  # (kv_heads, batch * group * q, dim)
    out = out.view(kv_heads, batch, group * q, dim).transpose(0, 1)
    out = out + torch.matmul(weights[..., p:], value)  # (batch, kv_heads, group * q, dim)
    return out.reshape(batch, heads, q, dim).transpose(1, 2).contiguous(), None


def use_shared_prefix_attention(model: Any) -> None:
    """Make a transformers model's attention :func:`shared_prefix_attention` (registered under
    :data:`SHARED_PREFIX_ATTENTION`, with sdpa's masks): sdpa in every call, except those that
    pass a :class:`SharedPrefixCache` as ``shared_prefix``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SHARED_PREFIX_ATTENTION)
