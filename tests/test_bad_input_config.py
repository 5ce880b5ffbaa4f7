"""Bad-input corpus, ``config`` family: run names, non-finite numbers, unknown keys, bad YAML,
wrong types, negative counts, output folders and overwrite refusals, through the real command
line. Every case fails before any training, exits 2 without a traceback, names the problem,
and leaves an unrelated folder and a sibling run exactly as they were."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from bad_input_support import run_cli

from medshield.config import load_config
from medshield.runs import Run

# (id, command line, a regex the output must match); {tmp} is the case's temporary folder,
# whose runs/ holds the sibling run "sibling" and keep/ an unrelated folder with files.
CASES = [
    ("name-absolute", "pretrain --set name={tmp}/keep --overwrite", "must be a single folder name"),
    (
        "name-dot",
        "pretrain --set name=. --overwrite",
        r"\nname\s+Value error, '\.' must be",
    ),
    (
        "name-dotdot",
        "pretrain --set name=.. --overwrite",
        r"\nname\s+Value error, '\.\.' must",
    ),
    ("name-escapes", "pretrain --set name=../escaped", "'../escaped' must be a single folder"),
    ("name-nested", "evaluate --set name=a/b", "'a/b' must be a single folder name"),
    ("name-backslash", "pretrain --set 'name=a\\b'", r"'a\\\\b' must be a single folder name"),
    (
        "name-empty",
        "pretrain --set \"name=''\"",
        r"\nname\s+Value error, '' must be",
    ),
    ("name-null", "pretrain --set name=", r"(?s)name\s+Input should be a valid string"),
    ("name-finetune", "finetune --set name=../x", "'../x' must be a single folder name"),
    ("name-train-vlm", "train-vlm --set name=/tmp", "'/tmp' must be a single folder name"),
    ("name-demo", "demo --set name=.. --overwrite", "'..' must be a single folder name"),
    (
        "label-demo",
        "demo --set 'finetune.methods=[{method: lora, label: a/b}]'",
        r"(?s)label\s+Value error, 'a/b' must be a single folder name",
    ),
    ("name-study", "study noise --set name={tmp}/keep", "must be a single folder name"),
    (
        "study-workers-above-cores",
        "study finetune --set workers=100000",
        r"workers: 100000 is more than the \d+ core\(s\) this process may run on; set workers "
        r"to at most \d+",
    ),
    ("name-redteam", "redteam --set name=../keep --overwrite", "must be a single folder"),
    (
        "overwrite-not-a-run",
        "pretrain --set output_dir={tmp} --set name=keep --overwrite",
        "keep exists and is not a medshield run .*nothing was written or deleted",
    ),
    (
        "reuse-not-a-run",
        "evaluate --set output_dir={tmp} --set name=keep",
        "keep exists and is not a medshield run",
    ),
    ("other-config-run", "pretrain --set name=sibling", "holds a run with a different config"),
    ("overwrite-link-up", "pretrain --set name=up --overwrite", "up is a symbolic link"),
    (
        "output-dir-file",
        "pretrain --set output_dir={tmp}/afile",
        "cannot write the run folder .*afile.*output_dir",
    ),
    (
        "output-dir-under-file",
        "craft-noise --set output_dir={tmp}/afile/sub",
        "cannot write the run folder .*afile.*output_dir",
    ),
    ("lr-inf", "pretrain --set pretrain.lr=.inf", r"(?s)pretrain\.lr\s+Input should be a finite"),
    ("lr-nan", "pretrain --set pretrain.lr=.nan", r"(?s)pretrain\.lr\s+Input should be a finite"),
    ("eps-inf", "evaluate --set evaluate.robust_eps=[1,.inf]", r"(?s)robust_eps.*finite number"),
    (
        "unknown-image-attack",
        "evaluate --set 'evaluate.robust_attacks=[{name: pgdx}]'",
        r"'pgdx' is not a registered image attack; the image attacks are apgd-ce, apgd-dlr, fgsm",
    ),
    (
        "bad-attack-argument",
        "evaluate --set 'evaluate.robust_attacks=[{name: pgd, stepz: 3}]'",
        r"the arguments \{'stepz': 3\} do not fit attack 'pgd'",
    ),
    ("old-attack-field", "evaluate --set evaluate.attack_steps=3", r"'attack_steps' is gone"),
    ("old-robust-field", "finetune --set robust.apgd=false", r"'apgd' is gone.*robust.attacks"),
    (
        "noise-eps-nan",
        "craft-noise --set noise.eps=.nan",
        r"(?s)noise\.eps\s+Input should be a fin",
    ),
    ("vlm-lr-inf", "train-vlm --set lr=.inf", r"(?s)lr\s+Input should be a finite number"),
    ("finetune-lr-inf", "finetune --set finetune.lr=-.inf", r"(?s)lr.*finite number"),
    (
        "unknown-key",
        "pretrain --set pretrain.epoch=1",
        r"(?s)pretrain\.epoch\s+Extra inputs are not",
    ),
    ("unknown-section", "pretrain --set optimizer.lr=1", r"(?s)optimizer\s+Extra inputs are not"),
    (
        "yaml-list",
        "pretrain --set data.modalities=[a,",
        "override 'data.modalities=\\[a,'.*not valid",
    ),
    ("yaml-map", "pretrain --set 'model.kwargs={a: 1'", "override 'model.kwargs=.*not valid YAML"),
    ("no-equals", "pretrain --set pretrain.epochs", "is not of the form key.sub=value"),
    ("into-scalar", "pretrain --set seed.x=1", r"(?s)seed\s+Input should be a valid integer"),
    ("int-type", "pretrain --set pretrain.epochs=abc", r"(?s)pretrain\.epochs\s+Input should be"),
    ("list-type", "pretrain --set data.modalities=5", r"(?s)data\.modalities.*valid list"),
    ("unknown-task", "evaluate --set evaluate.tasks=[teleport]", r"(?s)evaluate\.tasks.*zero_shot"),
    (
        "negative-epochs",
        "pretrain --set pretrain.epochs=-1",
        r"(?s)epochs\s+Input should be greater",
    ),
    (
        "batch-of-one",
        "pretrain --set pretrain.batch_size=1",
        r"(?s)batch_size\s+Input should be gr",
    ),
    ("negative-items", "evaluate --set evaluate.max_test_items=-5", r"(?s)max_test_items.*greater"),
    (
        "warmup-above-1",
        "pretrain --set pretrain.warmup_fraction=2",
        r"(?s)warmup_fraction.*less than",
    ),
    (
        "finetune-ran-depth",
        "finetune --set data_dir={tmp}/nodata --set 'finetune.kwargs={depths: [99]}'",
        r"ran depth 99 does not exist: the image tower has \d+ blocks",
    ),
    (
        "finetune-beta-negative",
        "finetune --set finetune.method=adv-lora --set 'finetune.kwargs={beta: -1}'",
        r"beta must be >= 0, got -1",
    ),
    (
        "finetune-adversary-0-steps",
        "finetune --set finetune.method=tecoa --set finetune.adversary.steps=0",
        r"(?s)adversary\.steps\s+Input should be greater than or equal to 1",
    ),
    (
        "finetune-ran-0-pgd-steps",
        "finetune --set 'finetune.kwargs={pgd_steps: 0}'",
        r"pgd_steps must be at least 1, got 0",
    ),
    (
        "finetune-adv-0-pgd-steps",
        "finetune --set finetune.method=adv-linear-probe --set 'finetune.kwargs={pgd_steps: 0}'",
        r"pgd_steps must be at least 1, got 0",
    ),
    (
        "finetune-lr-grid-empty",
        "finetune --set finetune.val_fraction=0.2 --set finetune.lr_grid=[]",
        r"lr_grid is empty: give at least one learning rate",
    ),
    (
        "finetune-lr-grid-no-validation",
        "finetune --set finetune.lr_grid=[0.001,0.01]",
        r"lr_grid picks the learning rate on a validation split: set val_fraction",
    ),
    (
        "finetune-lr-grid-negative",
        "finetune --set finetune.val_fraction=0.2 --set finetune.lr_grid=[0.001,-1]",
        r"every learning rate in lr_grid must be > 0",
    ),
    (
        "finetune-adv-no-adversary",
        "finetune --set finetune.method=adv-lora --set finetune.adversary=null",
        r"adv-lora trains against an adversary, but adversary is null",
    ),
    (
        "finetune-tecoa-no-adversary",
        "finetune --set finetune.method=tecoa --set finetune.adversary=null",
        r"tecoa trains against an adversary, but adversary is null",
    ),
    (
        "finetune-ran-no-adversary",
        "finetune --set finetune.adversary=null",
        r"ran trains against an adversary, but adversary is null",
    ),
    (
        "finetune-steps-and-epochs",
        "finetune --set finetune.steps=100 --set finetune.epochs=2",
        r"steps \(100\) and epochs \(2\) are both set",
    ),
    (
        "study-finetune-lr-grid-empty",
        "study finetune --set finetune.val_fraction=0.2 --set finetune.lr_grid=[]",
        r"(?s)method 'linear-probe'.*lr_grid is empty",
    ),
    ("missing-file", "pretrain --config {tmp}/nope.yaml", "config file .*nope.yaml does not exist"),
    (
        "bad-yaml-file",
        "pretrain --config {tmp}/bad.yaml",
        "config file .*bad.yaml is not valid YAML",
    ),
    ("list-file", "evaluate --config {tmp}/list.yaml", "must hold a mapping at the top level"),
]


def _setup(tmp: Path) -> None:
    keep = tmp / "keep"
    (keep / "sub").mkdir(parents=True)
    (keep / "notes.txt").write_text("precious")
    (keep / "sub" / "data.bin").write_bytes(b"\x00\x01")
    sibling = Run(tmp / "runs" / "sibling", load_config(None, ["name=sibling", "seed=1"]))
    sibling.append_samples([{"i": 1}])
    (tmp / "runs" / "up").symlink_to(tmp)
    (tmp / "afile").write_text("a file")
    (tmp / "bad.yaml").write_text("pretrain: [unclosed")
    (tmp / "list.yaml").write_text("- a list\n")


def _untouched(tmp: Path) -> None:
    assert (tmp / "keep" / "notes.txt").read_text() == "precious"
    assert (tmp / "keep" / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp / "keep").iterdir()) == ["notes.txt", "sub"]
    assert Run(
        tmp / "runs" / "sibling", load_config(None, ["name=sibling", "seed=1"])
    ).load_samples() == [{"i": 1}]
    assert (tmp / "afile").read_text() == "a file"
    assert not (tmp / "escaped").exists() and not (tmp / "runs" / "run").exists()


@pytest.mark.parametrize("line, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_input(tmp_path: Path, line: str, message: str) -> None:
    _setup(tmp_path)
    args = shlex.split(line.replace("{tmp}", str(tmp_path)))
    command = args[:2] if args[0] == "study" else args[:1]
    # runs go to {tmp}/runs, and data comes from an empty folder: should a case slip past the
    # checks, it fails at once, without training anything
    defaults = [f"output_dir={tmp_path / 'runs'}"]
    if command[0] in ("pretrain", "evaluate", "craft-noise"):
        defaults.append(f"data.data_dir={tmp_path / 'nodata'}")
    code, out = run_cli(
        [*command, *[a for d in defaults for a in ("--set", d)], *args[len(command) :]]
    )
    assert code == 2, out
    assert "Traceback" not in out
    assert "error:" in out
    assert re.search(message, out), out
    _untouched(tmp_path)


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
