"""The Roost wire contract: topics, identifiers, envelopes, error codes, events.

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
