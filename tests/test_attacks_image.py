"""Image attacks (FGSM, PGD, APGD-CE, APGD-DLR) on tiny in-test models: budgets, strength,
model state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medshield.attacks import APGD, APGDDLR, FGSM, PGD, Attack, dlr_loss
from medshield.attacks.apgd import checkpoints
from medshield.attacks.pgd import pgd_step_size
from medshield.errors import InputError
from medshield.models import DualEncoder, ZeroShotClassifier
from medshield.registry import IMAGE_ATTACKS

NUM_CLASSES = 3


def make_data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 1x8x8 images: a fixed class pattern in [0.4, 0.6] plus seeded noise."""
    patterns = 0.4 + 0.2 * torch.rand(
        NUM_CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.arange(n) % NUM_CLASSES
    noise = 0.12 * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (patterns[labels] + noise).clamp(0, 1), labels


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, NUM_CLASSES)
    )


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    images, labels = make_data()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    model.eval()
    test_images, test_labels = make_data(n=90, seed=1)
    return model, test_images, test_labels


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


ATTACK_CONFIGS = {
    "fgsm": lambda m: FGSM(m, eps=16),
    "pgd-linf": lambda m: PGD(m, eps=16, alpha=4, steps=5),
    "pgd-l2": lambda m: PGD(m, eps=200, alpha=60, steps=5, norm="L2"),
    "pgd-restarts": lambda m: PGD(m, eps=16, alpha=4, steps=3, restarts=2),
    "apgd-linf": lambda m: APGD(m, eps=16, steps=8),
    "apgd-l2": lambda m: APGD(m, eps=200, steps=8, norm="L2", restarts=2),
    "apgd-dlr-linf": lambda m: APGDDLR(m, eps=16, steps=8),
    "apgd-dlr-l2": lambda m: APGDDLR(m, eps=200, steps=8, norm="L2"),
}


def test_registry_has_the_image_attacks() -> None:
    assert {"fgsm", "pgd", "apgd-ce"} <= set(IMAGE_ATTACKS.names())
    assert IMAGE_ATTACKS.get("fgsm") is FGSM and IMAGE_ATTACKS.get("pgd") is PGD
    assert IMAGE_ATTACKS.get("apgd-ce") is APGD and IMAGE_ATTACKS.get("apgd-dlr") is APGDDLR
    for cls in (FGSM, PGD, APGD, APGDDLR):
        assert cls.paper and cls.threat_model and "Arguments" in cls.__doc__


def test_one_step_size_rule_for_pgd_without_an_explicit_alpha() -> None:
    from medshield.train.finetune.config import AdversaryConfig

    assert pgd_step_size(2, 2) == 2.5  # Madry's 2.5 * eps / steps: few steps cross the ball
    assert pgd_step_size(2, 10) == 0.5
    assert pgd_step_size(2, 50) == 0.5  # floored at eps / 4, not eps / 20
    assert AdversaryConfig(eps=4, steps=20).step_size == pgd_step_size(4, 20) == 1.0
    assert AdversaryConfig(eps=4, steps=20, alpha=0.3).step_size == 0.3
    with pytest.raises(InputError, match="steps"):
        pgd_step_size(2, 0)


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("name", list(ATTACK_CONFIGS))
def test_budget_range_shape_and_dtype(trained, name: str, targeted: bool) -> None:
    model, images, labels = trained
    images = images.clone()
    images[:, :, 0, :] = 0.0  # values at the edges of [0, 1] exercise the clipping
    images[:, :, 1, :] = 1.0
    attack = ATTACK_CONFIGS[name](model)
    targets = (labels + 1) % NUM_CLASSES if targeted else None
    adv = attack(images, labels, targets)
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert adv.device == images.device and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - images).flatten(1)
    eps = attack.eps / 255
    if getattr(attack, "norm", "Linf") == "Linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert delta.abs().max() > 0  # it did move


def test_untargeted_pgd_breaks_the_model_and_fgsm_at_zero_is_identity(trained) -> None:
    model, images, labels = trained
    assert accuracy(model, images, labels) >= 0.95
    adv = PGD(model, eps=64, alpha=8, steps=20)(images, labels)
    assert accuracy(model, adv, labels) <= 0.05
    assert torch.equal(FGSM(model, eps=0)(images, labels), images)


