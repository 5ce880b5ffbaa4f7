"""How the ``hf`` chat backend (:mod:`medshield.models.hf_chat`) turns conversations into model
input: each conversation rendered by the model's own chat template and processor, the pixels'
autograd graph reattached, the batch collated, and the prefixes before the last user turn cached
(the module docstring of :mod:`medshield.models.hf_chat` describes all three).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medshield.errors import InputError
from medshield.models.chat import Conversation, check_conversation, load_image
from medshield.models.prefix_cache import (
    MIN_PREFIX_TOKENS,
    PrefixKV,
    batch_prefix_cache,
    image_digest,
    kv_of,
    output_cache,
    weights_fingerprint,
)

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
HEAD_MEMO = 64  # rendered prefixes whose token ids are remembered (oldest dropped first)


@dataclass
class _Encoded:
    """One conversation's processor outputs (batch of 1, on the model's device), its loaded
    images, and its cacheable prefix: ``prefix`` tokens holding the first ``prefix_images``
    images (0: none), with those images' digests."""

    inputs: dict[str, torch.Tensor]
    images: list[torch.Tensor]
    prefix: int = 0
    prefix_images: int = 0
    digests: tuple[bytes, ...] = ()


class HFInputs:
    """The input side of :class:`~medshield.models.hf_chat.HFChatVLM`, which sets what these
    methods read: ``model``, ``processor``, ``tokenizer``, ``device``, ``pad_token_id``,
    ``prefix_cache``, ``prefix_cache_unsupported``, ``_placeholders``, ``_head_ids`` and
    ``_prefix_kv``."""

    def _check_batch(self, conversations: Sequence[Conversation]) -> list[Conversation]:
        if isinstance(conversations, str) or not isinstance(conversations, Sequence):
            raise InputError("conversations must be a list of conversations (lists of Message)")
        if not conversations:
            raise InputError("no conversations given")
        checked = []
        for i, conversation in enumerate(conversations):
            try:
                checked.append(check_conversation(conversation))
            except InputError as e:
                raise InputError(f"conversation {i}: {e}") from None
        return checked

    def _encode(self, conversation: Conversation, index: int, keep_graph: bool) -> _Encoded:
        """One conversation -> processor outputs (batch of 1) on the model's device, its images
        and, while prefixes are cached, its prefix."""
        messages, images = [], []
        for m in conversation:
            for token in self._placeholders:
                if token in m.text:
                    raise InputError(
                        f"conversation {index}: message text contains the model's placeholder "
                        f"token {token!r}; pass images through Message.images"
                    )
            content: list[dict[str, str]] = []
            for image in m.images:
                try:
                    images.append(load_image(image))
                except InputError as e:
                    raise InputError(f"conversation {index}: {e}") from None
                content.append({"type": "image"})
            content.append({"type": "text", "text": m.text})
            messages.append({"role": m.role, "content": content})
        try:
            prompt = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja raises its own errors, e.g. "roles must alternate"
            raise InputError(
                f"conversation {index}: the model's chat template refused it: {e}"
            ) from e
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and prompt.startswith(bos))
        encoding = self._process(prompt, images, add_special, index)
        if keep_graph and any(im.requires_grad for im in images):
            self._attach_pixel_graph(encoding, images, index)
        dtype = self.model.dtype
        inputs = {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in encoding.items()
            if isinstance(v, torch.Tensor)
        }
        encoded = _Encoded(inputs, images)
        if self._uses_prefix_cache():
            self._split_prefix(encoded, messages, prompt, add_special, index)
        return encoded

    def _process(
        self, prompt: str, images: list[torch.Tensor], add_special: bool, index: int
    ) -> dict[str, Any]:
        """The processor's outputs for one rendered prompt and its images (detached)."""
        try:
            encoding = self.processor(
                text=[prompt],
                images=[[im.detach() for im in images]] if images else None,
                do_rescale=False,
                add_special_tokens=add_special,
                truncation=False,  # a tokenizer.json may carry truncation; the context check rules
                return_tensors="pt",
            )
        except (ValueError, TypeError, RuntimeError) as e:
            raise InputError(f"conversation {index}: the model's processor refused it: {e}") from e
        return dict(encoding)

    def _uses_prefix_cache(self) -> bool:
        """Prefixes are cached only when enabled, supported, and no weight requires grad."""
        return (
            self.prefix_cache
            and self.prefix_cache_unsupported is None
            and not any(p.requires_grad for p in self.model.parameters())
        )

    def _split_prefix(
        self, encoded: _Encoded, messages: list[dict], prompt: str, add_special: bool, index: int
    ) -> None:
        """Set ``encoded``'s prefix: the tokens the prompt shares with the template rendered for
        the turns before the last user turn, if they hold whole images that do not require grad.
        """
        if len(messages) < 2:
            return
        try:
            head = self.processor.apply_chat_template(messages[:-1], tokenize=False)
        except Exception:  # a template that refuses a conversation ending with the assistant
            return
        count = sum(item["type"] == "image" for m in messages[:-1] for item in m["content"])
        images = encoded.images[:count]
        if not prompt.startswith(head) or any(im.requires_grad for im in images):
            return
        digests = tuple(image_digest(im) for im in images)
        head_ids = self._head_ids.get((head, digests))
        if head_ids is None:
            head_ids = self._process(head, images, add_special, index)["input_ids"][0].tolist()
            if len(self._head_ids) >= HEAD_MEMO:
                self._head_ids.popitem(last=False)
            self._head_ids[(head, digests)] = head_ids
        ids = encoded.inputs["input_ids"][0].tolist()
        length, most = 0, min(len(head_ids), len(ids) - 1)  # at least one token left to run
        while length < most and ids[length] == head_ids[length]:
            length += 1
        image_token = self.model.config.image_token_id
        per_image = ids.count(image_token) // max(len(encoded.images), 1)
        if (
            length >= MIN_PREFIX_TOKENS
            and ids.count(image_token) == per_image * len(encoded.images)
            and ids[:length].count(image_token) == per_image * count
        ):
            encoded.prefix, encoded.prefix_images, encoded.digests = length, count, digests

    def _cached_prefixes(self, encodings: list[_Encoded]) -> list[tuple[PrefixKV, int, int] | None]:
        """Per conversation, (KV cache of its prefix, prefix tokens, prefix images), computing
        and keeping prefixes not cached yet; None for a conversation without a prefix."""
        self._prefix_kv.check(weights_fingerprint(self.model))
        found: list[tuple[PrefixKV, int, int] | None] = []
        for e in encodings:
            if not e.prefix:
                found.append(None)
                continue
            ids = e.inputs["input_ids"][:, : e.prefix]
            key = (tuple(ids[0].tolist()), e.digests)
            kv = self._prefix_kv.get(key)
            if kv is None:
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if e.prefix_images:
                    inputs |= {
                        k: v[: e.prefix_images] for k, v in e.inputs.items() if k not in TOKEN_KEYS
                    }
                with torch.no_grad():
                    out = self.model(**inputs, use_cache=True, logits_to_keep=1)
                kv = kv_of(output_cache(out))
                self._prefix_kv.put(key, kv)
            found.append((kv, e.prefix, e.prefix_images))
        return found

    def _behind_prefixes(
        self, encodings: list[_Encoded], side: str
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
        """Collate ``encodings`` (``side`` padding) behind their cached prefixes.

        Returns the batch of the tails (a conversation without a cached prefix is all tail) with
        an attention mask over prefix + tail, each row's prefix length (its tail's position
        offset), and the prefixes' KV cache (None when no row has one: then the batch is the
        plain collated one).
        """
        if any(e.prefix for e in encodings):
            hits = self._cached_prefixes(encodings)
        else:
            hits = [None] * len(encodings)
        tails = []
        for e, hit in zip(encodings, hits, strict=True):
            if hit is None:
                tails.append(e.inputs)
                continue
            tail = {}
            for key, value in e.inputs.items():
                if key in TOKEN_KEYS:
                    tail[key] = value[:, e.prefix :]
                elif len(value) > e.prefix_images:  # per image: the tail's images
                    tail[key] = value[e.prefix_images :]
            tails.append(tail)
        batch = self._collate(tails, side)
        past, prefix_mask = batch_prefix_cache(
            [None if hit is None else hit[0] for hit in hits], self.model.config, self.device
        )
        batch["attention_mask"] = torch.cat([prefix_mask, batch["attention_mask"]], dim=1)
        offsets = torch.tensor([0 if hit is None else hit[1] for hit in hits], device=self.device)
        return batch, offsets, past

    def _attach_pixel_graph(self, encoding: dict, images: list[torch.Tensor], index: int) -> None:
        """Replace detached ``pixel_values`` with ones computed from the grad-carrying tensors."""
        processed = self.processor.image_processor(images, do_rescale=False, return_tensors="pt")
        for key, value in processed.items():
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                continue
            old = encoding.get(key)
            if old is None or old.shape != value.shape:
                inside = None if old is None else tuple(old.shape)
                raise InputError(
                    f"conversation {index}: the image processor gave {key} of shape "
                    f"{tuple(value.shape)} on its own but {inside} inside the processor; "
                    "this model's pixels cannot be differentiated"
                )
            encoding[key] = value

    def _collate(self, encodings: list[dict], side: str) -> dict[str, torch.Tensor]:
        """Pad per-token tensors to one length (``side`` = "left"/"right"), concat the rest."""
        length = max(e["input_ids"].shape[1] for e in encodings)
        keys = list(dict.fromkeys(key for e in encodings for key in e))
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [e[key] for e in encodings if key in e]
            if key in TOKEN_KEYS:
                fill = self.pad_token_id if key == "input_ids" else 0
                padded = []
                for v in values:
                    pad = v.new_full((1, length - v.shape[1]), fill)
                    padded.append(torch.cat([pad, v] if side == "left" else [v, pad], dim=1))
                batch[key] = torch.cat(padded)
            else:  # per image (pixel_values, image_sizes, image_grid_thw, ...): in batch order
                batch[key] = torch.cat(values)
        return batch
