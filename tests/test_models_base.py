"""The DualEncoder contract: input checks, preprocessing, encoding, zero-shot classification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medshield.errors import InputError
from medshield.models.base import DualEncoder, ZeroShotClassifier, check_images, check_texts

MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.125)


class TinyEncoder(DualEncoder):
    """8 px linear image tower and a bag-of-characters text tower, 4-d embeddings."""

    backend = "test-tiny-base"
    image_size = 8
    image_mean = MEAN
    image_std = STD

    def __init__(self) -> None:
        super().__init__()
        self.init_kwargs = {}
        self.image_proj = nn.Linear(3 * 8 * 8, 4)
        self.text_embed = nn.EmbeddingBag(128, 4)
        self.seen_pixels: torch.Tensor | None = None

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.seen_pixels = pixels
        return self.image_proj(pixels.flatten(1))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.stack(
            [self.text_embed(torch.tensor([[ord(c) % 128 for c in t]]))[0] for t in texts]
        )


@pytest.fixture
def model() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder()


# --- check_images --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), r"float in \[0, 1\].*/ 255"),
        (torch.rand(3, 8, 8), r"4-D.*unsqueeze\(0\)"),
        (torch.rand(1, 2, 8, 8), "1 or 3 channels"),
        (torch.rand(1, 8, 8, 3), r"NHWC.*permute\(0, 3, 1, 2\)"),
        (torch.rand(1, 3, 8, 8) + 1.5, r"\[0, 1\].*do not normalise"),
        (torch.rand(1, 3, 8, 8) - 1.5, r"\[0, 1\]"),
        (torch.rand(1, 3, 8, 8).numpy(), "torch.Tensor"),
    ],
    ids=["uint8", "3-D", "2-channels", "NHWC", "above-1", "below-0", "numpy"],
)
def test_check_images_rejects_bad_input(images: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        check_images(images)


def test_check_images_accepts_gray_and_rgb_in_range() -> None:
    for images in (torch.rand(2, 1, 5, 7), torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)):
        assert check_images(images) is images


# --- check_texts ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("texts", "match"),
    [
        ("a chest X-ray", "wrap it in a list"),
        ([], "non-empty list"),
        (["fine", ""], r"texts\[1\] is empty"),
        (["   "], r"texts\[0\] is empty"),
        (["fine", 3], r"texts\[1\] is int"),
    ],
    ids=["str", "empty-list", "empty-string", "blank-string", "not-a-string"],
)
def test_check_texts_rejects_bad_input(texts: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        check_texts(texts)


def test_check_texts_returns_a_list() -> None:
    assert check_texts(("a", "b")) == ["a", "b"]


# --- preprocess / encode -------------------------------------------------------------------------
def test_preprocess_normalises_exactly(model: TinyEncoder) -> None:
    images = torch.rand(2, 3, 8, 8)
    expected = torch.empty_like(images)
    for c in range(3):
        expected[:, c] = (images[:, c] - MEAN[c]) / STD[c]
    torch.testing.assert_close(model.preprocess(images), expected)


def test_preprocess_turns_gray_into_three_equal_channels(model: TinyEncoder) -> None:
    gray = torch.rand(2, 1, 8, 8)
    out = model.preprocess(gray)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, model.preprocess(gray.expand(-1, 3, -1, -1)))
    # channel c is (gray - mean_c) / std_c, so undoing it recovers the gray image in every channel
    std, mean = torch.tensor(STD).view(1, 3, 1, 1), torch.tensor(MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(out * std + mean, gray.expand(-1, 3, -1, -1))


@pytest.mark.parametrize("size", [(28, 28), (5, 13)])
def test_preprocess_resizes_to_image_size(model: TinyEncoder, size: tuple[int, int]) -> None:
    value = 0.7  # a constant image stays constant through any interpolation
    out = model.preprocess(torch.full((3, 1, *size), value))
    assert out.shape == (3, 3, 8, 8)
    expected = (value - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out))


def test_encode_image_feeds_preprocessed_pixels_and_returns_unit_vectors(
    model: TinyEncoder,
) -> None:
    images = torch.rand(3, 1, 16, 16)
    embeddings = model.encode_image(images)
    assert embeddings.shape == (3, 4)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.seen_pixels, model.preprocess(images))


def test_encode_text_checks_and_returns_unit_vectors(model: TinyEncoder) -> None:
    embeddings = model.encode_text(["a chest X-ray", "pneumonia"])
    assert embeddings.shape == (2, 4)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    with pytest.raises(InputError):
        model.encode_text("a chest X-ray")


def test_forward_returns_embeddings_and_positive_scale(model: TinyEncoder) -> None:
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    images, texts, scale = model(torch.rand(2, 3, 8, 8), ["a", "b c"])
    assert images.shape == texts.shape == (2, 4)
    assert scale.item() == pytest.approx(torch.e**2)


# --- ZeroShotClassifier --------------------------------------------------------------------------
def test_zero_shot_classifier_matches_manual_cosine_similarity(model: TinyEncoder) -> None:
    prompts = ["normal", ["pneumonia", "a chest with pneumonia"], "effusion"]
    classifier = ZeroShotClassifier(model, prompts)
    images = torch.rand(5, 1, 12, 12)
    logits = classifier(images)
    assert logits.shape == (5, 3)

    with torch.no_grad():
        class_rows = [
            F.normalize(
                F.normalize(model._encode_texts([p] if isinstance(p, str) else p)).mean(0), dim=0
            )
            for p in prompts
        ]
        features = F.normalize(model._encode_pixels(model.preprocess(images)), dim=-1)
        expected = model.logit_scale.exp() * features @ torch.stack(class_rows).T
    torch.testing.assert_close(logits, expected)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_zero_shot_classifier_passes_gradients_to_images(model: TinyEncoder) -> None:
    classifier = ZeroShotClassifier(model, ["normal", "pneumonia"])
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    classifier(images)[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_zero_shot_classifier_needs_two_classes(model: TinyEncoder) -> None:
    with pytest.raises(InputError, match="at least two classes"):
        ZeroShotClassifier(model, ["only one"])
