"""The nine imaging modalities, their MedMNIST subsets, class names and caption templates.

Class names are kept here (copied from ``medmnist.INFO`` 3.0.2) so nothing needs the network or
the ``medmnist`` package; ``tests/test_modalities.py`` checks they still agree with
``medmnist.INFO`` when that package is importable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from medshield.errors import UnknownNameError


@dataclass(frozen=True)
class Modality:
    """One imaging modality.

    Attributes:
        name: registry key, e.g. ``"chest_xray"``.
        title: human-readable name, e.g. ``"chest X-ray"``.
        subsets: MedMNIST subsets holding this modality, preferred first.
        medmnist_labels: the label names exactly as in ``medmnist.INFO[subset]["label"]``.
        class_names: the phrase used for each class in captions and zero-shot prompts.
        templates: caption templates with one ``{}`` slot for the class phrase.
    """

    name: str
    title: str
    subsets: tuple[str, ...]
    medmnist_labels: tuple[str, ...]
    class_names: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def captions(self, label: int) -> list[str]:
        """Every caption of class ``label`` (one per template)."""
        return [t.format(self.class_names[label]) for t in self.templates]

    def sample_caption(self, label: int, rng: random.Random) -> str:
        return rng.choice(self.templates).format(self.class_names[label])

    def prompts(self) -> list[list[str]]:
        """Zero-shot prompts: for each class, the captions of every template."""
        return [self.captions(c) for c in range(self.num_classes)]


_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in [
        Modality(
            name="chest_xray",
            title="chest X-ray",
            subsets=("pneumoniamnist",),
            medmnist_labels=("normal", "pneumonia"),
            class_names=("clear lungs with no sign of pneumonia", "pneumonia"),
            templates=(
                "a chest X-ray showing {}",
                "a frontal chest radiograph with {}",
                "pediatric chest X-ray: {}",
                "radiograph of the chest with {}",
            ),
        ),
        Modality(
            name="dermatoscopy",
            title="dermatoscopy",
            subsets=("dermamnist",),
            medmnist_labels=(
                "actinic keratoses and intraepithelial carcinoma",
                "basal cell carcinoma",
                "benign keratosis-like lesions",
                "dermatofibroma",
                "melanoma",
                "melanocytic nevi",
                "vascular lesions",
            ),
            class_names=(
                "actinic keratosis",
                "basal cell carcinoma",
                "benign keratosis",
                "dermatofibroma",
                "melanoma",
                "a melanocytic nevus",
                "a vascular lesion",
            ),
            templates=(
                "a dermatoscopic image of {}",
                "dermoscopy of a skin lesion showing {}",
                "a close-up skin photograph of {}",
            ),
        ),
        Modality(
            name="retinal_oct",
            title="retinal OCT",
            subsets=("octmnist",),
            medmnist_labels=(
                "choroidal neovascularization",
                "diabetic macular edema",
                "drusen",
                "normal",
            ),
            class_names=(
                "choroidal neovascularization",
                "diabetic macular edema",
                "drusen",
                "a normal retina",
            ),
            templates=(
                "an optical coherence tomography scan of the retina showing {}",
                "a retinal OCT image with {}",
                "OCT B-scan of the macula: {}",
            ),
        ),
        Modality(
            name="fundus",
            title="fundus photography",
            subsets=("retinamnist",),
            medmnist_labels=("0", "1", "2", "3", "4"),
            class_names=(
                "no diabetic retinopathy",
                "mild diabetic retinopathy",
                "moderate diabetic retinopathy",
                "severe diabetic retinopathy",
                "proliferative diabetic retinopathy",
            ),
            templates=(
                "a fundus photograph showing {}",
                "a retinal fundus image with {}",
                "color fundus photography: {}",
            ),
        ),
        Modality(
            name="breast_ultrasound",
            title="breast ultrasound",
            subsets=("breastmnist",),
            medmnist_labels=("malignant", "normal, benign"),
            class_names=("a malignant tumor", "normal or benign tissue"),
            templates=(
                "a breast ultrasound image showing {}",
                "an ultrasound scan of the breast with {}",
                "breast sonography: {}",
            ),
        ),
        Modality(
            name="blood_cell",
            title="blood cell microscopy",
            subsets=("bloodmnist",),
            medmnist_labels=(
                "basophil",
                "eosinophil",
                "erythroblast",
                "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                "lymphocyte",
                "monocyte",
                "neutrophil",
                "platelet",
            ),
            class_names=(
                "a basophil",
                "an eosinophil",
                "an erythroblast",
                "an immature granulocyte",
                "a lymphocyte",
                "a monocyte",
                "a neutrophil",
                "a platelet",
            ),
            templates=(
                "a microscopy image of a blood smear showing {}",
                "a peripheral blood cell image of {}",
                "stained blood cell under the microscope: {}",
            ),
        ),
        Modality(
            name="colon_pathology",
            title="colon pathology",
            subsets=("pathmnist",),
            medmnist_labels=(
                "adipose",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ),
            class_names=(
                "adipose tissue",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ),
            templates=(
                "an H&E stained histology patch of colon tissue showing {}",
                "a colorectal pathology slide with {}",
                "histopathology of the colon: {}",
            ),
        ),
        Modality(
            name="kidney_cortex",
            title="kidney cortex microscopy",
            subsets=("tissuemnist",),
            medmnist_labels=(
                "Collecting Duct, Connecting Tubule",
                "Distal Convoluted Tubule",
                "Glomerular endothelial cells",
                "Interstitial endothelial cells",
                "Leukocytes",
                "Podocytes",
                "Proximal Tubule Segments",
                "Thick Ascending Limb",
            ),
            class_names=(
                "a collecting duct or connecting tubule",
                "a distal convoluted tubule",
                "glomerular endothelial cells",
                "interstitial endothelial cells",
                "leukocytes",
                "podocytes",
                "proximal tubule segments",
                "the thick ascending limb",
            ),
            templates=(
                "a microscopy image of kidney cortex showing {}",
                "a kidney tissue cell image of {}",
                "renal cortex microscopy: {}",
            ),
        ),
        Modality(
            name="abdominal_ct",
            title="abdominal CT",
            subsets=("organamnist", "organcmnist", "organsmnist"),
            medmnist_labels=_ORGANS,
            class_names=(
                "the bladder",
                "the left femur",
                "the right femur",
                "the heart",
                "the left kidney",
                "the right kidney",
                "the liver",
                "the left lung",
                "the right lung",
                "the pancreas",
                "the spleen",
            ),
            templates=(
                "an abdominal CT slice showing {}",
                "a computed tomography image of {}",
                "axial CT scan centred on {}",
            ),
        ),
    ]
}


def get_modality(name: str) -> Modality:
    """Look a modality up by name (``chest_xray``) or by one of its MedMNIST subsets."""
    if name in MODALITIES:
        return MODALITIES[name]
    for m in MODALITIES.values():
        if name in m.subsets:
            return m
    raise UnknownNameError(f"unknown modality {name!r}; known modalities: {', '.join(MODALITIES)}")
