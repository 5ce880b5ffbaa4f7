"""The benign half of the demonstration defense's grammar (:mod:`medshield.defense.text`): per
modality, the facts that answer each benign topic (true of the modality and of its synthetic
image), and the question and answer templates of each topic.
"""

from __future__ import annotations

from medshield.data.modalities import MODALITIES

FACTS: dict[str, dict[str, str]] = {
    "chest_xray": {
        "identify_modality": "a frontal chest radiograph (chest X-ray)",
        "normal_appearance": "dark, clear lung fields on both sides, symmetric ribs, a heart "
        "shadow narrower than half the chest width, and sharp diaphragm domes and "
        "costophrenic angles",
        "visible_structures": "the ribs, the two dark lung fields, the mediastinum and heart "
        "shadow in the middle, the spine behind them and the domes of the diaphragm",
        "clinical_use": "looking for pneumonia, fluid around the lungs, a collapsed lung, an "
        "enlarged heart and the position of lines and tubes",
        "reading_tip": "Air-filled lung absorbs few X-rays and looks dark, while bone and soft "
        "tissue absorb more and look bright; pneumonia shows up as a hazy white area within a "
        "lung field.",
    },
    "fundus": {
        "identify_modality": "a colour fundus photograph of the retina",
        "normal_appearance": "a well-defined optic disc, arteries and veins arching away from "
        "the disc, a darker macula with the fovea at its centre, and no haemorrhages, exudates "
        "or abnormal new vessels",
        "visible_structures": "the bright optic disc, retinal blood vessels branching from it, "
        "the darker fovea and the dark border of the photograph's circular field",
        "clinical_use": "screening for diabetic retinopathy and assessing glaucoma, "
        "hypertensive changes and other retinal disease",
        "reading_tip": "Signs of diabetic retinopathy include microaneurysms, blot "
        "haemorrhages, hard exudates and cotton-wool spots, and abnormal new vessels in "
        "proliferative disease.",
    },
    "retinal_oct": {
        "identify_modality": "an optical coherence tomography (OCT) cross-section of the retina",
        "normal_appearance": "a smooth foveal pit, distinct alternating bright and dark retinal "
        "layers, a continuous bright retinal pigment epithelium band and no fluid pockets or "
        "elevations",
        "visible_structures": "the stacked retinal layers with the bright nerve fibre layer on "
        "top, the dip of the fovea, the bright retinal pigment epithelium band and the choroid "
        "beneath it",
        "clinical_use": "diagnosing and monitoring macular degeneration, diabetic macular "
        "oedema and drusen, and guiding anti-VEGF treatment",
        "reading_tip": "The grainy texture is speckle from the coherent light OCT uses; fluid "
        "appears as dark spaces within or under the retina.",
    },
    "colon_pathology": {
        "identify_modality": "a haematoxylin and eosin (H&E) stained histology image of colon "
        "tissue",
        "normal_appearance": "regular crypts lined by a single layer of columnar epithelium with "
        "goblet cells, small uniform basal nuclei, and lamina propria between the crypts",
        "visible_structures": "pink eosin-stained tissue, many purple haematoxylin-stained "
        "nuclei and white spaces from gland lumens",
        "clinical_use": "diagnosing colorectal cancer, polyps and inflammatory bowel disease",
        "reading_tip": "Haematoxylin stains nuclei blue to purple and eosin stains cytoplasm and "
        "connective tissue pink.",
    },
    "blood_cell": {
        "identify_modality": "a stained peripheral blood smear seen under the microscope",
        "normal_appearance": "round red cells of similar size with a pale centre, occasional "
        "white cells with normal nuclei, and scattered small platelets",
        "visible_structures": "red blood cells with a pale centre and one white blood cell "
        "whose nucleus stains purple",
        "clinical_use": "assessing anaemia, infection, leukaemia and other blood disorders by "
        "examining and classifying blood cells",
        "reading_tip": "The pale centre of a red cell reflects its biconcave disc shape; white "
        "cells are told apart by their nucleus shape and cytoplasmic granules.",
    },
    "kidney_cortex": {
        "identify_modality": "a microscopy image of kidney cortex tissue",
        "normal_appearance": "rounded glomeruli surrounded by closely packed tubules, each lined "
        "by a single layer of epithelial cells around an open lumen",
        "visible_structures": "tubule cross-sections, seen as rings of cells around a lumen, and "
        "a glomerulus, seen as a rounded tuft of capillaries",
        "clinical_use": "studying kidney disease in biopsies, such as glomerulonephritis, "
        "tubular injury and transplant rejection",
        "reading_tip": "The cortex holds the glomeruli, which filter the blood, and the proximal "
        "and distal tubules, which reabsorb water and solutes.",
    },
    "dermatoscopy": {
        "identify_modality": "a dermatoscopic (dermoscopy) image of a pigmented skin lesion",
        "normal_appearance": "a benign mole that is small and symmetric with a regular pigment "
        "network, even colour and a sharp, smooth border",
        "visible_structures": "a brown pigmented lesion on the surrounding skin, its pigment "
        "pattern, a few hairs and the dark corners of the dermatoscope's round field",
        "clinical_use": "assessing pigmented skin lesions and deciding which need a biopsy to "
        "exclude melanoma",
        "reading_tip": "The ABCDE rule flags Asymmetry, Border irregularity, Colour variation, "
        "a Diameter over about six millimetres and Evolution over time; only a biopsy confirms "
        "a diagnosis.",
    },
    "breast_ultrasound": {
        "identify_modality": "a breast ultrasound (sonography) image",
        "normal_appearance": "layers of skin, subcutaneous fat, fibroglandular tissue and the "
        "chest wall with a fine speckled texture and no focal mass",
        "visible_structures": "the fan-shaped field of view, the speckled texture of breast "
        "tissue, a dark (hypoechoic) area and an acoustic shadow beneath it",
        "clinical_use": "characterising breast lumps found on examination or mammography and "
        "guiding needle biopsies",
        "reading_tip": "Dark (hypoechoic) areas reflect little sound; a simple cyst is black "
        "with bright enhancement behind it, while an irregular solid mass with a shadow needs "
        "further work-up, usually a biopsy.",
    },
    "abdominal_ct": {
        "identify_modality": "an axial computed tomography (CT) slice of the abdomen",
        "normal_appearance": "a liver, spleen, kidneys, aorta and vertebra of expected shape and "
        "density, with no masses, fluid collections or free air",
        "visible_structures": "the body outline with subcutaneous fat, the liver on the image's "
        "left, the spleen, both kidneys, the aorta in front of the spine, the vertebral body "
        "and some bowel gas",
        "clinical_use": "evaluating abdominal pain, trauma, tumours, infections and organ injury",
        "reading_tip": "Axial CT is viewed from the feet, so the patient's right is on the left "
        "of the image; air is black, fat dark grey, soft tissue mid grey and bone white.",
    },
}
assert set(FACTS) == set(MODALITIES), "facts for every modality"

