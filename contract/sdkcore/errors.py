"""The one error tree both SDKs raise (devices/sdk.py and client/sdk.py).

    RoostError                     every failure an SDK raises on purpose; str() is one line
    ├── ConnectError               the server cannot be reached, or the link went away
    │   ├── AuthError              the server refused the credentials or the client id
    │   └── ConnectTimeout         no usable connection in the time allowed (also a TimeoutError)
    ├── RequestError               the server answered `ok: false`: .op, .code (contract.ErrorCode value), .message
    ├── RequestTimeout             a request got no answer in time (also a TimeoutError)
    └── CursorLocked               another process holds the same cursor (label)

The two timeouts are also built-in `TimeoutError`s, so code written against the
device SDK's earlier "raises TimeoutError" keeps working.
"""

from __future__ import annotations


class RoostError(Exception):
    """Base of every error the SDKs raise on purpose; `str()` is one human line."""


class ConnectError(RoostError):
    """The server could not be reached, or the connection was lost for good."""


class AuthError(ConnectError):
    """The server refused the credentials or the client id."""


class ConnectTimeout(ConnectError, TimeoutError):
    """No connection (or not ready again after a loss) within the time allowed."""


class RequestError(RoostError):
    """The server answered a request with `ok: false`.

    `code` is the protocol's error code (`contract.errors.ErrorCode` values, kept
    as the string the server sent so a newer server's codes pass through)."""

    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message


class RequestTimeout(RoostError, TimeoutError):
    """No answer to a request in time (while connected)."""


class CursorLocked(RoostError):
    """Another process is streaming with the same cursor (client label)."""
