"""Bearer API keys, as a dependency on the protected routers (`/health` and `/` stay public).

Keys come from settings (API_KEY, or the Secrets Manager / SSM parameter read at start and again
after a SnapStart restore; see handler/settings.py and handler/snapstart.py). Every allowed key
is compared with `hmac.compare_digest`, all of them every time, so the time taken does not say
which key or how much of it matched. Keys are never logged:
the request log line has no headers, and error messages never echo what was sent.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request

from handler.errors import ApiError, ErrorKind
from handler.settings import Settings, resolve_api_keys

log = logging.getLogger(__name__)


class KeyChecker:
    def __init__(self, keys: Sequence[str], *, unavailable_reason: str | None = None):
        self._keys = tuple(k.encode("utf-8") for k in keys)
        self._unavailable = unavailable_reason

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyChecker:
        """The keys the settings name (API_KEY, or a secret read once from AWS). A configured
        secret that cannot be read fails closed: protected routes answer 503, /health says why."""
        try:
            keys = resolve_api_keys(settings)
        except Exception as exc:
            reason = f"API key unavailable: {exc}"
            log.error("%s", reason)
            return cls((), unavailable_reason=reason)
        return cls(keys)

    def refresh(self, settings: Settings, *, boto3_session: Any = None) -> None:
        """Read the keys again, in place (the app and its routes keep this checker): after a
        SnapStart restore the snapshot holds the keys of publish time. Raises, changing
        nothing, when they cannot be read."""
        keys = resolve_api_keys(settings, boto3_session=boto3_session)
        self._keys, self._unavailable = tuple(k.encode("utf-8") for k in keys), None

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._unavailable is not None

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable

    @property
    def state(self) -> str:
        """For the start-up log: on, off, or unavailable (configured but unreadable)."""
        return "unavailable" if self._unavailable else ("on" if self._keys else "off")

    def allows(self, presented: str) -> bool:
        given = presented.encode("utf-8")
        ok = False
        for key in self._keys:  # no early exit: constant work whichever key matches
            ok |= hmac.compare_digest(key, given)
        return ok

    def check(self, authorization: str | None) -> None:
        if self._unavailable is not None:
            # Fail closed: keys were configured but could not be read at start.
            raise ApiError(ErrorKind.UNAVAILABLE, self._unavailable, code="auth_unavailable")
        if not self._keys:
            return
        if not authorization:
            raise ApiError(
                ErrorKind.UNAUTHORIZED,
                "Missing API key: send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                ErrorKind.UNAUTHORIZED,
                "Malformed Authorization header: expected 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        if not self.allows(token.strip()):
            raise ApiError(ErrorKind.UNAUTHORIZED, "Incorrect API key provided.")


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for the protected routers."""
    checker: KeyChecker = request.app.state.key_checker
    checker.check(request.headers.get("authorization"))
