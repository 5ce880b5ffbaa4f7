"""Multimodal attacks on image-caption pairs: Co-Attack and SGA."""

from __future__ import annotations

import json
import math
import re
import zlib

import pytest
import torch
from torch import nn

from medshield.attacks.co_attack import CoAttack, away_from_texts
from medshield.attacks.multimodal import MultimodalAttack, MultimodalResult, check_caption_sets
from medshield.attacks.sga import SGA, ScaledCopies, rescale
from medshield.errors import InputError
from medshield.models.base import DualEncoder
from medshield.registry import MULTIMODAL_ATTACKS

WORD = re.compile(r"[A-Za-z0-9]+(?:[-&'][A-Za-z0-9]+)*")
CAPTIONS = [
    "a chest X-ray showing pneumonia",
    "a frontal chest radiograph with clear lungs",
    "radiograph of the chest with pneumonia",
    "a chest X-ray showing clear lungs with no sign of pneumonia",
]
ATTACK_CLASSES = [CoAttack, SGA]


class ToyDualEncoder(DualEncoder):
    """Conv image tower; bag-of-words text tower with a fixed random vector for every word, so
    every lexicon substitute moves the caption embedding."""

    embed_dim = 16
    image_size = 16
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.25, 0.25, 0.25)

    def __init__(self) -> None:
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, self.embed_dim),
        )
        self.text_dropout = nn.Dropout(0.5)  # never applied: exists to check mode flags

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tower(pixels)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            words = WORD.findall(text.lower())
            rows.append(sum(word_vector(w) for w in words))
        return torch.stack(rows)


def word_vector(word: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    return torch.randn(ToyDualEncoder.embed_dim, generator=generator)


@pytest.fixture
def toy() -> ToyDualEncoder:
    torch.manual_seed(0)
    return ToyDualEncoder().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(len(CAPTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(1))


def matched_similarity(model: DualEncoder, images: torch.Tensor, captions: list[str]) -> float:
    """Mean cosine similarity of the matched pairs."""
    with torch.no_grad():
        return float((model.encode_image(images) * model.encode_text(captions)).sum(-1).mean())


def random_perturbation(images: torch.Tensor, eps: float) -> torch.Tensor:
    """A random +-eps/255 corner of the L-inf ball, clipped to [0, 1]."""
    signs = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(2))
    return (images + (2 * signs - 1) * eps / 255).clamp(0, 1)


def check_result(
    result: MultimodalResult, images: torch.Tensor, captions: list[str], eps: float, edits: int
) -> None:
    assert result.images.shape == images.shape and result.images.dtype == images.dtype
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert (result.images - images).abs().max() <= eps / 255 + 1e-6
    assert len(result.captions) == len(result.text_edits) == len(captions)
    assert all(0 <= n <= edits for n in result.text_edits)
    for original, adversarial, n in zip(captions, result.captions, result.text_edits, strict=True):
        assert (adversarial == original) == (n == 0)


# --- registry, config, validation ---------------------------------------------------------------
def test_registry_has_co_attack_and_sga() -> None:
    assert MULTIMODAL_ATTACKS.get("co-attack") is CoAttack
    assert MULTIMODAL_ATTACKS.get("sga") is SGA
    assert CoAttack.name == "co-attack" and SGA.name == "sga"
    assert issubclass(CoAttack, MultimodalAttack) and issubclass(SGA, MultimodalAttack)


@pytest.mark.parametrize(
    "attack",
    [
        CoAttack(eps=4, alpha=1, steps=3, max_edits=1, min_similarity=0.7),
        SGA(eps=4, alpha=1, steps=3, max_edits=1, min_similarity=0.7, scales=(0.5,), n_captions=3),
        SGA(scales=()),
    ],
)
def test_config_round_trips_through_json(attack: MultimodalAttack) -> None:
    config = json.loads(json.dumps(attack.config()))
    rebuilt = MULTIMODAL_ATTACKS.get(attack.name)(**config)
    assert rebuilt.config() == attack.config()
    assert repr(rebuilt) == repr(attack)


@pytest.mark.parametrize("cls", ATTACK_CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -1}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"eps": "2"}, "eps"),
        ({"alpha": -0.5}, "alpha"),
        ({"steps": 0}, "steps"),
        ({"max_edits": -1}, "max_edits"),
        ({"min_similarity": 2.0}, "min_cosine"),
    ],
)
def test_bad_arguments_are_rejected(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("cls", ATTACK_CLASSES)
def test_bad_inputs_get_clear_errors(cls: type, toy: ToyDualEncoder, images: torch.Tensor) -> None:
    attack = cls(steps=1)
    with pytest.raises(InputError, match="4 images for 3 captions"):
        attack(toy, images, CAPTIONS[:3])
    with pytest.raises(InputError, match="non-empty"):
        attack(toy, images[:0], [])
    with pytest.raises(InputError, match=r"texts\[1\] is empty"):
        attack(toy, images[:2], ["a chest X-ray", "  "])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        attack(toy, images * 2, CAPTIONS)
    with pytest.raises(InputError, match="DualEncoder"):
        attack(nn.Linear(2, 2), images, CAPTIONS)


# --- both attacks on the toy model --------------------------------------------------------------
@pytest.mark.parametrize("cls", ATTACK_CLASSES)
def test_attack_stays_in_budget_and_beats_random_noise(
    cls: type, toy: ToyDualEncoder, images: torch.Tensor
) -> None:
    torch.manual_seed(0)
    attack = cls(eps=8, alpha=2, steps=5, max_edits=2)
    result = attack(toy, images, CAPTIONS)
    check_result(result, images, CAPTIONS, eps=8, edits=2)
    assert sum(result.text_edits) > 0
    clean = matched_similarity(toy, images, CAPTIONS)
    noise = matched_similarity(toy, random_perturbation(images, 8), CAPTIONS)
    adversarial = matched_similarity(toy, result.images, result.captions)
    assert adversarial < min(clean, noise) - 0.1
    # the image step alone: against the same adversarial captions, beats random noise
    noise_image_only = matched_similarity(toy, random_perturbation(images, 8), result.captions)
    assert adversarial < noise_image_only - 0.05, (adversarial, noise_image_only)


@pytest.mark.parametrize("cls", ATTACK_CLASSES)
def test_model_modes_and_requires_grad_are_restored(
    cls: type, toy: ToyDualEncoder, images: torch.Tensor
) -> None:
    toy.train()
    toy.text_dropout.eval()
    toy.logit_scale.requires_grad_(False)
    running_mean = toy.image_tower[1].running_mean.clone()
    cls(steps=2)(toy, images, CAPTIONS)
    assert toy.training and toy.image_tower.training and not toy.text_dropout.training
    assert not toy.logit_scale.requires_grad
    assert all(p.requires_grad for n, p in toy.named_parameters() if n != "logit_scale")
    assert all(p.grad is None for p in toy.parameters())
    assert torch.equal(toy.image_tower[1].running_mean, running_mean)  # BN ran in eval mode


def test_co_attack_loss_pushes_away_from_both_captions() -> None:
    image = torch.tensor([[1.0, 0.0]])
    texts = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])
    assert away_from_texts(image, texts).tolist() == pytest.approx([-1.6])


