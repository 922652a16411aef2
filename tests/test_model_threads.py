"""The service's model threads (handler/model_threads.py): the caller's context travels with a
call, and closing ends the idle threads without waiting for a call still running (what
handler.main.serve relies on to exit after SIGTERM). Every wait is a bounded guard."""

from __future__ import annotations

import asyncio
import contextvars
import threading

from fakes import run_coroutine

from handler.model_threads import ModelThreads

HANG_GUARD_S = 60
REQUEST = contextvars.ContextVar[str]("REQUEST")


def test_a_call_runs_on_a_pool_thread_in_the_callers_context() -> None:
    threads = ModelThreads(2)

    async def call() -> tuple[str, threading.Thread]:
        REQUEST.set("r1")
        return await threads.run(lambda: (REQUEST.get(), threading.current_thread()))

    try:
        value, thread = run_coroutine(call())
        assert value == "r1"
        assert thread is not threading.current_thread() and thread.name.startswith("model-call")
    finally:
        threads.close(HANG_GUARD_S)


def test_close_ends_the_idle_threads_and_leaves_a_running_call_to_finish() -> None:
    threads = ModelThreads(4)
    entered = {name: threading.Event() for name in ("done", "running")}
    release = {name: threading.Event() for name in ("done", "running")}

    def held(name: str) -> threading.Thread:
        entered[name].set()
        assert release[name].wait(HANG_GUARD_S), "the test never released the call"
        return threading.current_thread()

    async def scenario() -> None:
        # Two calls held at once: two threads.
        calls = {n: asyncio.ensure_future(threads.run(lambda n=n: held(n))) for n in entered}
        for event in entered.values():
            assert await asyncio.to_thread(event.wait, HANG_GUARD_S)
        release["done"].set()
        idle = await calls["done"]
        assert threads.busy == 1
        assert threads.close(HANG_GUARD_S) == 1  # the running call is not waited for
        assert not idle.is_alive()
        release["running"].set()
        running = await calls["running"]  # it finishes, and gives its answer
        running.join(HANG_GUARD_S)
        assert not running.is_alive()

    run_coroutine(scenario())
