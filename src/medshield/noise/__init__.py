"""Noisy upstream data: craft adversarial image-caption pairs, store them, read them back."""

from medshield.noise.craft import (
    choose_perturbed,
    craft_noisy_dataset,
    file_sha256,
    state_dict_sha256,
)
from medshield.noise.dataset import NoisyCaptionDataset
from medshield.noise.mix import NoisyMix

__all__ = [
    "NoisyCaptionDataset",
    "NoisyMix",
    "choose_perturbed",
    "craft_noisy_dataset",
    "file_sha256",
    "state_dict_sha256",
]
