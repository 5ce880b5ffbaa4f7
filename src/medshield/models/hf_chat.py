"""``hf``: a transformers image-text-to-text model from a local directory as a :class:`ChatVLM`.

The directory is a Hugging Face checkpoint of a generative VLM that
``AutoModelForImageTextToText`` and ``AutoProcessor`` can read: the LLaVA family
(``llava-hf/llava-1.5-7b-hf``, LLaVA-Med ports), Qwen2-VL / Qwen2.5-VL, Gemma 3 / MedGemma, ...
Fetch one on a machine with internet with ``huggingface-cli download REPO --local-dir DIR`` and
pass ``DIR``; nothing is downloaded here and ``trust_remote_code`` is never enabled.

How a conversation becomes model input
--------------------------------------
* Every :class:`~medshield.models.chat.Message` becomes ``{"role": ..., "content": [...]}`` with
  one ``{"type": "image"}`` item per image (images first, then ``{"type": "text"}``), and the
  model's **own chat template** (``processor.apply_chat_template``) renders the prompt with the
  generation prompt appended. Text that already contains the model's image placeholder token is
  rejected (it would desynchronise images and placeholders).
* Images (tensors or files) go through :func:`~medshield.models.chat.load_image` to float
  (3, H, W) tensors in [0, 1] and then through the model's own processor with
  ``do_rescale=False``, so files and tensors follow one path.
* Each conversation is encoded on its own and the batch is collated here: **left** padding for
  :meth:`HFChatVLM.generate` (the model derives positions from the attention mask), **right**
  padding for :meth:`HFChatVLM.score` (positions then equal those of a single conversation).

Gradients through the pixels
----------------------------
transformers 5 image processors run on torch (torchvision backend): resize, centre crop, rescale
and normalise are torch ops on the tensor. The processor's ``__call__`` however reads the processed
pixels with numpy to count image placeholders, which fails on tensors that require grad. So each
conversation is tokenised with *detached* copies of its images, and when any image requires grad
the image processor alone is run again on the original tensors and its ``pixel_values`` (which
keep the autograd graph back to the input tensors) replace the detached ones. The model's own
weights are frozen (``requires_grad_(False)``), so the graph built by :meth:`HFChatVLM.score`
reaches only the image tensors; without such images ``score`` runs under ``torch.no_grad``.

Prefix caching
--------------
Every conversation is split at the start of its last user turn; the KV cache of what comes
before it (a system prompt, an earlier dialogue, the synthetic demonstrations of the
``demonstrations`` defense with their images) is computed once per distinct prefix (token ids +
image digests, see :mod:`medshield.models.prefix_cache`) and reused: only the rest runs, batched
behind the cached prefixes (``generate`` passes them to ``model.generate`` as
``past_key_values`` with the tail's ids and an attention mask over prefix + tail; ``score`` runs
the tails with explicit position ids). The prefix boundary is where the model's own template,
rendered for the turns before the last user turn, ends in the prompt's token ids; a row whose
ids do not start that way, or whose prefix holds an image that requires grad, runs in full.

Only families whose images enter as one ``pixel_values`` row per image replacing placeholder
tokens, with 1-D positions and causal attention everywhere, can be cached this way: the
``llava`` model type (LLaVA-1.5, LLaVA-Med ports) without sliding-window attention. Others fall
back to full runs, with the reason in :attr:`HFChatVLM.prefix_cache_unsupported`: Qwen2-VL's
M-RoPE positions depend on every image of the sequence, Gemma 3 / MedGemma attend
bidirectionally inside images (``token_type_ids``), LLaVA-NeXT splits an image into a variable
number of tiles. ``prefix_cache=False`` turns caching off.

Example::

    vlm = create_chat_model("hf", path="/models/llava-1.5-7b-hf")
    image = load_image("xray.png").requires_grad_(True)
    [reply] = vlm.generate([[Message("user", "Which modality is this?", [image])]])
    logp = vlm.score([[Message("user", "Describe it.", [image])]], ["Sure, here is"])
    logp.sum().backward()  # image.grad now holds d log p / d pixels
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from medshield.errors import DataError, InputError
from medshield.models.chat import ChatVLM, Conversation
from medshield.models.hf_chat_inputs import TOKEN_KEYS, HFInputs
from medshield.models.io import require_hf_safetensors
from medshield.models.prefix_cache import (
    PrefixCache,
    cache_inputs,
)
from medshield.registry import CHAT_MODELS

# Per-token inputs padded and extended with the text; every other tensor is per image.
DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
PREFIX_CACHE_FAMILIES = ("llava",)  # model types whose prefixes can be cached (module docstring)


def _read_template(template: str | Path) -> str:
    """A Jinja template given as text or as the path of a file holding it."""
    try:
        is_file = "{" not in str(template) and Path(template).expanduser().is_file()
    except OSError:  # a long template string is not a valid file name
        is_file = False
    if is_file:
        return Path(template).expanduser().read_text(encoding="utf-8")
    if not isinstance(template, str) or "{" not in template:
        raise InputError(f"chat_template {template!r:.80} is neither a Jinja template nor a file")
    return template


@CHAT_MODELS.register(
    "hf", "transformers image-text-to-text model from a local directory (LLaVA, Qwen2-VL, MedGemma)"
)
class HFChatVLM(HFInputs, ChatVLM):
    """A transformers image-text-to-text model and its processor, loaded from a local directory.

    Args:
        path: directory of a Hugging Face checkpoint (config, safetensors weights, processor and
            tokenizer files with a chat template).
        device: torch device to run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the
            checkpoint's dtype).
        batch_size: conversations per forward pass; larger inputs are processed in chunks.
        max_context: context length in tokens; defaults to the text model's
            ``max_position_embeddings``.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``"eager"``, ``"sdpa"``).
        chat_template: a Jinja chat template (string or ``.jinja`` file) that replaces the
            checkpoint's; without one the processor's template is used, else the tokenizer's.
        prefix_cache: reuse the KV cache of the turns before the last user turn across requests
            where the model family allows it (see the module docstring); False recomputes it.
        prefix_cache_entries: the most distinct prefixes kept (least recently used out first).

    Raises:
        DataError: ``path`` is not a directory or holds no readable image-text-to-text model
            in safetensors format.
        UnsafeFileError: the weights are pickle files only (``pytorch_model.bin``).

    Example::

        vlm = HFChatVLM("/models/medgemma-4b-it", dtype="bfloat16", device="cuda")
        replies = vlm.generate([[Message("user", "Is there a fracture?", ["hand.png"])]])
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        max_context: int | None = None,
        attn_implementation: str | None = None,
        chat_template: str | Path | None = None,
        prefix_cache: bool = True,
        prefix_cache_entries: int = 16,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise DataError(
                f"hf chat model path {directory} is not a directory; the hf backend loads local "
                "Hugging Face folders (`huggingface-cli download REPO --local-dir DIR`)"
            )
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        require_hf_safetensors(directory, "hf chat model")
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "use_safetensors": True}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            self.processor = AutoProcessor.from_pretrained(directory)
            self.model = AutoModelForImageTextToText.from_pretrained(directory, **kwargs)
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            reason = str(e).splitlines()[0]  # not transformers' list of every supported config
            raise DataError(
                f"cannot load an image-text-to-text model and processor from {directory}: "
                f"{reason}. The hf backend needs a chat VLM folder (LLaVA, Qwen2-VL, MedGemma, "
                "...) with safetensors weights"
            ) from e
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not hasattr(self.processor, "image_processor"):
            raise DataError(f"the processor in {directory} has no tokenizer or image processor")
        if chat_template is not None:
            self.processor.chat_template = _read_template(chat_template)
        elif not getattr(self.processor, "chat_template", None):
            # older checkpoints keep the template in tokenizer_config.json only
            self.processor.chat_template = getattr(self.tokenizer, "chat_template", None)
        if not self.processor.chat_template:
            raise DataError(
                f"{directory} has no chat template (chat_template.jinja or in "
                "tokenizer_config.json); pass chat_template="
            )
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.path = directory
        text_config = self.model.config.get_text_config()
        self.max_context = int(max_context or getattr(text_config, "max_position_embeddings", 0))
        if self.max_context <= 0:
            raise DataError(f"cannot tell the context length of {directory}; pass max_context")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        # image/video placeholders (Gemma 3: the processor's <start_of_image> and the
        # tokenizer's <image_soft_token>); text containing them would misalign the images
        candidates = [
            getattr(owner, name, None)
            for owner in (self.processor, self.tokenizer)
            for name in ("image_token", "video_token")
        ]
        self._placeholders = list(dict.fromkeys(t for t in candidates if isinstance(t, str) and t))
        self.prefix_cache = prefix_cache
        self.prefix_cache_unsupported = self._prefix_cache_support()
        self._prefix_kv = PrefixCache(max_entries=prefix_cache_entries)
        self._head_ids: OrderedDict[tuple[str, tuple[bytes, ...]], list[int]] = OrderedDict()

    def _prefix_cache_support(self) -> str | None:
        """Why this model's prefixes cannot be cached (None: they can)."""
        config = self.model.config
        if config.model_type not in PREFIX_CACHE_FAMILIES:
            return (
                f"model type {config.model_type!r} is not one of {PREFIX_CACHE_FAMILIES} "
                "(see the hf_chat module docstring)"
            )
        text = config.get_text_config()
        layer_types = getattr(text, "layer_types", None) or ()
        if getattr(text, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
            return "the language model uses sliding-window attention"
        return None

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """Answer each conversation with the model's chat template; greedy when temperature is 0.

        New tokens are capped so prompt + answer fit the context (per chunk of ``batch_size``).

        Raises:
            InputError: a malformed conversation or image, ``max_new_tokens`` < 1, a negative
                temperature, or a prompt that fills the model's context.

        Example::

            [answer] = vlm.generate([[Message("user", "What organ is shown?", [img])]], 32)
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InputError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
            raise InputError(f"temperature must be a finite number, got {temperature!r}")
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        conversations = self._check_batch(conversations)
        replies: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start : start + self.batch_size]
            encodings = [self._encode(c, start + i, keep_graph=False) for i, c in enumerate(chunk)]
            lengths = [e.inputs["input_ids"].shape[1] for e in encodings]
            room = self.max_context - max(lengths)
            if room < 1:
                i = max(range(len(encodings)), key=lengths.__getitem__)
                raise InputError(
                    f"conversation {start + i}: the prompt is {lengths[i]} tokens, which fills "
                    f"the model's context of {self.max_context} tokens"
                )
            # with cached prefixes: the tails' ids, a mask over prefix + tail, and the cache
            batch, _, past = self._behind_prefixes(encodings, side="left")
            options: dict[str, Any] = {
                "max_new_tokens": min(max_new_tokens, room),
                "pad_token_id": self.pad_token_id,
            }
            if temperature > 0:
                options.update(do_sample=True, temperature=float(temperature))
            else:
                options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if past is not None:
                options |= cache_inputs(past)
            with torch.no_grad():
                output = self.model.generate(**batch, **options)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            replies.extend(t.strip() for t in texts)
        return replies

    def score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> torch.Tensor:
        """Sum of token log-probabilities of each continuation as the assistant's reply.

        The prompt is the chat template with the generation prompt; the continuation is tokenised
        on its own (no special tokens) and appended, so its tokens are exactly those scored.
        The result is a float32 (N,) tensor on the model's device; it carries the autograd graph
        to every image tensor that requires grad (see the module docstring). An empty
        continuation scores 0.

        Raises:
            InputError: mismatched lengths, a continuation that is not a string, a malformed
                conversation or image, or prompt + continuation longer than the context.

        Example::

            image = load_image("ct.png").requires_grad_(True)
            logp = vlm.score([[Message("user", "Explain.", [image])]], ["Sure, here is how"])
            (-logp.sum()).backward()
        """
        conversations = self._check_batch(conversations)
        if isinstance(continuations, str) or not isinstance(continuations, Sequence):
            raise InputError("continuations must be a list of strings")
        if len(continuations) != len(conversations):
            raise InputError(
                f"got {len(conversations)} conversations but {len(continuations)} continuations"
            )
        for i, text in enumerate(continuations):
            if not isinstance(text, str):
                raise InputError(f"continuation {i} is {type(text).__name__}, expected str")
        scores: list[torch.Tensor] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start : start + self.batch_size]
            scores.append(
                self._score_chunk(chunk, continuations[start : start + len(chunk)], start)
            )
        return torch.cat(scores)

    # ------------------------------------------------------------------ internals

    def _score_chunk(
        self, conversations: list[Conversation], continuations: Sequence[str], offset: int
    ) -> torch.Tensor:
        encodings, spans = [], []
        for i, (conversation, text) in enumerate(zip(conversations, continuations, strict=True)):
            encoded = self._encode(conversation, offset + i, keep_graph=True)
            encoding = encoded.inputs
            ids = self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
            n_prompt, n_cont = encoding["input_ids"].shape[1], len(ids)
            if n_prompt + n_cont > self.max_context:
                raise InputError(
                    f"conversation {offset + i}: prompt ({n_prompt} tokens) + continuation "
                    f"({n_cont} tokens) exceed the model's context of {self.max_context} tokens"
                )
            cont = torch.tensor([ids], dtype=encoding["input_ids"].dtype, device=self.device)
            for key in TOKEN_KEYS:
                if key in encoding:
                    extra = cont if key == "input_ids" else torch.zeros_like(cont)
                    if key == "attention_mask":
                        extra = torch.ones_like(cont)
                    encoding[key] = torch.cat([encoding[key], extra], dim=1)
            encodings.append(encoded)
            spans.append((n_prompt - encoded.prefix, n_cont))
        batch, offsets, past = self._behind_prefixes(encodings, side="right")
        needs_graph = torch.is_grad_enabled() and any(
            v.requires_grad for v in batch.values() if v.is_floating_point()
        )
        if past is not None:  # positions continue from each row's cached prefix
            tail_mask = batch["attention_mask"][:, -batch["input_ids"].shape[1] :]
            batch["position_ids"] = (tail_mask.cumsum(-1) - 1).clamp(min=0) + offsets[:, None]
        with torch.set_grad_enabled(needs_graph):
            logits = self.model(**batch, **cache_inputs(past)).logits
            scores = []
            for row, (n_prompt, n_cont) in enumerate(spans):
                if n_cont == 0:
                    scores.append(logits.new_zeros((), dtype=torch.float32))
                    continue
                step = logits[row, n_prompt - 1 : n_prompt + n_cont - 1].float()
                target = batch["input_ids"][row, n_prompt : n_prompt + n_cont]
                logp = torch.log_softmax(step, dim=-1).gather(1, target[:, None])
                scores.append(logp.sum())
            return torch.stack(scores)
