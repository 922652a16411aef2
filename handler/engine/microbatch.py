"""Dynamic micro-batching: concurrent requests to one model share forward passes.

Without it every request runs its own `session.run` calls, and concurrent requests fight over the
same cores (each run already uses all of them through intra-op threads) while each pays for a
small, poorly filled batch. `MicroBatcher` wraps an `Engine` and is itself an `EmbeddingEngine`:

- the caller's thread tokenizes and validates (so bad input raises there, with the engine's own
  exception types, before anything is queued), then queues its token ids and waits on a Future;
- one worker thread per model takes the oldest job plus every queued job behind it that fits
  (optionally waiting up to `wait_ms` for more), runs them as one `Engine.run_ids` call with the
  union of the heads asked for, and hands each job its own rows and heads back. While a pass
  runs, new requests queue and form the next group, so a lone request never waits for company.
- a request that finds the model idle (no pass running, nobody queued) and nothing to wait for
  (`wait_ms` 0) runs its pass on its own thread: the worker would run it alone at once anyway,
  and handing it over costs a thread wake-up each way (about 0.1 ms each on a warm core, more
  after a forward pass). Requests that arrive during that pass queue for the worker as usual.

The group is capped (tokens and rows) so that one request does not wait behind an unbounded
amount of other work; the engine still splits the group into padded batches under
BATCH_TOKEN_BUDGET. Jobs leave the queue strictly in arrival order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from handler.engine import cancel, scoring
from handler.engine.compact import Ranges
from handler.engine.engine import Engine
from handler.engine.errors import EngineError
from handler.engine.heads import shortened
from handler.engine.types import (
    EmbeddingEngine,
    Encoded,
    ModelInfo,
    ModelRegistry,
    TokenInfo,
)

log = logging.getLogger(__name__)

# A group holds at most this many engine batches' worth of tokens and rows: big enough to fill
# the passes under load, small enough that a request's wait for the others stays short.
GROUP_FACTOR = 4
# How often a waiting caller checks that the worker is still alive. Only a backstop: a worker
# that stops answers its jobs first (see _work).
LIVENESS_POLL_S = 1.0

Heads = tuple[bool, bool, bool]  # dense, sparse, colbert


@dataclass(eq=False)
class _Job:
    ids: list[list[int]]
    heads: Heads
    tokenize_ms: float
    worker: threading.Thread  # the worker that owns the queue this job joined
    queued_at: float = field(default_factory=time.perf_counter)
    future: Future[Encoded] = field(default_factory=Future)
    rows: int = field(init=False)
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.ids)
        self.tokens = sum(len(s) for s in self.ids)


class MicroBatcher(scoring.PairScoring):
    """An `Engine` whose encode calls from many threads are merged into shared passes (score
    requests too: PairScoring scores through this class's encode)."""

    def __init__(
        self,
        engine: Engine,
        *,
        wait_ms: float = 0.0,
        max_tokens: int | None = None,
        max_rows: int | None = None,
    ):
        if wait_ms < 0:
            raise ValueError("wait_ms must not be negative")
        self.engine = engine
        self.wait_s = wait_ms / 1000.0
        self.max_tokens = max_tokens or engine.config.batch_token_budget * GROUP_FACTOR
        self.max_rows = max_rows or engine.config.max_batch_size * GROUP_FACTOR
        self.passes = 0  # forward passes (run_ids calls) so far; for logs and tests
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._worker: threading.Thread | None = None
        # The thread running a pass now (the worker, or a lone caller): one pass at a time.
        self._running: threading.Thread | None = None
        self._closed = False

    # ---- EmbeddingEngine -----------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def embedding_ranges(self) -> Ranges | None:
        return self.engine.embedding_ranges

    def token_strings(self, weights: Mapping[int, float]) -> dict[str, float]:
        return self.engine.token_strings(weights)

    # Tokenizing runs no forward pass: straight to the engine, in the caller's thread.
    def tokens(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[TokenInfo]]:
        return self.engine.tokens(texts, add_special_tokens=add_special_tokens)

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        return self.engine.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(
        self,
        texts: Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Encoded:
        self.engine.check_dimensions(dimensions)
        start = time.perf_counter()
        ids = self.engine.tokenize(
            texts, max_length=max_length, truncate=truncate, max_tokens=max_tokens
        )
        encoded = self._submit(ids, (dense, sparse, colbert), _ms_since(start))
        encoded.truncated = ids.truncated
        return shortened(encoded, dimensions)

    def encode_ids(
        self,
        ids: Sequence[Sequence[int]],
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Encoded:
        self.engine.check_dimensions(dimensions)
        start = time.perf_counter()
        checked = self.engine.check_ids(
            ids, max_length=max_length, truncate=truncate, max_tokens=max_tokens
        )
        encoded = self._submit(checked, (dense, sparse, colbert), _ms_since(start))
        encoded.truncated = checked.truncated
        return shortened(encoded, dimensions)

    @property
    def queued(self) -> int:
        """Jobs waiting for a pass (not counting the group in the running pass)."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; the worker answers the ones already queued, then exits."""
        with self._cond:
            self._closed = True
            worker = self._worker
            self._cond.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    # ---- the caller's side ---------------------------------------------------------------------

    def _submit(self, ids: list[list[int]], heads: Heads, tokenize_ms: float) -> Encoded:
        self.engine.check_heads(*heads)  # a capability error is the caller's, not the group's
        if self._claim_idle():
            return self._run_alone(ids, heads, tokenize_ms)
        job = self._enqueue(ids, heads, tokenize_ms)
        cancellation = cancel.current()
        if cancellation is None:
            return self._wait(job)
        # A request whose caller gave up (deadline, disconnect, shutdown) leaves the queue
        # before it costs a forward pass; one already in a pass runs to the end.
        unregister = cancellation.on_cancel(lambda reason: self._withdraw(job, reason))
        try:
            return self._wait(job)
        finally:
            unregister()

    def _withdraw(self, job: _Job, reason: str) -> None:
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # taken into a pass already: its result comes as usual
        job.future.set_exception(cancel.Cancelled(reason))

    def _claim_idle(self) -> bool:
        """Take the model for a pass on this thread when no pass runs, nobody is queued and no
        company is awaited (wait_ms 0)."""
        if self.wait_s > 0:
            return False
        with self._cond:
            if self._closed or self._queue or self._running is not None:
                return False
            self._running = threading.current_thread()
            return True

    def _run_alone(self, ids: list[list[int]], heads: Heads, tokenize_ms: float) -> Encoded:
        self.passes += 1
        try:
            out = self.engine.run_ids(ids, *heads)
        finally:
            self._release()
        return _share(out, heads, 0, len(ids), tokenize_ms=tokenize_ms, queue_ms=0.0, others=0)

    def _release(self) -> None:
        """The pass on this thread is over: the worker may take the next group."""
        with self._cond:
            if self._running is threading.current_thread():
                self._running = None
                self._cond.notify_all()

    def _enqueue(self, ids: list[list[int]], heads: Heads, tokenize_ms: float) -> _Job:
        with self._cond:
            if self._closed:
                raise EngineError(f"model '{self.engine.manifest.model_id}': batcher is closed")
            job = _Job(ids, heads, tokenize_ms, self._live_worker())
            self._queue.append(job)
            self._cond.notify()
        return job

    def _live_worker(self) -> threading.Thread:
        """The worker, started on first use or after one stopped. Call with the lock held."""
        if self._worker is None or not self._worker.is_alive():
            worker = threading.Thread(
                target=self._work,
                name=f"microbatch-{self.engine.manifest.model_id}",
                daemon=True,  # never holds the process open at exit
            )
            try:
                worker.start()
            except RuntimeError as exc:  # "can't start new thread"
                raise EngineError(f"cannot start the micro-batch worker: {exc}") from exc
            self._worker = worker
        return self._worker

    def _wait(self, job: _Job) -> Encoded:
        # futures.wait, not result(timeout): a TimeoutError raised by the pass itself must not
        # read as "still waiting".
        while not wait([job.future], timeout=LIVENESS_POLL_S).done:
            # A pass may take long; only a worker gone without answering ends the wait.
            if not job.worker.is_alive() and not job.future.done():
                raise EngineError("the micro-batch worker stopped before answering")
        return job.future.result()

    # ---- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        taken: list[_Job] = []
        try:
            while True:
                taken = []
                self._take(taken)
                if not taken:
                    return  # closed and drained
                try:
                    self._run_group(taken)
                finally:
                    self._release()
        except BaseException:  # a bug, or the interpreter going down: answer, log, stop
            log.exception("the micro-batch worker of %s stopped", self.engine.manifest.model_id)
            _fail(taken, EngineError("the micro-batch worker stopped unexpectedly"))
        finally:
            self._retire()

    def _retire(self) -> None:
        """Leave no job behind: whatever is still queued is answered with an error (the next
        request starts a fresh worker)."""
        self._release()
        with self._cond:
            if self._worker is threading.current_thread():
                self._worker = None
            left = list(self._queue)
            self._queue.clear()
        _fail(left, EngineError("the micro-batch worker stopped before running this request"))

    def _take(self, group: list[_Job]) -> None:
        """Move the next group from the queue into `group` (left empty once closed and drained).
        Jobs go into `group` one at a time, so a failure here still knows whom to answer."""
        with self._cond:
            # A lone caller's pass (_run_alone) runs first: one pass at a time.
            while not self._queue or self._running is not None:
                if self._closed and not self._queue:
                    return
                self._cond.wait()
            self._running = threading.current_thread()
            group.append(self._queue.popleft())
            self._fill(group, deadline=time.monotonic() + self.wait_s)

    def _fill(self, group: list[_Job], *, deadline: float) -> None:
        """Add queued jobs in order while they fit; wait for more until the deadline (with
        wait_ms 0: only what is queued already). Call with the lock held."""
        tokens, rows = group[0].tokens, group[0].rows
        while tokens < self.max_tokens and rows < self.max_rows:
            if self._queue:
                head = self._queue[0]
                if tokens + head.tokens > self.max_tokens or rows + head.rows > self.max_rows:
                    return  # it starts the next group, so arrival order is kept
                group.append(self._queue.popleft())
                tokens, rows = tokens + head.tokens, rows + head.rows
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return
            self._cond.wait(remaining)

    def _run_group(self, group: list[_Job]) -> None:
        heads = (
            any(job.heads[0] for job in group),
            any(job.heads[1] for job in group),
            any(job.heads[2] for job in group),
        )
        ids = [seq for job in group for seq in job.ids]
        started = time.perf_counter()
        self.passes += 1
        try:
            out = self.engine.run_ids(ids, *heads)
        except Exception as exc:  # the pass failed for everyone in it, with the same error
            for job in group:
                job.future.set_exception(exc)
            return
        offset = 0
        for job in group:
            mine = _share(
                out,
                job.heads,
                offset,
                job.rows,
                tokenize_ms=job.tokenize_ms,
                queue_ms=(started - job.queued_at) * 1000.0,
                others=len(group) - 1,
            )
            job.future.set_result(mine)
            offset += job.rows


def _share(
    out: Encoded,
    heads: Heads,
    offset: int,
    rows: int,
    *,
    tokenize_ms: float,
    queue_ms: float,
    others: int,
) -> Encoded:
    """One job's rows of a pass it shared with `others` jobs, with only the heads it asked for."""
    end = offset + rows
    dense, sparse, colbert = heads
    return Encoded(
        # A copy, so a response does not keep the whole group's array alive.
        dense=out.dense[offset:end].copy() if dense and out.dense is not None else None,
        sparse=out.sparse[offset:end] if sparse and out.sparse is not None else None,
        colbert=out.colbert[offset:end] if colbert and out.colbert is not None else None,
        token_counts=out.token_counts[offset:end],
        sources=out.sources[offset:end],
        timings_ms={
            "tokenize": tokenize_ms,
            "queue": queue_ms,
            # The shared pass's own times: what this request waited for.
            "infer": out.timings_ms.get("infer", 0.0),
            "post": out.timings_ms.get("post", 0.0),
        },
        batched_with=others,
    )


def _fail(jobs: Sequence[_Job], error: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


def micro_batched(registry: ModelRegistry, *, wait_ms: float = 0.0) -> ModelRegistry:
    """The same models, each `Engine` behind its own MicroBatcher. Other engines (test fakes)
    are served as they are."""
    engines: list[EmbeddingEngine] = [
        MicroBatcher(e, wait_ms=wait_ms) if isinstance(e, Engine) else e for e in registry
    ]
    return ModelRegistry(engines)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
