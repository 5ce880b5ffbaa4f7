"""The classifier every fine-tuning method starts from, and the fine-tuned dual encoder inside it.

:class:`FineTunedClassifier` computes ``logit_scale * normalize(rectifier(z)) @ C.T + b`` where
``z`` is the unnormalised image embedding, ``C`` the class-prompt embeddings (prompt ensembling
as in :class:`~medshield.models.ZeroShotClassifier`) and ``b`` a bias. Before training it returns
exactly the zero-shot logits, so all methods are compared from the same starting point. The head
``C`` is one of

- ``"fixed"``: the class-prompt embeddings of the base text tower, a buffer;
- ``"learned"``: a parameter initialised from them (linear probe, RAN);
- ``"live"``: recomputed by the text tower at every training step (methods that train the
  text tower: full fine-tuning, LoRA, adapters), and frozen into a buffer after training by
  :meth:`FineTunedClassifier.refresh_class_embeddings`, which first drops the mini-clip text
  cache so no stale pre-training text feature is ever served.

**Question-conditioned prompts (the VQA-RAD closed task).** When the class prompts hold the
placeholder ``{question}`` (:data:`~medshield.train.finetune.data.VQA_CLASS_PROMPTS`:
``"{question} no"`` and ``"{question} yes"``), every item brings its own question and its class
embeddings are those of its own prompts, ``C_i = [emb("<question_i> no"), emb("<question_i>
yes")]``; the classifier is told the questions of each batch with
:meth:`FineTunedClassifier.set_questions` before it sees the images. The three heads keep their
meaning: ``"fixed"`` uses the base text tower's embeddings, ``"live"`` recomputes them with
gradients while training, and ``"learned"`` adds a trained (K, D) offset to them (zero at
first). So every method again starts from the base model's zero-shot answer and trains exactly
what it trains on a modality, and attacks see an ordinary images -> logits module.

:func:`adapted_encoder` gives the fine-tuned dual encoder itself (adapted towers, RAN's rectifier
on the image path) for retrieval and multimodal attacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medshield.errors import InputError
from medshield.models.base import DualEncoder, check_texts, eval_mode

QUESTION_FIELD = "{question}"


def clear_text_cache(model: nn.Module) -> None:
    """Drop cached text features (mini-clip caches them while its text tower is frozen)."""
    cache = getattr(model, "_text_cache", None)
    if isinstance(cache, dict):
        cache.clear()


def prompt_embeddings(model: DualEncoder, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """(K, D) unit class embeddings: the mean of each class's prompt embeddings, renormalised.

    Runs with gradients when the text tower has trainable parameters (the "live" head).
    """
    texts = [t for prompts in class_prompts for t in prompts]
    emb = model.encode_text(texts)
    rows, start = [], 0
    for prompts in class_prompts:
        rows.append(F.normalize(emb[start : start + len(prompts)].mean(0), dim=-1))
        start += len(prompts)
    return torch.stack(rows)


def is_question_conditioned(class_prompts: Sequence[Sequence[str]]) -> bool:
    """Whether the prompts hold the ``{question}`` placeholder (all of them, or none may)."""
    flags = {QUESTION_FIELD in p for prompts in class_prompts for p in prompts}
    if len(flags) > 1:
        raise InputError(
            f"either every class prompt holds {QUESTION_FIELD} or none does, got {class_prompts}"
        )
    return flags == {True}


def question_prompt_embeddings(
    model: DualEncoder, class_prompts: Sequence[Sequence[str]], questions: Sequence[str]
) -> torch.Tensor:
    """(N, K, D) unit class embeddings of each question's prompts (:func:`prompt_embeddings`)."""
    filled = [
        [p.replace(QUESTION_FIELD, question) for p in prompts]
        for question in questions
        for prompts in class_prompts
    ]
    return prompt_embeddings(model, filled).view(len(questions), len(class_prompts), -1)


HeadMode = Literal["fixed", "learned", "live"]


