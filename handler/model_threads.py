"""The threads the service's model calls run on: a thread pool made once per app and kept for the
life of the process.

The routes that run the model are plain functions (tokenizing, onnxruntime and the JSON rendering
all hold a core), so they must not run on the event loop. Left to FastAPI they would run on
anyio's worker threads, which belong to the task that started them: under Mangum every Lambda
invocation is its own root task, so every invocation started a thread and onnxruntime ran on a
thread it had never seen (3-4 ms of a 9-token query's overhead, against under 1 ms on a thread
kept from one invocation to the next; docs/overhead.md). A `ThreadPoolExecutor` owned here keeps
its threads whatever task or event loop submits to it.

The pool holds MAX_CONCURRENT_REQUESTS threads: the middleware never lets more model requests in
at once, so a request never queues here, and under uvicorn concurrent requests each wait in their
own thread while the micro-batcher groups them into shared passes. A request answered at its
deadline keeps its thread until onnxruntime returns; the next one takes another.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

THREAD_NAME = "model-call"


class ModelThreads:
    def __init__(self, max_workers: int):
        self._threads = _Threads()
        # The pool's threads hold the initializer for their whole life: it must not lead back to
        # the pool, or a pool dropped with its app (tests make many) would keep its threads.
        self._pool = ThreadPoolExecutor(
            max_workers, thread_name_prefix=THREAD_NAME, initializer=self._threads.started
        )

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` on one of the pool's threads, in a copy of the caller's context: the request's
        cancellation (handler/engine/cancel.py) travels with it, as it does into anyio's."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, context.run, self._threads.call, call)

    @property
    def busy(self) -> int:
        """Calls running now."""
        return len(self._threads.split()[0])

    def close(self, timeout_s: float) -> int:
        """Take no more calls and let the idle threads end (waiting up to `timeout_s` for them);
        returns how many calls are still running, whose threads are left to finish or to the
        process's exit. The pool's threads are not daemons: an idle one left behind would look
        like a model call still running to `handler.main.serve`."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout_s
        busy, idle = self._threads.split()
        for thread in idle:
            thread.join(max(0.0, deadline - time.monotonic()))
        return len(busy)


class _Threads:
    """The pool's threads, and which of them are inside a call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: set[threading.Thread] = set()
        self._busy: set[threading.Thread] = set()

    def started(self) -> None:
        with self._lock:
            self._all.add(threading.current_thread())

    def call(self, call: Callable[[], T]) -> T:
        thread = threading.current_thread()
        with self._lock:
            self._busy.add(thread)
        try:
            return call()
        finally:
            with self._lock:
                self._busy.discard(thread)

    def split(self) -> tuple[set[threading.Thread], set[threading.Thread]]:
        """(busy, idle) now."""
        with self._lock:
            return set(self._busy), self._all - self._busy
