"""A real uvicorn process (`handler.main.serve`, the code `python -m handler.main` runs) over a
fake engine that holds some requests, for the shutdown tests. Settings come from the environment
(SHUTDOWN_GRACE_S, PORT=0, ...; PYTHONPATH names the repository and tests/); the serving
line on stderr names the port.

Inputs that steer the engine: "hold" never finishes (the grace period must answer it);
"until-drain" finishes as soon as the grace period has begun (so it finishes within it).

GET /test/connection answers the socket options of the connection it came on, as this process
holds it (found among /proc/self/fd by its peer address: Linux), for the socket tests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from fakes import FakeEngine, registry
from starlette.requests import Request

from handler.app import create_app
from handler.engine.types import Encoded
from handler.main import serve
from handler.settings import Settings

APP: Any = None
FOREVER = threading.Event()  # never set


class HoldingEngine(FakeEngine):
    def encode(self, texts: Sequence[str], **kwargs: Any) -> Encoded:
        if texts and texts[0] == "hold":
            FOREVER.wait()
        if texts and texts[0] == "until-drain":
            while not APP.state.drain.draining:
                time.sleep(0.01)
        return super().encode(texts, **kwargs)


def connection_options(request: Request) -> dict[str, int]:
    assert request.client is not None
    peer = (request.client.host, request.client.port)
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket (or gone since the listing)
            continue
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                continue
            try:
                if sock.getpeername() != peer:
                    continue
            except OSError:  # the listening socket: no peer
                continue
            return {"tcp_nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)}
    raise LookupError(f"no socket connected to {peer}")


if __name__ == "__main__":
    settings = Settings()
    APP = create_app(settings, registry(HoldingEngine()))
    APP.add_api_route("/test/connection", connection_options, methods=["GET"])
    serve(APP, settings)
