"""Word-substitution text attack: lexicon, TextAttack-style parts and the composed attack."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from medshield.attacks.text import (
    DEFAULT_PROTECTED,
    LEXICON,
    Edit,
    EmbeddingDistanceGoal,
    LexiconSubstitution,
    MaxEdits,
    NoRepeatPosition,
    SemanticSimilarity,
    Sentence,
    WordSubstitutionAttack,
    candidates,
)
from medshield.data.modalities import MODALITIES
from medshield.errors import InputError
from medshield.models.base import DualEncoder
from medshield.registry import TEXT_ATTACKS

WORD = re.compile(r"[A-Za-z0-9]+(?:[-&'][A-Za-z0-9]+)*")
FUNCTION_WORDS = {"a", "an", "the", "of", "on", "or", "no"}

# --- a toy dual encoder: weighted bag of words --------------------------------------------------
# word -> (dimension, weight). Synonyms that share a dimension are "close" for the model;
# "consolidation" has its own heavy dimension, so swapping it in moves the text the most.
VOCAB = {
    "a": (5, 0.5),
    "chest": (0, 1.0),
    "x-ray": (1, 1.0),
    "radiograph": (1, 1.0),
    "showing": (2, 1.0),
    "depicting": (2, 1.0),
    "with": (6, 1.0),
    "pneumonia": (3, 3.0),
    "pneumonitis": (3, 3.0),
    "consolidation": (4, 3.0),
    "no": (6, 1.0),
    "sign": (0, 1.0),
    "of": (5, 0.5),
}
OTHER = (7, 1.0)  # every other word
TOY_LEXICON = {
    "pneumonia": ["pneumonitis", "consolidation"],
    "showing": ["depicting", "with"],
    "x-ray": ["radiograph"],
    "chest": ["thorax"],
    "no": ["any"],  # protected by default: must never be used
}
CAPTION = "a chest X-ray showing pneumonia"


class BagOfWords(DualEncoder):
    """Text -> weighted bag of words; image -> a fixed direction scaled by its mean."""

    embed_dim = 8
    image_size = 4
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.image_head = nn.Linear(3, 8)
        self.text_dropout = nn.Dropout(0.5)  # not applied: exists to check mode flags
        self.modes_seen: list[bool] = []  # model.training at each text encoding

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(pixels.mean(dim=(2, 3)))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.modes_seen.append(self.training)
        out = torch.zeros(len(texts), self.embed_dim)
        for row, text in enumerate(texts):
            for word in WORD.findall(text.lower()):
                dim, weight = VOCAB.get(word, OTHER)
                out[row, dim] += weight
        return out


def constant_encoder(texts: list[str]) -> torch.Tensor:
    """A sentence encoder under which every text is identical (similarity 1)."""
    return torch.ones(len(texts), 2) / 2**0.5


def toy_attack(**kwargs: object) -> WordSubstitutionAttack:
    kwargs.setdefault("lexicon", TOY_LEXICON)
    kwargs.setdefault("sentence_encoder", constant_encoder)
    return WordSubstitutionAttack(**kwargs)  # type: ignore[arg-type]


def cosine(model: DualEncoder, a: str, b: str) -> float:
    emb = model.encode_text([a, b])
    return float(emb[0] @ emb[1])


# --- lexicon ------------------------------------------------------------------------------------
def test_lexicon_covers_every_content_word_of_templates_and_class_names() -> None:
    words = {
        w.lower()
        for m in MODALITIES.values()
        for phrase in (*m.templates, *m.class_names)
        for w in WORD.findall(phrase)
    }
    missing = sorted(words - FUNCTION_WORDS - set(LEXICON))
    assert not missing, f"lexicon has no entry for {missing}"


@pytest.mark.parametrize(
    ("word", "substitute"),
    [
        ("x-ray", "radiograph"),
        ("pneumonia", "consolidation"),
        ("lungs", "pulmonary fields"),
        ("malignant", "cancerous"),
        ("showing", "depicting"),
        ("image", "scan"),
        ("lesion", "growth"),
        ("normal", "unremarkable"),
        ("platelet", "thrombocyte"),
        ("liver", "hepatic parenchyma"),
        ("is there", "do you see"),
    ],
)
def test_lexicon_key_words(word: str, substitute: str) -> None:
    assert substitute in candidates(word)


def test_lexicon_is_clean() -> None:
    for key, subs in LEXICON.items():
        assert key == key.lower() and key == " ".join(key.split()), key
        assert subs and len(set(subs)) == len(subs), key
        assert key not in [s.lower() for s in subs], key
        for sub in subs:  # a substitute must not introduce a negation
            assert not DEFAULT_PROTECTED & {w.lower() for w in WORD.findall(sub)}, (key, sub)


def test_candidates_preserve_case() -> None:
    assert candidates("Lesion")[0] == "Growth"
    assert candidates("X-ray")[0] == "Radiograph"
    assert candidates("OCT") == LEXICON["oct"]
    assert candidates("lesion") == LEXICON["lesion"]
    assert candidates("Is  there")[0] == "Is there any"
    assert candidates("zebra") == []


# --- sentence, transformation, constraints -------------------------------------------------------
def test_sentence_round_trip_and_phrase_substitution() -> None:
    text = "  Is there pneumonia? (PA view)  "
    sentence = Sentence.parse(text)
    assert sentence.text == text
    assert sentence.words == ("Is", "there", "pneumonia", "PA", "view")
    edited = sentence.substitute(0, 2, "Do you see")
    assert edited.text == "  Do you see pneumonia? (PA view)  "
    assert edited.edits == (Edit(0, "Is there", "Do you see"),)


def test_transformation_uses_phrases_and_never_touches_protected_words() -> None:
    transform = LexiconSubstitution()
    texts = {s.text for s in transform(Sentence.parse("Is there no sign of pneumonia?"))}
    assert "Do you see no sign of pneumonia?" in texts
    assert "Is there no sign of consolidation?" in texts
    assert all(" no " in t for t in texts)

    custom = LexiconSubstitution(TOY_LEXICON, protected={"pneumonia"})
    edits = [s.edits[0] for s in custom(Sentence.parse(CAPTION))]
    assert edits and all(e.old.lower() != "pneumonia" for e in edits)


def test_transformation_does_not_join_a_phrase_across_punctuation() -> None:
    transform = LexiconSubstitution({"chest x-ray": ["CXR"]})
    assert transform(Sentence.parse("chest, X-ray")) == []
    assert [s.text for s in transform(Sentence.parse("chest X-ray"))] == ["CXR"]


def test_max_edits_and_no_repeat_position_filter() -> None:
    original = Sentence.parse(CAPTION)
    once = original.substitute(4, 5, "consolidation")
    twice = once.substitute(3, 4, "with")
    overlap = once.substitute(4, 5, "pneumonitis")
    assert MaxEdits(1).filter(original, [once, twice]) == [once]
    assert NoRepeatPosition().filter(original, [twice, overlap]) == [twice]
    with pytest.raises(InputError, match="max_edits"):
        MaxEdits(-1)


def test_semantic_similarity_rejects_a_substitution_below_the_threshold() -> None:
    def encoder(texts: list[str]) -> torch.Tensor:  # "consolidation" is semantically far
        far = torch.tensor([0.6, 0.8])  # cosine 0.6 to the others
        near = torch.tensor([1.0, 0.0])
        return torch.stack([far if "consolidation" in t else near for t in texts])

    original = Sentence.parse(CAPTION)
    far = original.substitute(4, 5, "consolidation")
    near = original.substitute(3, 4, "depicting")
    constraint = SemanticSimilarity(min_cosine=0.8, encoder=encoder)
    assert constraint.filter(original, [far, near]) == [near]
    assert SemanticSimilarity(min_cosine=0.5, encoder=encoder).filter(original, [far]) == [far]

    model = BagOfWords()
    reference = model.encode_text([CAPTION])
    attack = toy_attack(max_edits=3, sentence_encoder=encoder)
    result = attack(model, [CAPTION], reference=reference)[0]
    assert result.edits and "consolidation" not in result.perturbed
    assert result.similarity >= 0.8


# --- goal and search ------------------------------------------------------------------------------
def test_goal_scores_minus_cosine_and_completes_at_threshold() -> None:
    model = BagOfWords()
    reference = model.encode_text([CAPTION])[0]
    goal = EmbeddingDistanceGoal(model, reference, max_similarity=0.5)
    scores = goal.score([CAPTION, "a chest X-ray showing consolidation"])
    assert scores[0] == pytest.approx(-1.0)
    assert scores[1] > scores[0]
    assert goal.is_complete(-0.4) and not goal.is_complete(-0.6)
    assert not EmbeddingDistanceGoal(model, reference).is_complete(1.0)


def test_greedy_picks_the_best_substitution_first_and_beats_every_single_edit() -> None:
    model = BagOfWords()
    reference = model.encode_text([CAPTION])
    result = toy_attack(max_edits=2)(model, [CAPTION], reference=reference)[0]
    assert result.edits[0] == Edit(4, "pneumonia", "consolidation")
    assert len(result.edits) == 2
    assert result.final_score > result.original_score == pytest.approx(-1.0)
    assert result.final_score == pytest.approx(-cosine(model, CAPTION, result.perturbed))

    single_edits = LexiconSubstitution(TOY_LEXICON)(Sentence.parse(CAPTION))
    assert len(single_edits) == 6
    best_single = min(cosine(model, CAPTION, s.text) for s in single_edits)
    assert -result.final_score < best_single


def test_search_stops_when_the_goal_is_complete_or_nothing_improves() -> None:
    model = BagOfWords()
    reference = model.encode_text([CAPTION])
    early = toy_attack(max_edits=3, max_similarity=0.5)(model, [CAPTION], reference=reference)
    assert len(early[0].edits) == 1

    # the only substitution is a synonym for the model: it does not improve, so no edit
    stuck = toy_attack(lexicon={"pneumonia": ["pneumonitis"]})
    result = stuck(model, [CAPTION], reference=reference)[0]
    assert result.perturbed == CAPTION and result.edits == []


@pytest.mark.parametrize("max_edits", [0, 1, 2])
def test_at_most_max_edits_and_never_on_protected_words(max_edits: int) -> None:
    model = BagOfWords()
    texts = [CAPTION, "a chest X-ray with no sign of pneumonia"]
    results = toy_attack(max_edits=max_edits)(model, texts, reference=model.encode_text(texts))
    for text, result in zip(texts, results, strict=True):
        assert len(result.edits) <= max_edits
        assert all(e.old.lower() not in DEFAULT_PROTECTED for e in result.edits)
        if max_edits == 0:
            assert result.perturbed == text and result.final_score == result.original_score
        else:
            assert len(result.edits) == max_edits
    assert " no " in results[1].perturbed


def test_default_reference_is_the_image_embedding_and_modes_are_restored() -> None:
    torch.manual_seed(0)
    model = BagOfWords()
    model.train()
    model.text_dropout.eval()
    model.image_head.weight.requires_grad_(False)
    images = torch.rand(2, 1, 8, 8)
    texts = [CAPTION, "a chest X-ray with pneumonia"]

    results = toy_attack(max_edits=1)(model, texts, images=images)
    assert model.modes_seen and not any(model.modes_seen)  # eval mode during the attack

    with torch.no_grad():
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(texts)
    assert results[0].original_score == pytest.approx(-float(text_emb[0] @ image_emb[0]))
    assert model.training and model.image_head.training and not model.text_dropout.training
    assert not model.image_head.weight.requires_grad and model.image_head.bias.requires_grad


def test_bad_input_gets_a_clear_error() -> None:
    model = BagOfWords()
    attack = toy_attack()
    ref = model.encode_text([CAPTION])
    with pytest.raises(InputError, match="non-empty list"):
        attack(model, [], reference=ref)
    with pytest.raises(InputError, match="empty"):
        attack(model, ["  "], reference=ref)
    with pytest.raises(InputError, match="2 images for 1 texts"):
        attack(model, [CAPTION], images=torch.rand(2, 1, 8, 8))
    with pytest.raises(InputError, match="images or reference"):
        attack(model, [CAPTION])
    with pytest.raises(InputError, match="2 reference embeddings for 1 texts"):
        attack(model, [CAPTION], reference=ref.repeat(2, 1))
    with pytest.raises(InputError, match="dims"):
        attack(model, [CAPTION], reference=torch.ones(1, 3))
    with pytest.raises(InputError, match="max_edits"):
        toy_attack(max_edits=-1)
    with pytest.raises(InputError, match="min_cosine"):
        toy_attack(min_similarity=1.5)


def test_registered() -> None:
    assert TEXT_ATTACKS.get("word-substitution") is WordSubstitutionAttack


# --- the real mini-clip ---------------------------------------------------------------------------
@pytest.mark.slow
def test_mini_clip_captions_move_away_from_their_images(data_dir: object) -> None:
    from medshield.data.medmnist import load_split
    from medshield.models import create_model

    torch.manual_seed(0)
    model = create_model("mini-clip")
    split = load_split("chest_xray", "test")
    rows = [0, 1, 2, 3]
    texts = [
        split.modality.templates[i].format(split.modality.class_names[int(split.labels[r])])
        for i, r in enumerate(rows)
    ]
    attack = WordSubstitutionAttack(max_edits=1, min_similarity=0.8)
    results = attack(model, texts, images=split.tensor(rows))
    for result in results:
        assert len(result.edits) == 1
        assert result.final_score > result.original_score
        assert result.similarity >= 0.8
        assert result.perturbed != result.original
