"""A hand-written medical synonym / near-synonym lexicon for bounded word substitution.

Source: written by the medshield authors for this project (no external thesaurus, no download).
It covers every content word of the caption templates and class names in
:mod:`medshield.data.modalities` (the nine MedMNIST modalities) plus common radiology and VQA
question words ("is there", "abnormal", "mass", "effusion", organ names, ...). Function words
("a", "the", "of", "or") and negations have no entry on purpose: swapping them changes grammar or
meaning rather than wording.

Keys are lower-case words or short phrases (words separated by single spaces, e.g. ``"is
there"``); substitutes are written as they would appear mid-sentence and may be multi-word. A
substitute is a clinical synonym, a near-synonym or a closely related term a radiologist or
pathologist could use in the same caption: the attack must keep the caption's meaning for a human
reader while moving it in the model's embedding space.
"""

from __future__ import annotations

LEXICON: dict[str, list[str]] = {
    # --- imaging modalities and acquisition -------------------------------------------------
    "x-ray": ["radiograph", "roentgenogram", "plain film", "radiographic image"],
    "radiograph": ["x-ray", "plain film", "roentgenogram", "radiographic image"],
    "radiography": ["x-ray imaging", "plain film imaging"],
    "chest": ["thorax", "thoracic", "chest wall region"],
    "frontal": ["posteroanterior", "anteroposterior", "PA"],
    "pediatric": ["paediatric", "child", "infant"],
    "image": ["scan", "picture", "view", "study"],
    "images": ["scans", "pictures", "views", "studies"],
    "scan": ["image", "study", "examination"],
    "photograph": ["photo", "picture", "image"],
    "photography": ["imaging", "photo documentation"],
    "close-up": ["magnified", "zoomed-in", "detailed"],
    "dermatoscopic": ["dermoscopic", "epiluminescence", "skin surface microscopy"],
    "dermoscopy": ["dermatoscopy", "epiluminescence microscopy", "skin surface microscopy"],
    "dermatoscopy": ["dermoscopy", "epiluminescence microscopy"],
    "optical": ["light-based", "photonic"],
    "coherence": ["interferometric", "coherent-light"],
    "tomography": ["tomographic imaging", "cross-sectional imaging"],
    "oct": ["optical coherence tomography", "retinal tomography"],
    "b-scan": ["cross-sectional scan", "b-mode scan", "tomogram"],
    "fundus": ["eye fundus", "ocular fundus", "retinal"],
    "color": ["colour", "true-color"],
    "ultrasound": ["sonography", "sonogram", "echography"],
    "sonography": ["ultrasound", "ultrasonography", "echography"],
    "microscopy": ["microscopic imaging", "light microscopy", "micrograph"],
    "microscope": ["light microscope", "magnification", "objective lens"],
    "smear": ["film", "slide", "blood film"],
    "stained": ["dyed", "colored", "colour-stained"],
    "h&e": ["hematoxylin and eosin", "haematoxylin-eosin", "HE"],
    "histology": ["histopathology", "tissue microscopy", "microanatomy"],
    "histopathology": ["histology", "tissue pathology", "microscopic pathology"],
    "pathology": ["histopathology", "histology", "tissue"],
    "patch": ["tile", "crop", "region", "section"],
    "slide": ["section", "specimen", "glass slide"],
    "ct": ["computed tomography", "CAT", "tomographic"],
    "computed": ["computerized", "computerised"],
    "slice": ["section", "cut", "cross-section"],
    "axial": ["transverse", "transaxial", "cross-sectional"],
    "centred": ["centered", "focused", "positioned"],
    "mri": ["magnetic resonance imaging", "MR scan"],
    "view": ["projection", "image"],
    "study": ["examination", "scan", "image"],
    # --- verbs and connectives -------------------------------------------------------------
    "showing": ["depicting", "demonstrating", "revealing", "displaying", "with"],
    "shows": ["depicts", "demonstrates", "reveals", "displays"],
    "show": ["depict", "demonstrate", "reveal", "display"],
    "with": ["showing", "demonstrating", "featuring", "containing"],
    "under": ["beneath", "through", "viewed under"],
    "centred on": ["focused on", "at the level of", "through"],
    "sign": ["evidence", "indication", "finding"],
    "evidence": ["sign", "indication", "finding"],
    "present": ["seen", "visible", "identified"],
    "visible": ["seen", "present", "apparent"],
    "seen": ["visible", "present", "identified"],
    # --- question words (VQA) --------------------------------------------------------------
    "is there": ["is there any", "do you see", "can you see", "does the image show"],
    "are there": ["are there any", "do you see", "can you see", "does the image show"],
    "is this": ["is the image", "does this show"],
    "does": ["do", "can"],
    "what": ["which"],
    "which": ["what"],
    "where": ["in which region", "at what location"],
    "located": ["situated", "positioned", "found"],
    "organ": ["structure", "viscus"],
    "side": ["laterality", "half"],
    "size": ["dimension", "extent"],
    "abnormal": ["pathological", "atypical", "irregular", "anomalous"],
    "abnormality": ["pathology", "anomaly", "lesion", "finding"],
    "normal": ["unremarkable", "healthy", "within normal limits", "typical"],
    "clear": ["unremarkable", "clean", "uninvolved"],
    "mass": ["lump", "tumor", "growth", "lesion"],
    "nodule": ["small mass", "lump", "nodular opacity"],
    "lesion": ["growth", "abnormality", "spot", "mark"],
    "tumor": ["tumour", "neoplasm", "mass", "growth"],
    "fracture": ["break", "broken bone", "crack"],
    "effusion": ["fluid collection", "fluid"],
    "opacity": ["opacification", "density", "shadow"],
    "enlarged": ["dilated", "increased in size", "hypertrophied"],
    "cardiomegaly": ["enlarged heart", "cardiac enlargement"],
    # --- findings and diagnoses -------------------------------------------------------------
    "pneumonia": ["consolidation", "lung infection", "pneumonitis", "airspace disease"],
    "malignant": ["cancerous", "neoplastic", "invasive", "malignancy"],
    "benign": ["non-cancerous", "harmless", "non-malignant"],
    "carcinoma": ["cancer", "malignant tumor", "malignancy"],
    "cancer": ["carcinoma", "malignancy", "malignant tumor"],
    "cancer-associated": ["tumor-associated", "cancer-related", "tumor-related"],
    "adenocarcinoma": ["glandular carcinoma", "glandular cancer"],
    "melanoma": ["malignant melanoma", "melanocytic cancer", "skin cancer"],
    "nevus": ["mole", "naevus", "birthmark"],
    "melanocytic": ["pigmented", "melanocyte", "mole-type"],
    "keratosis": ["keratotic lesion", "scaly patch", "keratinocyte growth"],
    "actinic": ["solar", "sun-induced", "sun-damaged"],
    "basal": ["basaloid", "base-layer"],
    "dermatofibroma": ["fibrous histiocytoma", "benign fibrous nodule", "skin fibroma"],
    "vascular": ["vessel", "blood-vessel", "angiomatous"],
    "choroidal": ["choroid", "subretinal"],
    "neovascularization": ["neovascularisation", "new vessel growth", "abnormal vessel formation"],
    "diabetic": ["diabetes-related", "diabetes-associated", "hyperglycemic"],
    "macular": ["foveal", "central retinal"],
    "edema": ["oedema", "swelling", "fluid accumulation"],
    "drusen": ["yellow deposits", "retinal deposits", "lipid deposits"],
    "retinopathy": ["retinal disease", "retinal damage", "retinal microangiopathy"],
    "mild": ["slight", "early", "minimal"],
    "moderate": ["intermediate", "medium", "mid-grade"],
    "severe": ["advanced", "marked", "serious"],
    "proliferative": ["neovascular", "advanced proliferating", "growing"],
    "debris": ["necrotic debris", "detritus", "cell remnants"],
    "mucus": ["mucin", "mucoid material", "secretion"],
    "stroma": ["connective tissue", "supporting tissue", "stromal tissue"],
    "background": ["empty area", "non-tissue area", "blank region"],
    "adipose": ["fatty", "fat", "lipid-rich"],
    "smooth": ["involuntary", "non-striated", "visceral"],
    # --- anatomy ----------------------------------------------------------------------------
    "lungs": ["pulmonary fields", "lung fields", "lung parenchyma"],
    "lung": ["pulmonary", "lung field", "pulmonary lobe"],
    "heart": ["cardiac silhouette", "myocardium", "cardiac shadow"],
    "liver": ["hepatic parenchyma", "hepar", "hepatic region"],
    "kidney": ["renal", "nephric", "renal parenchyma"],
    "renal": ["kidney", "nephric"],
    "bladder": ["urinary bladder", "vesica", "vesical region"],
    "femur": ["thigh bone", "femoral bone", "femoral shaft"],
    "pancreas": ["pancreatic gland", "pancreatic parenchyma"],
    "spleen": ["splenic parenchyma", "lien", "splenic region"],
    "abdominal": ["abdomen", "belly", "abdominopelvic"],
    "left": ["left-sided", "sinistral"],
    "right": ["right-sided", "dextral"],
    "breast": ["mammary", "mammary gland"],
    "skin": ["cutaneous", "dermal", "epidermal"],
    "retina": ["retinal layer", "neural retina", "fundus"],
    "retinal": ["retina", "fundus", "ocular"],
    "macula": ["fovea", "macula lutea", "central retina"],
    "colon": ["large bowel", "large intestine", "colonic"],
    "colorectal": ["colonic", "large bowel", "bowel"],
    "mucosa": ["mucous membrane", "lining", "epithelial lining"],
    "epithelium": ["epithelial lining", "epithelial tissue", "lining cells"],
    "muscle": ["muscularis", "muscle tissue", "musculature"],
    "tissue": ["parenchyma", "specimen", "tissue sample"],
    "cortex": ["cortical tissue", "outer layer", "cortical region"],
    "duct": ["canal", "channel", "ductule"],
    "tubule": ["renal tubule", "nephron tubule", "small tube"],
    "collecting": ["draining", "gathering"],
    "connecting": ["linking", "joining"],
    "distal": ["far", "downstream", "terminal"],
    "proximal": ["near", "upstream", "initial"],
    "convoluted": ["coiled", "twisted", "winding"],
    "glomerular": ["glomerulus", "capillary tuft"],
    "interstitial": ["intertubular", "stromal", "between-tubule"],
    "endothelial": ["vascular lining", "endothelium", "vessel-lining"],
    "limb": ["segment", "loop limb", "branch"],
    "ascending": ["rising", "upward", "uphill"],
    "thick": ["wide", "broad", "thick-walled"],
    "segments": ["sections", "portions", "parts"],
    # --- cells ------------------------------------------------------------------------------
    "cell": ["cellular", "cytology", "blood-cell"],
    "cells": ["cell population", "cytes", "cellular elements"],
    "blood": ["hematologic", "haematological", "peripheral blood"],
    "peripheral": ["circulating", "systemic", "venous"],
    "basophil": ["basophilic granulocyte", "basophilic leukocyte"],
    "eosinophil": ["eosinophilic granulocyte", "acidophil", "eosinophilic leukocyte"],
    "erythroblast": ["nucleated red cell", "normoblast", "red cell precursor"],
    "immature": ["young", "precursor", "undeveloped"],
    "granulocyte": ["myeloid cell", "granular leukocyte", "polymorphonuclear cell"],
    "lymphocyte": ["lymphoid cell", "mononuclear lymphoid cell", "white lymph cell"],
    "lymphocytes": ["lymphoid cells", "lymphocytic infiltrate", "immune cells"],
    "monocyte": ["mononuclear phagocyte", "large mononuclear cell"],
    "neutrophil": ["neutrophilic granulocyte", "polymorph", "segmented neutrophil"],
    "platelet": ["thrombocyte", "clotting cell", "blood platelet"],
    "leukocytes": ["white blood cells", "white cells", "leucocytes"],
    "podocytes": ["visceral epithelial cells", "glomerular epithelial cells", "foot cells"],
}


def candidates(word: str, lexicon: dict[str, list[str]] | None = None) -> list[str]:
    """Substitutes for ``word`` (a word or a space-separated phrase), matching its case.

    Lookup is case-insensitive. A word written in capitals with more than one letter (an
    acronym such as ``"OCT"``) gets the substitutes as written in the lexicon; a capitalised word
    (``"Pneumonia"``, ``"X-ray"``) gets substitutes with a capital first letter; anything else gets
    them as written. An unknown word has no substitutes.

    Args:
        word: the word or phrase to replace.
        lexicon: the table to use (default: :data:`LEXICON`).

    Example::

        >>> candidates("Lesion")[:2]
        ['Growth', 'Abnormality']
    """
    table = LEXICON if lexicon is None else lexicon
    subs = table.get(" ".join(word.lower().split()), [])
    if word[:1].isupper() and not (len(word) > 1 and word.isupper()):
        return [s[:1].upper() + s[1:] for s in subs]
    return list(subs)
