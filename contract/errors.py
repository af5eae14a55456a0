"""Error codes carried in `{"ok": false, "error": {"code", "message"}}` responses."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    QUOTA_EXCEEDED = "quota_exceeded"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


# Codes after which the very same request may succeed later (PROTOCOL.md, "Error
# codes"): nothing was stored, and a `send` retried with its `cmid` is safe.
# Whether to retry, and how soon, is the client's policy.
RETRY_LATER: frozenset[ErrorCode] = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE})


class ProtocolError(Exception):
    """A request failed in a way the client is told about (never a crash)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        # The request's id when known (set by contract.envelopes.parse_request),
        # so even a malformed request is answered exactly once.
        self.request_id: str | None = None

    def to_wire(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}
