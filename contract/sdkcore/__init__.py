"""The SDK core: what the device SDK (devices/sdk.py) and the people's SDK
(client/sdk.py) both do, once.

    errors.py    the one error tree (RoostError -> ConnectError/AuthError, RequestError, timeouts)
    requests.py  request/response correlation: one waiter per request id, deadlines,
                 re-publishing after a reconnect, retries after rate_limited/unavailable;
                 LinkState, the connected/ready/epoch state the paho callbacks keep
    backoff.py   the backoff policy (reconnects, request retries)
    mailbox.py   following the mailbox by its numbers: duplicates dropped, gaps filled
                 with `sync` from the cursor, the mailbox head
    cursor.py    the cursor file (atomic replace)

Why here, in contract/: the device side may import only contract/ and paho-mqtt
(firmware-safe), so the core must live in contract/ or devices/. It is pure
standard-library Python with no MQTT client in it (each SDK hands it a
`publish` callable and a `sync` callable, and drives `LinkState` from its own
paho callbacks), which is what contract/ allows; and it is the client half of
the wire contract (how ids correlate, what `sync`'s paging and `n` promise).
Putting it in devices/ instead would make the people's SDK depend on the device
package. Being transport-neutral also makes it testable without a broker
(tests/test_sdk_core.py).

What stays in each SDK is its paho wiring and its front-end behaviour: the
device's persistent session, worker thread and command handlers; the people's
client's connect diagnostics, dynamic subscriptions and the ordered item stream.
"""

from contract.sdkcore.backoff import Backoff
from contract.sdkcore.cursor import CursorFile, SavedCursor
from contract.sdkcore.errors import (
    AuthError,
    ConnectError,
    ConnectTimeout,
    CursorLocked,
    RequestError,
    RequestTimeout,
    RoostError,
)
from contract.sdkcore.mailbox import SYNC_PAGE, MailboxFollower, Place, mailbox_head
from contract.sdkcore.requests import RETRYABLE_CODES, LinkState, Requests

__all__ = [
    "AuthError",
    "Backoff",
    "ConnectError",
    "ConnectTimeout",
    "CursorFile",
    "CursorLocked",
    "LinkState",
    "MailboxFollower",
    "Place",
    "RETRYABLE_CODES",
    "RequestError",
    "RequestTimeout",
    "Requests",
    "RoostError",
    "SYNC_PAGE",
    "SavedCursor",
    "mailbox_head",
]