class FineTunedClassifier(nn.Module):
    """Images in [0, 1] NCHW -> (N, K) logits, from a dual encoder (see the module docstring).

    Args:
        model: the dual encoder (modified in place by the method: adapters, LoRA, ...).
        class_prompts: per class, the prompt strings whose embeddings are averaged; with the
            ``{question}`` placeholder the classifier is question-conditioned and needs
            :meth:`set_questions` before every batch.
        head: ``"fixed"``, ``"learned"`` or ``"live"``.
        rectifier: optional module applied to the unnormalised image embedding (RAN).
    """

    def __init__(
        self,
        model: DualEncoder,
        class_prompts: Sequence[Sequence[str]],
        head: HeadMode = "fixed",
        rectifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if head not in ("fixed", "learned", "live"):
            raise InputError(f"head must be fixed, learned or live, got {head!r}")
        self.model = model
        self.class_prompts = [list(p) for p in class_prompts]
        self.head = head
        self.rectifier = rectifier
        self.conditioned = is_question_conditioned(self.class_prompts)
        self.questions: list[str] | None = None
        self._question_cache: torch.Tensor | None = None
        if self.conditioned:  # class_weight is an offset added to each question's embeddings
            init = torch.zeros(len(self.class_prompts), int(model.embed_dim))
        else:
            with torch.no_grad(), eval_mode(model):
                clear_text_cache(model)
                init = prompt_embeddings(model, self.class_prompts).detach()
            self.register_buffer("zero_shot_embeddings", init.clone())
        if head == "learned":
            self.class_weight = nn.Parameter(init.clone())
        else:
            self.register_buffer("class_weight", init.clone())
        self.bias = nn.Parameter(torch.zeros(len(self.class_prompts)), requires_grad=False)
        if head == "learned":
            self.bias.requires_grad_(True)

    @property
    def num_classes(self) -> int:
        return len(self.class_prompts)

    def image_embeddings(self, images: torch.Tensor, rectify: bool = True) -> torch.Tensor:
        """Unit-norm image embeddings, rectified when a rectifier is present and ``rectify``."""
        z = self.model._encode_pixels(self.model.preprocess(images))
        if rectify and self.rectifier is not None:
            z = self.rectifier(z)
        return F.normalize(z, dim=-1)

    def set_questions(self, questions: Sequence[str]) -> None:
        """The questions of the next batch, one per image (question-conditioned prompts only)."""
        if not self.conditioned:
            raise InputError("set_questions needs class prompts with the {question} placeholder")
        self.questions = check_texts(questions)
        self._question_cache = None

    def _question_embeddings(self) -> torch.Tensor:
        if self.questions is None:
            raise InputError("call set_questions with the batch's questions before its images")
        if self.head == "live" and self.training and torch.is_grad_enabled():
            clear_text_cache(self.model)  # the text tower changes every step
            return question_prompt_embeddings(self.model, self.class_prompts, self.questions)
        if self._question_cache is None:
            with torch.no_grad(), eval_mode(self.model):
                self._question_cache = question_prompt_embeddings(
                    self.model, self.class_prompts, self.questions
                )
        return self._question_cache

    def class_embeddings(self) -> torch.Tensor:
        """(K, D) class embeddings, or (N, K, D) per question when question-conditioned."""
        if self.conditioned:
            return self._question_embeddings() + self.class_weight
        if self.head == "live" and self.training and torch.is_grad_enabled():
            clear_text_cache(self.model)  # the text tower changes every step
            return prompt_embeddings(self.model, self.class_prompts)
        return self.class_weight

    def label_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, D) fixed text embedding of each item's class (its question's prompt when
        question-conditioned), without gradients: the targets of RAN's contrastive term."""
        if not self.conditioned:
            return self.zero_shot_embeddings[labels]
        with torch.no_grad(), eval_mode(self.model):
            embeddings = self._question_embeddings()
        if len(embeddings) != len(labels):
            raise InputError(f"{len(labels)} labels for {len(embeddings)} questions")
        return embeddings[torch.arange(len(labels), device=labels.device), labels]

    def logits(
        self, features: torch.Tensor, scale: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from unit image embeddings, at the model's logit scale or at ``scale``."""
        classes = self.class_embeddings()
        scale = self.model.logit_scale.exp() if scale is None else scale
        if classes.ndim == 2:
            return scale * features @ classes.T + self.bias
        if len(classes) != len(features):
            raise InputError(
                f"{len(features)} images for {len(classes)} questions; call set_questions with "
                "one question per image"
            )
        return scale * torch.einsum("nd,nkd->nk", features, classes) + self.bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_embeddings(images))

    @torch.no_grad()
    def refresh_class_embeddings(self) -> None:
        """Recompute a live head's buffer from the current text tower (after training); a
        question-conditioned head only drops its cached question embeddings."""
        clear_text_cache(self.model)
        self._question_cache = None
        if self.head == "live" and not self.conditioned:
            with eval_mode(self.model):
                self.class_weight.copy_(prompt_embeddings(self.model, self.class_prompts))
        clear_text_cache(self.model)


class RectifiedEncoder(DualEncoder):
    """A dual encoder whose image embeddings pass through a rectifier (RAN's MLP) before
    normalisation, exactly as in :meth:`FineTunedClassifier.image_embeddings`; the text tower,
    preprocessing and logit scale are the wrapped model's."""

    def __init__(self, model: DualEncoder, rectifier: nn.Module) -> None:
        super().__init__()
        self.model, self.rectifier = model, rectifier
        self.logit_scale = model.logit_scale
        self.embed_dim, self.image_size = model.embed_dim, model.image_size
        self.image_mean, self.image_std = model.image_mean, model.image_std

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess(images)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.rectifier(self.model._encode_pixels(pixels))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model._encode_texts(texts)


def adapted_encoder(classifier: nn.Module) -> DualEncoder:
    """The fine-tuned dual encoder inside a classifier, for retrieval and multimodal attacks:
    its model as the method left it (LoRA merged, adapters, a folded linear rectifier, trained
    towers), wrapped in a :class:`RectifiedEncoder` when a rectifier remains (RAN's MLP)."""
    if not isinstance(classifier, FineTunedClassifier):
        raise InputError(
            "a fine-tuned dual encoder needs a FineTunedClassifier, got "
            f"{type(classifier).__name__}"
        )
    if classifier.rectifier is None:
        return classifier.model
    return RectifiedEncoder(classifier.model, classifier.rectifier)