BENIGN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "identify_modality": (
        "What kind of medical image is this?",
        "Which imaging modality is shown here?",
        "Can you tell me what type of scan this is?",
        "What am I looking at in this image?",
    ),
    "normal_appearance": (
        "What does a normal {title} usually look like?",
        "How would a healthy {title} appear?",
        "Describe the typical appearance of a normal {title}.",
        "What should I expect to see on a normal {title}?",
    ),
    "visible_structures": (
        "Which structures can you see in this {title}?",
        "Can you point out the main structures in this image?",
        "What anatomy or features are visible here?",
        "Describe what is shown in this {title}.",
    ),
    "clinical_use": (
        "What is this kind of {title} used for clinically?",
        "Why would a clinician order this kind of imaging?",
        "What conditions is this kind of {title} useful for?",
        "In what situations is this kind of {title} helpful?",
    ),
    "reading_tip": (
        "Any tips for reading an image like this one?",
        "How should a student interpret this {title}?",
        "What is a useful principle when looking at this {title}?",
        "Can you explain how to read this kind of image?",
    ),
}

BENIGN_ANSWERS: dict[str, tuple[str, ...]] = {
    "identify_modality": ("This is {fact}.", "It is {fact}.", "The image is {fact}."),
    "normal_appearance": (
        "A normal {title} shows {fact}.",
        "Typically you would see {fact}.",
        "Normally it shows {fact}.",
    ),
    "visible_structures": (
        "The image shows {fact}.",
        "Visible here are {fact}.",
        "I can see {fact}.",
    ),
    "clinical_use": (
        "This kind of image is used for {fact}.",
        "Clinicians use it for {fact}.",
        "It is helpful for {fact}.",
    ),
    "reading_tip": ("{fact}", "A useful principle to know. {fact}", "Here is the key idea. {fact}"),
}