def test_targeted_pgd_hits_the_target(trained) -> None:
    model, images, labels = trained
    targets = (labels + 1) % NUM_CLASSES
    adv = PGD(model, eps=64, alpha=8, steps=20)(images, labels, targets)
    with torch.no_grad():
        hit = (model(adv).argmax(1) == targets).float().mean().item()
    assert hit >= 0.95


def test_restarts_are_never_worse_than_one_run(trained) -> None:
    model, images, labels = trained
    single_attack = PGD(model, eps=6, alpha=1.5, steps=5)
    multi_attack = PGD(model, eps=6, alpha=1.5, steps=5, restarts=4)
    torch.manual_seed(3)
    single = single_attack(images, labels)
    torch.manual_seed(3)  # same seed: the first of the four runs is the single run
    multi = multi_attack(images, labels)
    with torch.no_grad():
        out_single, out_multi = model(single), model(multi)
    loss_single = F.cross_entropy(out_single, labels, reduction="none")
    loss_multi = F.cross_entropy(out_multi, labels, reduction="none")
    fooled_single, fooled_multi = out_single.argmax(1) != labels, out_multi.argmax(1) != labels
    assert not (fooled_single & ~fooled_multi).any()
    both_robust = ~fooled_single & ~fooled_multi
    assert (loss_multi[both_robust] >= loss_single[both_robust] - 1e-6).all()
    assert fooled_multi.sum() > fooled_single.sum() or (loss_multi > loss_single + 1e-4).any()


def test_apgd_is_at_least_as_strong_as_pgd(trained) -> None:
    model, images, labels = trained
    one_example = 1 / len(labels)
    for eps in (8, 12):
        torch.manual_seed(0)
        apgd = accuracy(model, APGD(model, eps=eps, steps=20)(images, labels), labels)
        pgd = accuracy(model, PGD(model, eps=eps, alpha=eps / 4, steps=20)(images, labels), labels)
        small_steps = PGD(model, eps=eps, alpha=eps / 10, steps=20)(images, labels)
        assert apgd < accuracy(model, images, labels)
        assert apgd <= pgd + one_example  # equal up to one example on this near-linear model
        assert apgd <= accuracy(model, small_steps, labels)  # no step size to tune


def test_apgd_checkpoints_follow_the_paper() -> None:
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 -> ceil(100 p)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_model_mode_flags_and_grads_are_left_alone(trained) -> None:
    _, images, labels = trained
    model = make_model(seed=1)
    model.train()
    model[1].eval()  # a submodule deliberately in another mode than its parent
    model[1].weight.requires_grad_(False)
    model[4].bias.grad = torch.full_like(model[4].bias, 7.0)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]

    seen_modes = []

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen_modes.append(model.training or any(m.training for m in model.modules()))
        return F.cross_entropy(logits, y, reduction="none")

    for attack in (PGD(model, eps=8, steps=3, loss_fn=loss_fn), APGD(model, eps=8, steps=3)):
        attack(images, labels)
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert torch.equal(model[4].bias.grad, torch.full_like(model[4].bias, 7.0))
        assert model[1].weight.grad is None and model[4].weight.grad is None
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert seen_modes and not any(seen_modes)  # the attack ran the model in eval mode

    with pytest.raises(InputError):  # restored on errors too
        PGD(model, eps=8, steps=1)(images, labels + 10)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_bad_inputs_give_input_errors(trained) -> None:
    model, images, labels = trained
    attack = PGD(model, eps=8, steps=1)
    targets = (labels + 1) % NUM_CLASSES
    bad_calls = [
        lambda: attack(images, labels[:-1]),  # wrong length
        lambda: attack(images, labels.float()),  # float labels with cross-entropy
        lambda: attack(images, labels.tolist()),  # not a tensor
        lambda: attack(images, labels, targets[:3]),  # wrong target length
        lambda: attack(images, labels + NUM_CLASSES),  # label out of range
        lambda: attack(images * 2, labels),  # images outside [0, 1]
        lambda: attack(images.squeeze(1), labels),  # not NCHW
        lambda: PGD(model, eps=-1),
        lambda: PGD(model, eps=math.nan),
        lambda: PGD(model, alpha=-1),
        lambda: PGD(model, norm="L1"),
        lambda: PGD(model, steps=0),
        lambda: PGD(model, restarts=2, random_start=False),
        lambda: APGD(model, restarts=0),
        lambda: FGSM(lambda x: x),
        lambda: PGD(model, loss_fn=lambda out, y: F.cross_entropy(out, y))(images, labels),
    ]
    for call in bad_calls:
        with pytest.raises(InputError):
            call()


