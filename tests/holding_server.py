"""A real uvicorn process (`handler.main.serve`, the code `python -m handler.main` runs) over a
fake engine that holds some requests, for the shutdown tests. Settings come from the environment
(SHUTDOWN_GRACE_S, PORT=0, ...; PYTHONPATH names the repository and tests/); the serving
line on stderr names the port.

Inputs that steer the engine: "hold" never finishes (the grace period must answer it);
"until-drain" finishes as soon as the grace period has begun (so it finishes within it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from fakes import FakeEngine, registry

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


if __name__ == "__main__":
    settings = Settings()
    APP = create_app(settings, registry(HoldingEngine()))
    serve(APP, settings)
