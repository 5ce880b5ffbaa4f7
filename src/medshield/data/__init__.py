"""Data layer: modalities, MedMNIST loaders, image-caption pairs and VQA-RAD."""

from medshield.data.captions import ImageCaptionDataset
from medshield.data.medmnist import (
    MedMNISTSplit,
    available_modalities,
    class_balanced_indices,
    data_root,
    load_split,
    missing_data_error,
)
from medshield.data.modalities import MODALITIES, Modality, get_modality
from medshield.data.vqa_rad import VQAItem, load_vqa_image, load_vqa_rad

__all__ = [
    "MODALITIES",
    "ImageCaptionDataset",
    "MedMNISTSplit",
    "Modality",
    "VQAItem",
    "available_modalities",
    "class_balanced_indices",
    "data_root",
    "get_modality",
    "load_split",
    "load_vqa_image",
    "load_vqa_rad",
    "missing_data_error",
]
