"""VQA-RAD closed questions as classification over frozen dual-encoder embeddings.

The dual encoder stays frozen: image and question embeddings are computed once, and only a small
:class:`CoAttentionFusionHead` is trained (AdamW, CPU, seconds). The answer vocabulary is the set
of closed answers in the training questions (mostly "yes"/"no"); a test question whose answer is
not in it cannot be answered correctly and counts as wrong.

One sample row per test question::

    {"task": "vqa_closed", "modality": "radiology", "qid": 11,
     "question": "Is there evidence of an aortic aneurysm?", "answer": "yes", "pred": "no",
     "correct": false, "majority_correct": true}

``majority_correct`` says whether the most frequent training answer would have been right, so the
majority-answer baseline is derived from the rows like every other number
(:func:`medshield.eval.metrics.summarize` reports it as ``majority_baseline``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medshield import data
from medshield.attacks.pgd import PGD, pgd_step_size
from medshield.errors import DataError, InputError
from medshield.eval.features import embed_images, embed_texts
from medshield.models.base import DualEncoder, evaluating


class CoAttentionFusionHead(nn.Module):
    """Answer classifier over one image embedding and one question embedding.

    Each embedding is projected into ``num_tokens`` tokens of width ``hidden_dim`` (a learned
    linear map D -> T*H). Two-way cross attention follows: image tokens attend to question tokens
    and question tokens attend to image tokens (``nn.MultiheadAttention``, residual + LayerNorm).
    The mean-pooled image and question tokens are concatenated and an MLP gives answer logits.

    Args:
        embed_dim: D, the size of the dual encoder's embeddings.
        num_answers: size of the answer vocabulary.
        num_tokens: T, tokens per modality.
        hidden_dim: H, token width (divisible by ``num_heads``).
        num_heads: attention heads.
        dropout: dropout in attention and in the MLP.
    """

    def __init__(
        self,
        embed_dim: int,
        num_answers: int,
        num_tokens: int = 4,
        hidden_dim: int = 64,
        num_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise InputError(f"hidden_dim {hidden_dim} must be divisible by num_heads {num_heads}")
        if num_answers < 1 or num_tokens < 1 or embed_dim < 1:
            raise InputError("embed_dim, num_answers and num_tokens must be positive")
        self.embed_dim, self.num_tokens, self.hidden_dim = embed_dim, num_tokens, hidden_dim
        self.image_tokens = nn.Linear(embed_dim, num_tokens * hidden_dim)
        self.text_tokens = nn.Linear(embed_dim, num_tokens * hidden_dim)
        self.image_to_text = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.text_to_image = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.image_norm = nn.LayerNorm(hidden_dim)
        self.text_norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Sequential(
            nn.Linear(2 * hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_answers),
        )

    def forward(
        self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """(N, D) image and (N, D) question embeddings -> (N, num_answers) logits."""
        shapes = (tuple(image_embeddings.shape), tuple(text_embeddings.shape))
        expected = (len(image_embeddings), self.embed_dim)
        if shapes != (expected, expected):
            raise InputError(
                f"image and question embeddings must both have shape (N, {self.embed_dim}) "
                f"with the same N, got {shapes[0]} and {shapes[1]}"
            )
        n = len(image_embeddings)
        image = self.image_tokens(image_embeddings).view(n, self.num_tokens, self.hidden_dim)
        text = self.text_tokens(text_embeddings).view(n, self.num_tokens, self.hidden_dim)
        image_attended, _ = self.image_to_text(image, text, text, need_weights=False)
        text_attended, _ = self.text_to_image(text, image, image, need_weights=False)
        image = self.image_norm(image + image_attended)
        text = self.text_norm(text + text_attended)
        return self.classifier(torch.cat([image.mean(dim=1), text.mean(dim=1)], dim=-1))


def answer_vocabulary(answers: Sequence[str]) -> list[str]:
    """Distinct answers, most frequent first (ties alphabetical); the first is the majority."""
    counts = Counter(answers)
    return sorted(counts, key=lambda a: (-counts[a], a))


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread inside the block. The head's matrices are tiny, so extra threads only
    add synchronisation; on a busy 2-core machine they made training about 25x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_fusion_head(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    targets: torch.Tensor,
    num_answers: int,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
) -> CoAttentionFusionHead:
    """Train a :class:`CoAttentionFusionHead` with AdamW and cross-entropy.

    Initialisation, shuffling and dropout are seeded by ``seed`` without touching the global
    torch random state; training runs on one CPU thread. Returns the head in eval mode.
    """
    if epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    with torch.random.fork_rng(devices=[]), _single_thread():
        torch.manual_seed(seed)
        head = CoAttentionFusionHead(image_embeddings.shape[1], num_answers)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        head.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(targets)).split(batch_size):
                loss = F.cross_entropy(
                    head(image_embeddings[batch], text_embeddings[batch]), targets[batch]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return head.eval()


def _embed_items(
    model: DualEncoder, items: Sequence[Any], image_size: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image and question embeddings of VQA items; each distinct image is embedded once."""
    paths = list(dict.fromkeys(item.image_path for item in items))
    images = torch.stack([data.load_vqa_image(p, size=image_size) for p in paths])
    embedded = embed_images(model, images, batch_size)
    position = {p: i for i, p in enumerate(paths)}
    image_embeddings = embedded[[position[item.image_path] for item in items]]
    return image_embeddings, embed_texts(model, [item.question for item in items], batch_size)


