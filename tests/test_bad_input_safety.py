"""Bad-input corpus, ``safety input`` family: ``medshield redteam`` with unknown attack, judge,
defense, backend, source or modality names, bad red-team settings, an empty or missing query
set and an unreachable endpoint, through the real command line. Every case exits non-zero
without a traceback and names the problem; none loads a local model."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest
from bad_input_support import run_cli

# (id, arguments, expected exit code, a regex the output must match); {tmp} is the case's
# temporary folder: {tmp}/noqueries is a data folder with MedMNIST and no query files,
# {tmp}/nothing one whose JailbreakBench query files hold a header and no rows.
CASES = [
    (
        "unknown-attack",
        "--attacks nosuch",
        2,
        "unknown jailbreak 'nosuch'; registered jailbreaks: adv-",
    ),
    ("unknown-judge", "--judge nosuch", 2, "unknown judge 'nosuch'; registered judges: "),
    ("unknown-defense", "--defense nosuch", 2, "unknown defense 'nosuch'; registered defenses"),
    ("unknown-backend", "--model nosuch", 2, "unknown chat model 'nosuch'; registered chat"),
    ("unknown-source", "--set source=nosuch", 2, "unknown safety source 'nosuch'; known sources"),
    ("unknown-modality", "--set modalities=[nosuch]", 2, "unknown modality 'nosuch'; known"),
    ("limit-zero", "--limit 0", 2, r"(?s)limit\s+Input should be greater than or equal to 1"),
    ("no-attacks", "--set attacks=[]", 2, r"(?s)attacks\s+List should have at least 1 item"),
    ("attack-twice", "--attacks direct,direct", 2, "attacks lists a name twice"),
    ("primary-judge", "--set primary_judge=embedding", 2, "primary_judge 'embedding' is not one"),
    ("kwargs-unused", "--set 'attack_kwargs={figstep: {}}'", 2, "attack_kwargs for attacks that"),
    (
        "attack-kwargs",
        "--attacks jb-roleplay --set 'attack_kwargs={jb-roleplay: {x: 1}}'",
        2,
        "attack 'jb-roleplay' does not take these arguments",
    ),
    (
        "judge-kwargs",
        "--set 'judge_kwargs={keyword: {x: 1}}'",
        2,
        "judge 'keyword' does not take these arguments",
    ),
    ("temperature", "--set generation.temperature=-1", 2, r"(?s)temperature\s+Input should be gre"),
    ("batch-size", "--set generation.batch_size=0", 2, r"(?s)batch_size\s+Input should be greater"),
    ("tokens-inf", "--set generation.max_new_tokens=.inf", 2, r"(?s)max_new_tokens\s+Input shou"),
    ("image-size", "--set image_size=4", 2, r"(?s)image_size\s+Input should be greater than"),
    ("resamples", "--set bootstrap_resamples=1", 2, r"(?s)bootstrap_resamples\s+Input should be"),
    (
        "base-url",
        "--set 'model.kwargs={base_url: ftp://x, model: m}'",
        2,
        "base_url must be an http\\(s\\) URL, got 'ftp://x'",
    ),
    (
        "backend-kwargs",
        "--set 'model.kwargs={base_url: http://127.0.0.1:9/v1}'",
        2,
        "chat model 'openai' does not fit the arguments \\['base_url'\\].*model.kwargs",
    ),
    (
        "defense-kwargs",
        "--defense demonstrations --set 'defense.kwargs={k: -1}'",
        2,
        "demonstration budget k must be a non-negative integer, got -1",
    ),
    ("source-option", "--set 'source_options={x: 1}'", 2, "unexpected option\\(s\\) x for source"),
    (
        "empty-queries",
        "--set source=jailbreakbench --set data_dir={tmp}/nothing",
        2,
        "harmful-behaviors.csv has a header but no rows",
    ),
    (
        "missing-queries",
        "--set source=jailbreakbench --set data_dir={tmp}/noqueries",
        2,
        "harmful-behaviors.csv not found. Set MEDSHIELD_DATA_DIR",
    ),
    (
        "endpoint-down",
        "",
        1,
        "nothing measured: all 3 red-team rows were skipped or failed.*Connection refused"
        ".*--retry-errors",
    ),
]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("line, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_safety_input(
    tmp_path: Path, data_dir: Path, line: str, code: int, message: str
) -> None:
    for folder in ("noqueries", "nothing"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "medmnist").symlink_to(data_dir / "medmnist")
    (tmp_path / "nothing" / "jailbreakbench").mkdir()
    for kind in ("harmful", "benign"):
        path = tmp_path / "nothing" / "jailbreakbench" / f"{kind}-behaviors.csv"
        path.write_text(",Goal,Target,Behavior,Category\n")
    # the model under test is an OpenAI endpoint that is down: a case that slipped past the
    # checks fails at once (exit 1), without loading a model
    endpoint = f"{{base_url: 'http://127.0.0.1:{closed_port()}/v1', model: m, max_retries: 0}}"
    base = [
        "redteam",
        "--model",
        "openai",
        "--limit",
        "1",
        *("--set", f"model.kwargs={endpoint}", "--set", f"output_dir={tmp_path / 'runs'}"),
        *("--set", "judges=[keyword]", "--set", "judge_agreement=false"),
        *("--set", "modalities=[chest_xray]", "--set", "attacks=[direct]"),
    ]
    out_code, out = run_cli([*base, *shlex.split(line.replace("{tmp}", str(tmp_path)))])
    assert out_code == code, out
    assert "Traceback" not in out
    assert "error:" in out
    assert re.search(message, out, re.DOTALL), out


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 12 and len({c[0] for c in CASES}) == len(CASES)
