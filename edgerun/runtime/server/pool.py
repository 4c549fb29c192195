"""A bounded worker pool for blocking model calls, awaited from the event loop.

At most `workers` jobs run at once (onnxruntime releases the GIL, so threads run in parallel) and at
most `queue_size` wait. A job beyond that is refused at once (`Busy`, with a Retry-After estimate),
so the server answers 503 instead of piling up work. A job that takes longer than its timeout,
queueing included, raises `JobTimeout` (504): one still queued is cancelled; one already running
finishes in its thread (a session run cannot be interrupted) and keeps its place until then, so the
bound holds for real work, not just for the requests still waiting.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Busy(Exception):
    """Every worker is busy and the queue is full."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (all workers and the queue are full); retry in {retry_after} s")
        self.retry_after = retry_after


class JobTimeout(Exception):
    """A job did not finish within its timeout."""


class WorkerPool:
    def __init__(self, workers: int, queue_size: int):
        self.workers = workers
        self.capacity = workers + queue_size
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="edgerun-worker")
        self._lock = threading.Lock()
        self._pending = 0  # running + queued
        self._recent = deque(maxlen=32)  # seconds of recent jobs, for Retry-After
        self.completed = 0

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run `fn()` in a worker; its result, or its exception. Raises Busy or JobTimeout."""
        with self._lock:
            if self._pending >= self.capacity:
                raise Busy(self.retry_after())
            self._pending += 1
        try:
            future = self._executor.submit(self._timed, fn)
        except RuntimeError:  # shut down
            self._release(None)
            raise Busy(self.retry_after()) from None
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:  # wait_for cancelled the wrapper, which cancels a queued job
            raise JobTimeout(f"the request took longer than {timeout:g} s") from None

    def _timed(self, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self._recent.append(time.perf_counter() - start)

    def _release(self, _future: Future | None) -> None:
        with self._lock:
            self._pending -= 1
            self.completed += 1

    def retry_after(self) -> int:
        """Seconds until a full queue has likely drained (1 to 60)."""
        mean = sum(self._recent) / len(self._recent) if self._recent else 1.0
        return max(1, min(60, math.ceil(mean * self.capacity / self.workers)))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