def vqa_closed_rows(
    model: DualEncoder,
    epochs: int = 30,
    seed: int = 0,
    data_dir: str | Path | None = None,
    image_size: int = 64,
    batch_size: int = 256,
    attack_eps: float | None = None,
    attack_steps: int = 10,
) -> list[dict[str, Any]]:
    """Train a fusion head on VQA-RAD closed train questions; one row per closed test question.

    With ``attack_eps``, every test question is also answered on its image perturbed by L-inf
    PGD (white-box through the image tower and the trained head, untargeted on the true answer,
    step :func:`medshield.attacks.pgd.pgd_step_size`, random start); rows then hold
    ``adv_pred``, ``adv_correct`` and ``robust_correct`` (right both clean and adversarial), and
    ``attack_eps``.

    Args:
        model: the frozen dual encoder (left in the train/eval mode it was in).
        epochs: training epochs of the head.
        seed: seed of the head's initialisation, shuffling and dropout.
        data_dir: data root (see :func:`medshield.data.load_vqa_rad`).
        image_size: side the radiology images are loaded at before the model resizes them.
        batch_size: items per embedding forward pass.
        attack_eps: L-inf budget in /255 units of the image attack; None: no attack.
        attack_steps: PGD iterations of the image attack.

    Raises:
        DataError: VQA-RAD missing or without closed questions in a split.
    """
    train = data.load_vqa_rad("train", data_dir, answer_type="closed")
    test = data.load_vqa_rad("test", data_dir, answer_type="closed")
    if not train or not test:
        raise DataError("VQA-RAD has no closed questions in the train or the test split")
    vocabulary = answer_vocabulary([item.answer for item in train])
    answer_index = {a: i for i, a in enumerate(vocabulary)}

    train_images, train_texts = _embed_items(model, train, image_size, batch_size)
    targets = torch.tensor([answer_index[item.answer] for item in train])
    head = train_fusion_head(train_images, train_texts, targets, len(vocabulary), epochs, seed)

    test_images, test_texts = _embed_items(model, test, image_size, batch_size)
    with evaluating(head):
        preds = head(test_images, test_texts).argmax(dim=1).tolist()
    rows = [
        {
            "task": "vqa_closed",
            "modality": "radiology",
            "qid": item.qid,
            "question": item.question,
            "answer": item.answer,
            "pred": vocabulary[p],
            "correct": vocabulary[p] == item.answer,
            "majority_correct": vocabulary[0] == item.answer,
        }
        for item, p in zip(test, preds, strict=True)
    ]
    if attack_eps is None:
        return rows
    # An answer never seen in training cannot be right; attack the predicted one instead.
    labels = torch.tensor(
        [answer_index.get(r["answer"], p) for r, p in zip(rows, preds, strict=True)]
    )
    images = torch.stack([data.load_vqa_image(item.image_path, size=image_size) for item in test])
    adv_preds = _attacked_predictions(
        model, head, images, test_texts, labels, attack_eps, attack_steps, seed
    )
    for row, p in zip(rows, adv_preds, strict=True):
        row["attack_eps"] = float(attack_eps)
        row["adv_pred"] = vocabulary[p]
        row["adv_correct"] = vocabulary[p] == row["answer"]
        row["robust_correct"] = row["correct"] and row["adv_correct"]
    return rows


class _AnswerClassifier(nn.Module):
    """Images -> answer logits for a fixed batch of question embeddings (set per batch)."""

    def __init__(self, model: DualEncoder, head: CoAttentionFusionHead) -> None:
        super().__init__()
        self.model, self.head = model, head
        self.questions: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.questions is None or len(self.questions) != len(images):
            raise InputError("set .questions to one question embedding per image first")
        return self.head(self.model.encode_image(images), self.questions)


def _attacked_predictions(
    model: DualEncoder,
    head: CoAttentionFusionHead,
    images: torch.Tensor,
    questions: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int,
    seed: int,
    batch_size: int = 64,
) -> list[int]:
    classifier = _AnswerClassifier(model, head)
    attack = PGD(
        classifier, eps=eps, alpha=pgd_step_size(eps, steps), steps=steps, random_start=True
    )
    device = next(model.parameters()).device
    preds: list[int] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(images), batch_size):
            classifier.questions = questions[start : start + batch_size].to(device)
            x = images[start : start + batch_size].to(device)
            adv = attack(x, labels[start : start + batch_size].to(device))
            with evaluating(classifier):
                preds.extend(classifier(adv).argmax(dim=1).tolist())
    return preds
