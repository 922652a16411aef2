"""Progress lines on stderr: `[model_build   12.3s] export: ...` (time since the build began).

Every stage says when it starts and how long it took; long loops report as they go, at most every
few seconds, so that a 10-minute full-size build is never silent for long.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, every_s: float = 5.0):
        self._stream = stream
        self._quiet = quiet
        self._every_s = every_s
        self._t0 = time.monotonic()
        self._last_tick: dict[str, float] = {}

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def log(self, stage: str, message: str) -> None:
        if self._quiet:
            return
        stream = self._stream if self._stream is not None else sys.stderr
        print(f"[model_build {self.elapsed:7.1f}s] {stage}: {message}", file=stream, flush=True)

    def tick(self, stage: str, message: str, *, force: bool = False) -> None:
        """A loop's progress line, printed at most every `every_s` seconds (or when forced)."""
        now = time.monotonic()
        if force or now - self._last_tick.get(stage, 0.0) >= self._every_s:
            self._last_tick[stage] = now
            self.log(stage, message)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        start = time.monotonic()
        self.log(name, what)
        yield
        self.log(name, f"done in {time.monotonic() - start:.1f}s")
