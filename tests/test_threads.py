"""The thread policy (medshield.threads): OMP_NUM_THREADS when the user set it, else half the
usable cores; applied when the CLI starts and shared among a study's workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from medshield import threads
from medshield.commands.cli import app


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No thread variables set; the test process's values and torch threads come back after."""
    for var in threads.THREAD_VARS:
        monkeypatch.setenv(var, "1")  # recorded, so the teardown restores the original
        monkeypatch.delenv(var)
    previous = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(previous)


def test_default_is_half_the_usable_cores(env: pytest.MonkeyPatch) -> None:
    for cores, expected in ((1, 1), (2, 1), (3, 1), (16, 8)):
        env.setattr(threads, "usable_cores", lambda cores=cores: cores)
        assert threads.thread_budget() == expected


def test_configure_sets_the_default_unless_the_user_chose(env: pytest.MonkeyPatch) -> None:
    env.setattr(threads, "usable_cores", lambda: 6)
    assert threads.configure_threads() == 3
    assert [threads.os.environ[v] for v in threads.THREAD_VARS] == ["3", "3"]
    assert torch.get_num_threads() == 3

    env.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins, MKL follows it when unset
    env.delenv("MKL_NUM_THREADS")
    assert threads.configure_threads() == 2
    assert [threads.os.environ[v] for v in threads.THREAD_VARS] == ["2", "2"]
    assert torch.get_num_threads() == 2

    env.setenv("OMP_NUM_THREADS", "many")  # not a count: the default
    assert threads.thread_budget() == 3


def test_workers_share_the_budget(env: pytest.MonkeyPatch) -> None:
    env.setattr(threads, "usable_cores", lambda: 16)
    assert [threads.worker_threads(n) for n in (1, 2, 3, 12)] == [8, 4, 2, 1]
    env.setenv("OMP_NUM_THREADS", "12")
    assert threads.worker_threads(4) == 3
    threads.set_threads(2)  # what each worker process runs first
    assert torch.get_num_threads() == 2 and threads.os.environ["OMP_NUM_THREADS"] == "2"


def test_the_cli_applies_the_policy_at_start_up(env: pytest.MonkeyPatch) -> None:
    env.setattr(threads, "usable_cores", lambda: 4)
    result = CliRunner().invoke(app, ["list", "attacks"])
    assert result.exit_code == 0, result.output
    assert threads.os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