def test_subclass_with_an_embedding_loss(trained) -> None:
    """The ``loss_fn`` hook: labels may be any per-example tensor, e.g. target embeddings."""
    model, images, _ = trained
    features = model[:3]  # (N, 32) hidden features
    with torch.no_grad():
        clean = F.normalize(features(images), dim=-1)

    def away_from(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(output, reference, dim=-1)

    adv = PGD(features, eps=32, alpha=8, steps=10, loss_fn=away_from)(images, clean)
    with torch.no_grad():
        similarity = F.cosine_similarity(features(adv), clean, dim=-1)
    assert similarity.mean() < 0.9  # random noise of this size keeps it above 0.99
    assert (adv - images).abs().max() <= 32 / 255 + 1e-6


class TinyDualEncoder(DualEncoder):
    """A 2-class toy dual encoder: a linear image tower; texts embed by keyword."""

    image_size = 8
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.25, 0.25, 0.25)

    def __init__(self) -> None:
        super().__init__()
        self.init_kwargs = {}
        torch.manual_seed(0)
        self.image_tower = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tower(pixels)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        rows = [[1.0, 0.0, 0.0, 0.0] if "normal" in t else [0.0, 1.0, 0.0, 0.0] for t in texts]
        return torch.tensor(rows)


def test_zero_shot_classifier_over_a_dual_encoder() -> None:
    encoder = TinyDualEncoder()
    classifier = ZeroShotClassifier(encoder, [["a normal scan"], ["a scan with pneumonia"]])
    modes = [m.training for m in classifier.modules()]
    images = torch.rand(16, 1, 16, 16)  # grayscale, another size: the wrapper handles both
    with torch.no_grad():
        labels = classifier(images).argmax(1)  # the model's own predictions are "correct"
    for attack in (PGD(classifier, eps=32, alpha=8, steps=10), APGD(classifier, eps=32, steps=10)):
        adv = attack(images, labels)
        assert (adv - images).abs().max() <= 32 / 255 + 1e-6
        assert accuracy(classifier, adv, labels) <= 0.25
    assert [m.training for m in classifier.modules()] == modes
    assert all(p.requires_grad for p in encoder.parameters())

    # the encoder itself, with a loss over embeddings: push images away from their captions
    captions = encoder.encode_text(["a normal scan" if c == 0 else "pneumonia" for c in labels])
    with pytest.raises(InputError, match="loss_fn"):
        PGD(encoder)
    away = PGD(encoder, eps=32, alpha=8, steps=10, loss_fn=lambda emb, t: -(emb * t).sum(-1))
    with torch.no_grad():
        before = (encoder.encode_image(images) * captions).sum(-1)
        after = (encoder.encode_image(away(images, captions.detach())) * captions).sum(-1)
    assert (after < before).all()


def test_attack_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        Attack(make_model())  # type: ignore[abstract]


def test_dlr_loss_matches_the_reference_formula() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.5, 2.0, 1.5, 0.0], [1.0, 4.0, 2.0, 3.0]])
    labels = torch.tensor([0, 0, 3])
    # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), z sorted descending
    expected = torch.tensor([-(3 - 1) / (3 - 0), -(0.5 - 2) / (2 - 0.5), -(3 - 4) / (4 - 2)])
    assert torch.allclose(dlr_loss(logits, labels), expected)
    # invariant to shifting and scaling the logits
    assert torch.allclose(dlr_loss(7 * logits - 5, labels), expected, atol=1e-6)
    # two classes: the plain margin loss -(z_y - z_other)
    binary = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    assert torch.allclose(dlr_loss(binary, torch.tensor([0, 0])), torch.tensor([-3.0, 0.5]))
    with pytest.raises(InputError, match="at least 2 classes"):
        dlr_loss(torch.zeros(2, 1), torch.tensor([0, 0]))
    with pytest.raises(InputError, match="DLR loss needs"):
        dlr_loss(torch.zeros(2, 3, 1), torch.tensor([0, 0]))


