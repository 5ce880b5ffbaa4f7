"""mini-clip: shapes, normalisation, the frozen-text cache, gradients, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medshield.models import create_model, load_model, save_model
from medshield.models.mini_clip import MiniClip


@pytest.fixture(scope="module")
def model() -> MiniClip:
    torch.manual_seed(0)
    return create_model("mini-clip").eval()


def test_encodes_grey_and_rgb_images_of_any_size_to_unit_vectors(model: MiniClip) -> None:
    grey = model.encode_image(torch.rand(3, 1, 28, 28))
    rgb = model.encode_image(torch.rand(2, 3, 40, 50))
    text = model.encode_text(["a chest X-ray showing pneumonia", "a blood smear"])
    assert grey.shape == (3, 256) and rgb.shape == (2, 256) and text.shape == (2, 256)
    for emb in (grey, rgb, text):
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)))


def test_preprocess_scales_pixels_to_minus_one_one_at_64_px(model: MiniClip) -> None:
    x = torch.ones(1, 1, 64, 64)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 0.5
    out = model.preprocess(x)
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out[0, :, 0, :3], torch.tensor([[-1.0, 0.0, 1.0]] * 3))


def test_text_features_are_cached_while_the_text_tower_is_frozen(model: MiniClip) -> None:
    for p in model.text_tower.parameters():
        p.requires_grad_(False)
    model._text_cache.clear()
    first = model.encode_text(["renal cortex microscopy: podocytes"])
    assert list(model._text_cache) == ["renal cortex microscopy: podocytes"]
    model.text_tower.train()  # dropout must not change a cached, frozen feature
    torch.testing.assert_close(model.encode_text(["renal cortex microscopy: podocytes"]), first)
    model.text_tower.eval()
    model.load_state_dict(model.state_dict())
    assert model._text_cache == {}  # new weights invalidate the cache


def test_gradients_reach_the_pixels(model: MiniClip) -> None:
    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    model.encode_image(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_save_and_load_round_trip(model: MiniClip, tmp_path: Path) -> None:
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    images = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
        texts = ["an abdominal CT slice showing the liver"]
        torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts))


def test_folded_same_padding_gives_the_same_features_and_gradients_bit_for_bit() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    from medshield.models.mini_clip import fold_same_padding

    torch.manual_seed(0)
    padded = EfficientNet.from_name("efficientnet-lite0", image_size=32).eval()
    folded = EfficientNet.from_name("efficientnet-lite0", image_size=32).eval()
    folded.load_state_dict(padded.state_dict())
    assert fold_same_padding(folded) > 0
    assert fold_same_padding(folded) == 0  # nothing left to move
    assert folded.state_dict().keys() == padded.state_dict().keys()
    x = torch.rand(4, 3, 32, 32)
    outputs = []
    for tower in (padded, folded):
        xx = x.clone().requires_grad_(True)
        features = tower.extract_features(xx)
        (grad,) = torch.autograd.grad(features.square().sum(), xx)
        outputs.append((features.detach(), grad))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])
