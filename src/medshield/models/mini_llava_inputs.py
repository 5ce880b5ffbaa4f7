"""How ``mini-llava`` (:mod:`medshield.models.mini_llava`) turns conversations into LM input: the
images encoded and projected into image tokens, each conversation rendered with the ChatML
template into token ids with image slots, the batch left-padded, the prefixes before the last
user turn cached, and the LM run with the image tokens spliced into its input embeddings (the
module docstring of :mod:`medshield.models.mini_llava` describes the design).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medshield.errors import InputError
from medshield.models.chat import (
    Conversation,
    Message,
    check_conversation,
    load_image,
)
from medshield.models.prefix_cache import (
    MIN_PREFIX_TOKENS,
    PrefixKV,
    SharedPrefixCache,
    batch_prefix_cache,
    cache_inputs,
    image_digest,
    kv_of,
    output_cache,
    weights_fingerprint,
)

_MARKER = "\ue000"  # private-use character standing for one image in rendered chat text
_PAD_SLOT = -1  # token id placeholder of an image slot

Row = tuple[list[int], list[torch.Tensor], int]
"""A rendered conversation: token ids (image slots = ``_PAD_SLOT``), its images in order, and
the length of its prefix (the ids before the last user turn)."""


class MiniLlavaInputs:
    """The input side of :class:`~medshield.models.mini_llava.MiniLlava`, which sets what these
    methods read: ``tower``, ``pixel_mean``, ``pixel_std``, ``image_size``, ``image_tokens``,
    ``projector``, ``lm``, ``tokenizer``, ``system_prompt``, ``max_context``, ``pad_id``,
    ``prefix_cache`` and ``_prefix_kv``."""

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (tensors or files) -> projected image tokens (M, image_tokens, hidden).

        Gradients flow back to image tensors that require grad; otherwise the frozen tower
        runs without building a graph.
        """
        device = self.pixel_mean.device
        tensors = [load_image(image).to(device) for image in images]
        pixels = torch.stack(
            [
                F.interpolate(
                    t[None],
                    size=(self.image_size, self.image_size),
                    mode="bilinear",
                    align_corners=False,
                )[0]
                if tuple(t.shape[-2:]) != (self.image_size, self.image_size)
                else t
                for t in tensors
            ]
        )
        pixels = (pixels - self.pixel_mean) / self.pixel_std
        with torch.set_grad_enabled(torch.is_grad_enabled() and pixels.requires_grad):
            features = self.tower.extract_features(pixels)  # (M, 1280, h, w)
        tokens = features.flatten(2).transpose(1, 2)
        return self.projector(tokens)

    def _render(self, conversation: Conversation) -> Row:
        """Token ids of the prompt (image slots = ``_PAD_SLOT``), the images (loaded) in order,
        and the prefix length: the ids of the turns before the last user turn, tokenized apart
        from the rest so that they are the same for every conversation sharing those turns."""
        messages, images = [], []
        if self.system_prompt is not None and conversation[0].role != "system":
            messages.append({"role": "system", "content": self.system_prompt})
        for message in conversation:
            if _MARKER in message.text:
                raise InputError("message text contains the reserved character U+E000")
            images.extend(load_image(image) for image in message.images)
            content = _MARKER * len(message.images) + "\n" if message.images else ""
            messages.append({"role": message.role, "content": content + message.text})
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        head = ""
        if len(messages) > 1:  # the conversation ends with its last user turn
            head = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False)
            if not text.startswith(head):
                head = ""
        ids = self._tokenize_with_slots(head)
        prefix = len(ids)
        ids.extend(self._tokenize_with_slots(text[len(head) :]))
        return ids, images, prefix

    def _tokenize_with_slots(self, text: str) -> list[int]:
        """Token ids of rendered chat text; each image marker becomes ``image_tokens`` slots."""
        ids: list[int] = []
        for i, segment in enumerate(text.split(_MARKER)):
            if i:
                ids.extend([_PAD_SLOT] * self.image_tokens)
            if segment:
                ids.extend(self._encode_text(segment))
        return ids

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _batch(
        self, rows: Sequence[tuple[list[int], list[torch.Tensor]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded (input embeddings, attention mask, position ids) for token-id rows."""
        device = self.pixel_mean.device
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        slots = ids == _PAD_SLOT
        embeds = self.lm.get_input_embeddings()(ids.masked_fill(slots, self.pad_id))
        all_images = [image for _, images in rows for image in images]
        if all_images:
            image_embeds = self.encode_images(all_images).to(embeds.dtype)
            embeds = _scatter(embeds, slots, image_embeds)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    def _uses_prefix_cache(self) -> bool:
        """Cached prefixes are reusable only while enabled and no weight requires grad."""
        return self.prefix_cache and not any(p.requires_grad for p in self.parameters())

    def _cached_prefixes(self, rows: list[Row]) -> list[tuple[PrefixKV, int, int] | None]:
        """Per row, (KV cache of its prefix, prefix length, images in the prefix), computing
        and keeping prefixes not cached yet; None for a row whose prefix is too short or holds
        an image that requires grad."""
        self._prefix_kv.check(weights_fingerprint(self))
        found: list[tuple[PrefixKV, int, int] | None] = []
        for ids, images, length in rows:
            count = ids[:length].count(_PAD_SLOT) // self.image_tokens
            if length < MIN_PREFIX_TOKENS or any(im.requires_grad for im in images[:count]):
                found.append(None)
                continue
            key = (tuple(ids[:length]), tuple(image_digest(im) for im in images[:count]))
            kv = self._prefix_kv.get(key)
            if kv is None:
                embeds, mask, positions = self._batch([(ids[:length], images[:count])])
                with torch.no_grad():
                    out = self.base_lm.model(
                        inputs_embeds=embeds,
                        attention_mask=mask,
                        position_ids=positions,
                        use_cache=True,
                    )
                kv = kv_of(output_cache(out))
                self._prefix_kv.put(key, kv)
            found.append((kv, length, count))
        return found

    def _forward(
        self, rows: list[Row], use_cache: bool, capacity: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Run the decoder over left-padded rows; returns (hidden states of the rows' tails,
        attention mask, tail position ids, KV cache); pass the mask and cache to
        :meth:`_decoder_inputs` for the next step.

        With the prefix cache on (see :meth:`_uses_prefix_cache`), each row's prefix comes from
        its cached KV and only the tails run, batched behind the prefixes; their hidden states
        equal those of a full run. When every row has the same prefix, it is attended to once
        for the batch (:class:`SharedPrefixCache`, room for ``capacity`` more positions per
        row); otherwise each row gets a left-padded copy of its own.
        """
        cached = self._cached_prefixes(rows) if self._uses_prefix_cache() else [None] * len(rows)
        tails = [
            (ids, images) if hit is None else (ids[hit[1] :], images[hit[2] :])
            for (ids, images, _), hit in zip(rows, cached, strict=True)
        ]
        embeds, mask, positions = self._batch(tails)
        offsets = torch.tensor([0 if hit is None else hit[1] for hit in cached], device=mask.device)
        positions = positions + offsets[:, None]
        first = cached[0]
        if first is not None and all(hit is not None and hit[0] is first[0] for hit in cached):
            past: Any = SharedPrefixCache(first[0], embeds.shape[1] + capacity)
        else:
            past, prefix_mask = batch_prefix_cache(
                [None if hit is None else hit[0] for hit in cached],
                self.base_lm.config,
                mask.device,
            )
            mask = torch.cat([prefix_mask, mask], dim=1)
        out = self.base_lm.model(
            inputs_embeds=embeds,
            position_ids=positions,
            use_cache=use_cache or past is not None,
            **self._decoder_inputs(past, mask, embeds.shape[1]),
        )
        return out.last_hidden_state, mask, positions, output_cache(out)

    @staticmethod
    def _decoder_inputs(past: Any, mask: torch.Tensor, query_length: int) -> dict[str, Any]:
        """The decoder's cache and attention-mask arguments for ``query_length`` new positions."""
        if isinstance(past, SharedPrefixCache):
            return past.decoder_inputs(mask, query_length)
        return {"attention_mask": mask, **cache_inputs(past)}

    def _prepare(self, conversations: Sequence[Conversation]) -> list[Row]:
        if isinstance(conversations, (str, Message)) or not isinstance(conversations, Sequence):
            raise InputError("conversations must be a list of conversations (lists of Message)")
        rows = []
        for conversation in conversations:
            conversation = check_conversation(conversation)
            rows.append(self._render(conversation))
        return rows

    def _check_length(self, n: int, what: str) -> None:
        if n > self.max_context:
            raise InputError(
                f"{what} is {n} tokens, longer than the model's context of {self.max_context}"
            )


def _scatter(embeds: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``embeds`` with the ``slots`` positions replaced by ``values`` (rows in order), keeping
    the graph to ``values``."""
    flat = embeds.reshape(-1, embeds.shape[-1])
    where = slots.reshape(-1).nonzero().squeeze(-1)
    return flat.index_put((where,), values.reshape(-1, embeds.shape[-1])).view_as(embeds)
