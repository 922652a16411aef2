"""What the build raises on purpose. The CLI turns each into one line on stderr and an exit code:
0 built, 1 the fidelity gate refused the model, 2 a usage or source problem (3: a bug)."""

from __future__ import annotations

from typing import TYPE_CHECKING

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

# --fault-inject values (a test hook: a deliberately broken build that the gate must refuse).
FAULTS = ("int8-weight-scale", "sparse-head")
INT8_FAULTS = ("int8-weight-scale",)  # the quantizer's own (model_build/faults.py: the others)


class BuildError(Exception):
    """A usage or source problem the user can fix (bad flag, missing file, hub unreachable)."""

    exit_code = EXIT_USAGE


class SourceError(BuildError):
    """The model source cannot be fetched, is incomplete or does not match its pinned digests."""


class HubUnreachableError(SourceError):
    """The hub cannot be reached and nothing usable is cached."""


if TYPE_CHECKING:
    from handler.engine.manifest import ValidationSection


class GateFailedError(Exception):
    """The built model is not faithful enough to the fp32 PyTorch reference; nothing was written."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, validation: ValidationSection):
        super().__init__(message)
        self.validation = validation
