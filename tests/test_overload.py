"""Overload, bounded and on loopback: an open-loop load far above what one process with
MAX_CONCURRENT_REQUESTS=1 can serve, against `python -m handler.main` with the tiny model (the
bench's own load generator and server start, bench/load.py). Statuses only: every answer is a
200 or a 429 with Retry-After, none is a 5xx, no connection is reset or refused, and the server
still stops cleanly afterwards. The figures (p99, RSS) are the bench's: `python -m bench.load`."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import run_coroutine

from bench.load import open_loop, start_server

pytestmark = pytest.mark.slow

RATE = 200.0  # requests per second offered: far above one request at a time on the tiny model
DURATION_S = 2.0


def test_open_loop_overload_is_answered_with_200_or_429_and_nothing_else(tiny_int8: Path) -> None:
    server = start_server(tiny_int8, {"MAX_CONCURRENT_REQUESTS": "1", "RETRY_AFTER_SECONDS": "2"})
    try:
        tally = run_coroutine(open_loop(server.url, RATE, DURATION_S))
    finally:
        exit_code = server.stop()
    statuses = tally.statuses()
    assert set(statuses) <= {"200", "429"}, statuses  # no 5xx, no connection error
    assert "200" in statuses and "429" in statuses, statuses
    assert all(o.retry_after == "2" for o in tally.outcomes if o.status == 429)
    assert len(tally.outcomes) == int(RATE * DURATION_S)
    assert exit_code == 0
