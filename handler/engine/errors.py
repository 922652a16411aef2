"""Errors the engine raises. The HTTP layer maps them to statuses once (handler/errors.py);
the engine itself knows nothing of HTTP."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for everything the engine raises on purpose."""


class ModelLoadError(EngineError):
    """The model directory is missing, damaged or not what the manifest says."""


class InputError(EngineError):
    """The caller's input cannot be encoded as given (the HTTP layer answers 400).

    `param` names the offending request field where the engine knows it (e.g. "input").
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_input"):
        super().__init__(message)
        self.param = param
        self.code = code


class InputTooLongError(InputError):
    """An input has more tokens than allowed and truncation was turned off."""

    def __init__(self, message: str, *, index: int, tokens: int, limit: int):
        super().__init__(message, param="input", code="context_length_exceeded")
        self.index = index
        self.tokens = tokens
        self.limit = limit


class TooManyTokensError(InputError):
    """The inputs of one call hold more tokens, after truncation, than the caller allows."""

    def __init__(self, *, total: int, limit: int, param: str | None = "input"):
        super().__init__(
            f"the inputs have {total} tokens after truncation, more than the limit of {limit}",
            param=param,
            code="max_tokens_per_request",
        )
        self.total = total
        self.limit = limit


class CapabilityError(InputError):
    """An output the model cannot produce was asked for (sparse from a dense-only model)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="unsupported_output")