# --- SGA specifics ------------------------------------------------------------------------------
def test_sga_without_scales_uses_the_image_alone(toy: ToyDualEncoder, images: torch.Tensor) -> None:
    assert ScaledCopies(toy, ()).eval()(images).shape == (4, 1, 16)
    assert ScaledCopies(toy, (0.5, 1.5)).eval()(images).shape == (4, 3, 16)
    attack = SGA(eps=8, alpha=2, steps=5, scales=())
    assert attack.config()["scales"] == []
    result = attack(toy, images, CAPTIONS)
    check_result(result, images, CAPTIONS, eps=8, edits=2)
    assert matched_similarity(toy, result.images, result.captions) < matched_similarity(
        toy, images, CAPTIONS
    )


@pytest.mark.parametrize("scales", [(0.0,), (0.5, -1.0), (math.inf,), "0.5", 0.5, (True,)])
def test_sga_rejects_bad_scales(scales: object) -> None:
    with pytest.raises(InputError, match="scales"):
        SGA(scales=scales)  # type: ignore[arg-type]


def test_rescale_keeps_shape_and_range() -> None:
    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    for scale in (0.01, 0.5, 1.5):
        out = rescale(images, scale)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    (grad,) = torch.autograd.grad(rescale(images, 0.5).sum(), images)
    assert grad.abs().sum() > 0


def test_caption_sets_start_with_the_caption_and_are_capped() -> None:
    sets = check_caption_sets(["a", "b"], [["x", "a", "y", "z"], []], n_captions=3)
    assert sets == [["a", "x", "y"], ["b"]]
    assert check_caption_sets(["a"], None, n_captions=5) == [["a"]]
    with pytest.raises(InputError, match="1 caption sets for 2 captions"):
        check_caption_sets(["a", "b"], [["x"]], n_captions=5)
    with pytest.raises(InputError, match="caption_sets\\[0\\]"):
        check_caption_sets(["a"], ["xyz"], n_captions=5)
    with pytest.raises(InputError, match="empty"):
        check_caption_sets(["a"], [[""]], n_captions=5)


def test_sga_image_step_follows_the_caption_set(toy: ToyDualEncoder, images: torch.Tensor) -> None:
    attack = SGA(eps=8, alpha=2, steps=3, scales=())  # no random augmentation: deterministic
    alone = attack(toy, images, CAPTIONS)
    again = attack(toy, images, CAPTIONS, caption_sets=[[] for _ in CAPTIONS])
    guided = attack(toy, images, CAPTIONS, caption_sets=[CAPTIONS[::-1]] * len(CAPTIONS))
    assert torch.equal(alone.images, again.images)
    assert not torch.equal(alone.images, guided.images)
    with pytest.raises(InputError, match="caption sets"):
        attack(toy, images, CAPTIONS, caption_sets=[CAPTIONS])


# --- the real mini-clip on chest X-rays ---------------------------------------------------------
def test_attacks_on_mini_clip_and_chest_xrays(data_dir: object) -> None:
    from medshield.data import load_split
    from medshield.models import create_model

    torch.manual_seed(0)
    model = create_model("mini-clip").eval()
    split = load_split("chest_xray", "test")
    rows = [0, 1, 2, 3]
    images = split.tensor(rows)
    labels = [int(y) for y in split.labels[rows]]
    captions = [split.modality.captions(y)[0] for y in labels]
    caption_sets = [split.modality.captions(y) for y in labels]

    noise = matched_similarity(model, random_perturbation(images, 2), captions)
    co_attack, sga = CoAttack(steps=5, alpha=1), SGA(steps=5, alpha=1, scales=(0.5, 1.5))
    for attack, kwargs in [(co_attack, {}), (sga, {"caption_sets": caption_sets})]:
        result = attack(model, images, captions, **kwargs)
        check_result(result, images, captions, eps=2, edits=2)
        assert matched_similarity(model, result.images, result.captions) < noise - 0.05
    assert not model.training
