"""The Roost wire contract: topics, identifiers, envelopes, error codes, events.

The registry of the wire vocabulary lives here, one module each (import them
directly, they are not loaded with the package): `contract.ops.OPS` (every
request op), `contract.events.EVENTS` (mailbox event kinds),
`contract.bodies.BODIES` and `validate_body` (message body types and their
rules), `contract.errors.ErrorCode`, and `contract.catalog` (device kinds).

This package is imported by the broker, the plugins, the device SDK and the CLI.
It must stay free of amqtt (and of anything heavy) so firmware-side code can use
it with nothing but the standard library.
"""

from contract import topics
from contract.errors import ErrorCode, ProtocolError
from contract.ids import (
    CLIENT_LABEL_RE,
    PRINCIPAL_ID_RE,
    dm_conv,
    group_conv,
    is_valid_principal_id,
    parse_conv,
    principal_of_client_id,
    split_client_id,
)

PROTOCOL_VERSION = 1

__all__ = [
    "PROTOCOL_VERSION",
    "ErrorCode",
    "ProtocolError",
    "CLIENT_LABEL_RE",
    "PRINCIPAL_ID_RE",
    "is_valid_principal_id",
    "principal_of_client_id",
    "split_client_id",
    "dm_conv",
    "group_conv",
    "parse_conv",
    "topics",
]
