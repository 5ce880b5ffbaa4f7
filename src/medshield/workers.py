"""Worker processes for the studies that run cells side by side.

:func:`worker_pool` is the one way a study starts its ``workers`` processes: a
:class:`~concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method (CUDA cannot be
forked), whose workers take their share of the thread budget (:mod:`medshield.threads`) and end
themselves once the study process is gone. Without that watch, a study stopped with ``kill``
(SIGTERM, which ends Python without running its clean-up) or killed by the OS left its workers
running: each kept a core busy for the rest of its cell, minutes, and went on writing into a
cell directory that a restarted study was running again.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from medshield.threads import set_threads, worker_threads

WATCH_SECONDS = 1.0
"""How often a worker checks that the study process still runs."""


def worker_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, each with ``budget // workers`` threads
    (:func:`~medshield.threads.worker_threads`), that exit within :data:`WATCH_SECONDS` of the
    process that made the pool ending; ``initializer(*initargs)`` (a module-level function)
    then runs in each, as in :class:`~concurrent.futures.ProcessPoolExecutor`."""
    context = multiprocessing.get_context("spawn")
    init = (worker_threads(workers), os.getpid(), initializer, initargs)
    return ProcessPoolExecutor(workers, context, _start_worker, init)


def _start_worker(
    threads: int,
    parent: int,
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    set_threads(threads)
    watch = threading.Thread(target=_exit_without, args=(parent,), name="parent-watch", daemon=True)
    watch.start()
    if initializer is not None:
        initializer(*initargs)


def _exit_without(parent: int) -> None:
    """End this process once ``parent`` is no longer its parent (it ended, and the OS gave
    this process to another one). On Windows ``os.getppid`` keeps a dead parent's id, so there
    the watch never fires."""
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)  # no clean-up: the study that would use this worker's results is gone
