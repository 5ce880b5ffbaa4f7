"""The studies' worker pool: workers take their thread share and end with the study process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medshield.workers import worker_pool

TESTS = Path(__file__).resolve().parent

STUDY = """
import sys, time
sys.path.insert(0, {tests!r})
from medshield.workers import worker_pool
from test_workers import report_and_sleep
pool = worker_pool(2)
for i in range(2):
    pool.submit(report_and_sleep, {out!r}, i)
time.sleep(300)
"""


def report_and_sleep(out: str, index: int) -> None:
    """A long cell (module level, for spawned workers): writes its pid and thread count."""
    import torch

    Path(out, f"{index}.pid").write_text(f"{os.getpid()} {torch.get_num_threads()}")
    time.sleep(300)


def threads_of_worker() -> tuple[str, str]:
    import torch

    return os.environ["OMP_NUM_THREADS"], str(torch.get_num_threads())


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_workers_take_their_share_of_the_thread_budget(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with worker_pool(2) as pool:
        assert pool.submit(threads_of_worker).result(timeout=120) == ("2", "2")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_end_when_the_study_process_is_killed(tmp_path):
    study = subprocess.Popen(
        [sys.executable, "-c", STUDY.format(tests=str(TESTS), out=str(tmp_path))],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    try:
        pid_files = [tmp_path / f"{i}.pid" for i in range(2)]
        assert wait_for(lambda: all(p.exists() and p.read_text() for p in pid_files), 120)
        workers = [int(p.read_text().split()[0]) for p in pid_files]
        assert [p.read_text().split()[1] for p in pid_files] == ["1", "1"]  # 2 threads / 2
        time.sleep(2 * 1.0)  # two watch periods: the workers are not leaving by themselves
        assert all(running(pid) for pid in workers)
        study.send_signal(signal.SIGTERM)  # ends Python at once: no clean-up runs
        study.wait(timeout=30)
        assert wait_for(lambda: not any(running(pid) for pid in workers), 10), workers
    finally:
        study.kill()
        for pid_file in tmp_path.glob("*.pid"):  # never leave a sleeping worker behind
            pid = int(pid_file.read_text().split()[0])
            if running(pid):
                os.kill(pid, signal.SIGKILL)
