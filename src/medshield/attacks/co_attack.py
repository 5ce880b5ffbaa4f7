"""Co-Attack: collaborative multimodal attack on image-caption pairs (Zhang et al., 2022)."""

from __future__ import annotations

import torch

from medshield.attacks.multimodal import MultimodalAttack, MultimodalResult
from medshield.attacks.pgd import PGD
from medshield.models.base import DualEncoder
from medshield.registry import MULTIMODAL_ATTACKS


def away_from_texts(embeddings: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N,) loss to maximise: minus the summed cosine similarities of each (N, D) unit image
    embedding to its (N, K, D) unit text embeddings."""
    return -(texts @ embeddings.unsqueeze(-1)).squeeze(-1).sum(-1)


@MULTIMODAL_ATTACKS.register(
    "co-attack",
    "Co-Attack: word substitution guided by the image, then L-inf PGD away from the clean and "
    "adversarial captions (Zhang et al., 2022)",
)
class CoAttack(MultimodalAttack):
    r"""Co-Attack in the paper 'Towards Adversarial Attack on Vision-Language Pre-training Models'
    [https://arxiv.org/abs/2206.09391] (Zhang, Yi and Sang, ACM MM 2022), for dual encoders
    (the paper's "unimodal embedding" case, e.g. CLIP).

    Distance Measure : Linf (image), bounded word substitutions (text)

    1. Text: each caption gets at most ``max_edits`` medical-synonym substitutions that lower the
       cosine similarity between its embedding and the *clean* image embedding
       (:class:`~medshield.attacks.text.WordSubstitutionAttack`, greedy; the paper uses
       BERT-Attack), keeping the MiniLM similarity to the original caption >= ``min_similarity``.
    2. Image: ``steps`` iterations of L-inf PGD from the clean image (no random start) that
       maximise ``-(cos(img_adv, txt_adv) + cos(img_adv, txt_clean))``: the image moves away from
       its adversarial caption and, the collaborative part, also from its clean caption, so the
       two perturbations add up instead of cancelling. The paper instead maximises a KL
       divergence between softmax-ed embeddings, ``KL(img_adv, img_clean) + alpha_3 *
       KL(img_adv, txt_adv)``; with cosine similarities on unit embeddings the objective is
       scale-free and measures directly the matched-pair similarity a dual encoder is scored on.

    Threat model: white-box on the image tower (gradients of ``model.encode_image``), black-box
    on the text tower (only ``model.encode_text`` outputs); untargeted.

    Arguments:
        eps (float): L-inf image budget in /255 units. (Default: 2)
        alpha (float): image step size in /255 units. (Default: 0.5)
        steps (int): image PGD iterations. (Default: 10)
        max_edits (int): most word substitutions per caption. (Default: 2)
        min_similarity (float): smallest MiniLM cosine similarity between a caption and its
            adversarial version. (Default: 0.8)

    Shape:
        - images: :math:`(N, C, H, W)` float in [0, 1], C = 1 or 3.
        - captions: list of N non-empty strings.
        - output: :class:`~medshield.attacks.multimodal.MultimodalResult` with images of the
          same shape, dtype and device, in [0, 1], within ``eps``; N captions; N edit counts.

    Examples::
        >>> model = medshield.models.create_model("mini-clip")
        >>> attack = CoAttack(eps=2, alpha=0.5, steps=10, max_edits=2)
        >>> result = attack(model, images, ["a chest X-ray showing pneumonia"] * len(images))
        >>> result.images, result.captions, result.text_edits
    """

    paper = (
        "Zhang, Yi and Sang. Towards Adversarial Attack on Vision-Language Pre-training Models. "
        "ACM MM 2022"
    )
    threat_model = "white-box image tower (L-inf), black-box text tower (word substitution)"

    def perturb(
        self, model: DualEncoder, images: torch.Tensor, captions: list[str]
    ) -> MultimodalResult:
        with torch.no_grad():
            clean_images = model.encode_image(images)
            clean_texts = model.encode_text(captions)
        adv_captions, edits = self.attack_texts(model, captions, clean_images)
        with torch.no_grad():
            adv_texts = model.encode_text(adv_captions)
        pgd = PGD(
            model,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            random_start=False,
            loss_fn=away_from_texts,
        )
        adv_images = pgd(images, torch.stack([adv_texts, clean_texts], dim=1))
        return MultimodalResult(adv_images, adv_captions, edits)