def test_apgd_dlr_is_at_least_as_strong_as_fgsm(trained) -> None:
    model, images, labels = trained
    torch.manual_seed(0)
    dlr = accuracy(model, APGDDLR(model, eps=8, steps=20)(images, labels), labels)
    fgsm = accuracy(model, FGSM(model, eps=8)(images, labels), labels)
    assert dlr < accuracy(model, images, labels)
    assert dlr <= fgsm


def test_apgd_dlr_ignores_the_logit_scale_that_masks_cross_entropy(trained) -> None:
    model, images, labels = trained
    scaled = nn.Sequential(model, nn.Identity())
    scaled.register_forward_hook(lambda _m, _i, out: out * 1e4)  # saturates the softmax
    clean = accuracy(model, images, labels)
    torch.manual_seed(0)
    ce = accuracy(model, APGD(scaled, eps=8, steps=20)(images, labels), labels)
    torch.manual_seed(0)
    dlr = accuracy(model, APGDDLR(scaled, eps=8, steps=20)(images, labels), labels)
    assert dlr < ce <= clean


class CountingModel(nn.Module):
    """Counts the images that go through a forward pass with an input gradient (attack
    steps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.graded = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.graded += len(x) if x.requires_grad else 0
        return self.model(x)


EARLY_STOP_CONFIGS = {
    "pgd": lambda m, stop: PGD(m, eps=4, alpha=1, steps=8, restarts=3, early_stop=stop),
    "apgd-ce": lambda m, stop: APGD(m, eps=4, steps=10, restarts=2, early_stop=stop),
    "apgd-dlr": lambda m, stop: APGDDLR(m, eps=4, steps=10, early_stop=stop),
    "pgd-l2": lambda m, stop: PGD(m, eps=50, alpha=15, steps=6, norm="L2", early_stop=stop),
}


@pytest.mark.parametrize("name", list(EARLY_STOP_CONFIGS))
def test_early_stop_never_raises_robust_accuracy_and_takes_fewer_steps(trained, name) -> None:
    model, images, labels = trained
    runs = {}
    for stop in (False, True):
        counting = CountingModel(model)
        torch.manual_seed(5)
        adv = EARLY_STOP_CONFIGS[name](counting, stop)(images, labels)
        after = torch.rand(1)  # the same random numbers drawn: later attacks start the same
        with torch.no_grad():
            robust = model(adv).argmax(1) == labels
        runs[stop] = adv, robust, counting.graded, after
    (adv_off, robust_off, steps_off, after_off), (adv_on, robust_on, steps_on, after_on) = (
        runs[False],
        runs[True],
    )
    assert 0 < robust_off.sum() < len(labels)  # some images fall, some hold
    assert not (robust_on & ~robust_off).any()  # never robust where the full run broke it
    assert torch.equal(robust_on, robust_off)  # and on this seeded case: the same accuracy
    # an image that held went through the same iterates, so it ends at the same point
    assert torch.allclose(adv_on[robust_on], adv_off[robust_on], atol=1e-6)
    assert steps_on < steps_off
    assert torch.equal(after_on, after_off)
    assert ((adv_on - images).abs().amax() <= 4 / 255 + 1e-6) or name == "pgd-l2"


def test_early_stop_has_no_effect_without_a_success_test(trained) -> None:
    model, images, labels = trained

    def loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, y, reduction="none")

    out = []
    for stop in (False, True):
        torch.manual_seed(2)
        out.append(
            PGD(model, eps=4, alpha=1, steps=4, loss_fn=loss, early_stop=stop)(images, labels)
        )
    assert torch.equal(out[0], out[1])
