"""Optional bearer-token authentication shared by the HTTP and gRPC transports."""

from __future__ import annotations

import hmac

from otelspans_fdw.exceptions import AuthenticationError

__all__ = ["check_bearer"]


def check_bearer(expected: str | None, authorization: str | None) -> None:
    """Raise :class:`AuthenticationError` unless ``authorization`` is ``Bearer <expected>``.

    No configured token means no authentication.  The comparison is constant-time so the token
    cannot be guessed from response timings.
    """
    if not expected:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise AuthenticationError(
            "missing or invalid bearer token", hint="Send 'Authorization: Bearer <token>'."
        )
