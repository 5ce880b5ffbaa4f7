"""medshield's CPU thread policy, set in one place.

PyTorch's default (one OpenMP thread per core) collapses on a shared machine: when other jobs
keep the cores busy, OpenMP threads wait on each other, and on a loaded 2-core machine crafting
the demo's noisy set took about 200 s per batch against about 30 s with one thread. medshield
therefore uses a *thread budget* of ``OMP_NUM_THREADS`` when the user set it, else half of the
cores this process may run on (at least 1: one thread on a 2-core machine). A command uses the
whole budget; a study's ``workers`` processes share it, ``budget // workers`` threads each (at
least 1).

:func:`configure_threads` runs when the ``medshield`` command starts; a study's worker pool
(:func:`medshield.workers.worker_pool`) gives each worker :func:`worker_threads` threads with
:func:`set_threads`.
"""

from __future__ import annotations

import os
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""The variables OpenMP (torch, numpy's BLAS) and MKL read their thread count from."""


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def thread_budget() -> int:
    """``OMP_NUM_THREADS`` when it is a positive integer, else half the usable cores (at least
    1)."""
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    if user.isdigit() and int(user) > 0:
        return int(user)
    return max(1, usable_cores() // 2)


def worker_threads(workers: int) -> int:
    """Threads for each of ``workers`` processes sharing the budget (at least 1)."""
    return max(1, thread_budget() // max(1, workers))


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in this process: torch's intra-op threads when torch is loaded,
    and the variables of :data:`THREAD_VARS` for libraries loaded later."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def configure_threads() -> int:
    """Apply the policy to this process and its children and return the thread count.

    ``OMP_NUM_THREADS`` set by the user is kept as it is (and so is ``MKL_NUM_THREADS``);
    otherwise both are set to the budget before torch is imported.
    """
    threads = thread_budget()
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads
