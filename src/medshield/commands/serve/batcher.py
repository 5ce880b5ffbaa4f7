"""The worker pool: a blocking :class:`~medshield.models.chat.ChatVLM` runs in threads, and
queued requests with the same settings share one ``generate`` batch."""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from medshield.commands.serve.protocol import _server_error
from medshield.errors import InputError
from medshield.models.chat import ChatVLM, Conversation


@dataclass
class _Job:
    conversation: Conversation
    max_new_tokens: int
    temperature: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs a blocking :class:`ChatVLM` in worker threads, batching queued requests.

    At most ``max_concurrency`` ``generate`` calls run at once; each takes up to
    ``max_batch_size`` queued conversations that share ``max_tokens`` and ``temperature``. When a
    batch fails on an :class:`InputError` (one bad conversation), its conversations are
    answered one by one so that only the culprit fails. Create and use it on one event loop.
    """

    def __init__(
        self, model: ChatVLM, max_concurrency: int, max_batch_size: int, max_queue: int
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.running = 0
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="medshield-gen")
        self._slots = asyncio.Semaphore(max_concurrency)
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    def start(self) -> None:
        """Start dispatching (call from the event loop)."""
        self._spawn(self._dispatch())

    def stop(self) -> None:
        """Stop dispatching and drop the worker threads' pending batches."""
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(
        self, conversation: Conversation, max_new_tokens: int, temperature: float
    ) -> asyncio.Future:
        """Queue a conversation; the future resolves to the reply or the backend's exception.

        Raises:
            ServeError: 503 when ``max_queue`` requests are already waiting.
        """
        if len(self._queue) >= self.max_queue:
            raise _server_error(
                503, f"the server is busy ({self.max_queue} requests queued); retry", "overloaded"
            )
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(conversation, max_new_tokens, temperature, future))
        self._wakeup.set()
        return future

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._next_batch()
            self.running += 1
            self._spawn(self._run(batch))

    async def _next_batch(self) -> list[_Job]:
        while True:
            while self._queue and self._queue[0].future.done():  # timed out while queued
                self._queue.popleft()
            if self._queue:
                break
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._queue.popleft()
        batch, held = [first], []
        while self._queue and len(batch) < self.max_batch_size:
            job = self._queue.popleft()
            if job.future.done():
                continue
            same = (job.max_new_tokens, job.temperature) == (
                first.max_new_tokens,
                first.temperature,
            )
            (batch if same else held).append(job)
        self._queue.extendleft(reversed(held))
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._generate, batch)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self.running -= 1
            self._slots.release()

    def _generate(self, batch: list[_Job]) -> list[str | BaseException]:
        """In a worker thread: the replies (or the exception) of each job, in order."""
        first = batch[0]
        try:
            replies = self.model.generate(
                [job.conversation for job in batch], first.max_new_tokens, first.temperature
            )
            if len(replies) != len(batch):
                raise RuntimeError(f"the backend gave {len(replies)} replies for {len(batch)}")
            return list(replies)
        except InputError as exc:
            if len(batch) == 1:
                return [exc]
        except Exception as exc:  # delivered to each request, mapped to a status
            return [exc] * len(batch)
        return [self._generate([job])[0] for job in batch]
