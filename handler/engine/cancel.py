"""Withdrawing work nobody waits for any more: a request past its deadline, a client that went
away, a server shutting down.

The HTTP layer makes one `Cancellation` per request and sets it as the current one (a context
variable, so the thread that runs the request sees it); whoever queued work for the request
registers a callback that takes the work back out of the queue. Work already running is not
interrupted (onnxruntime offers no safe way to): it finishes and its result is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar

from handler.engine.errors import EngineError


class Cancelled(EngineError):
    """The request's work was withdrawn before it ran; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(f"request withdrawn before it ran: {reason}")
        self.reason = reason


class Cancellation:
    """Set at most once, from any thread; callbacks run once, in the thread that cancels (or at
    once in the registering thread when it was already cancelled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(reason)

    def on_cancel(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Run `callback(reason)` on cancellation; returns a function that unregisters it."""
        with self._lock:
            reason = self.reason
            if reason is None:
                self._callbacks.append(callback)
        if reason is not None:
            callback(reason)

        def unregister() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unregister


CURRENT: ContextVar[Cancellation | None] = ContextVar("bge_m3_cancellation", default=None)


def current() -> Cancellation | None:
    return CURRENT.get()
