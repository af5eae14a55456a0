r"""Identifier rules: principal ids, client ids and conversation ids.

The patterns end in `\Z`, not `$`: `$` also matches before a trailing newline,
so `re.match(r"^a$", "a\n")` succeeds. Checks here use `fullmatch`, and a caller
that still uses `.match` on these patterns gets the same answer.
"""

from __future__ import annotations

import re

PRINCIPAL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
CLIENT_LABEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")
GROUP_ID_RE = re.compile(r"^[a-z0-9]{1,32}\Z")

PRINCIPAL_KINDS = ("user", "device", "service")


def is_valid_principal_id(value: object) -> bool:
    return isinstance(value, str) and PRINCIPAL_ID_RE.fullmatch(value) is not None


def split_client_id(client_id: str) -> tuple[str, str | None] | None:
    """`alice` -> ("alice", None); `alice.phone` -> ("alice", "phone"); invalid -> None."""
    principal, dot, label = client_id.partition(".")
    if not is_valid_principal_id(principal):
        return None
    if not dot:
        return principal, None
    if CLIENT_LABEL_RE.fullmatch(label) is None:
        return None
    return principal, label


# Extension (docs/PROTOCOL.md, Presence): a label starting with this marks a
# short-lived client, such as a one-shot `roost` command. Such clients do not
# count for presence, so running a command does not make its user blink
# online/offline for every contact.
TRANSIENT_LABEL_PREFIX = "cli-"


def is_transient_client_id(client_id: str) -> bool:
    """`alice.cli-1a2b3c4d` -> True; `alice`, `alice.phone`, invalid ids -> False."""
    parts = split_client_id(client_id)
    return parts is not None and parts[1] is not None and parts[1].startswith(TRANSIENT_LABEL_PREFIX)


def principal_of_client_id(client_id: str) -> str | None:
    parts = split_client_id(client_id)
    return parts[0] if parts else None


def dm_conv(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


def group_conv(group_id: str) -> str:
    return f"grp:{group_id}"


def parse_conv(conv: object) -> tuple[str, tuple[str, ...]] | None:
    """Return ("dm", (a, b)) or ("grp", (gid,)); None when malformed."""
    if not isinstance(conv, str):
        return None
    if conv.startswith("dm:"):
        parts = conv.split(":")
        if len(parts) == 3 and is_valid_principal_id(parts[1]) and is_valid_principal_id(parts[2]) and parts[1] < parts[2]:
            return "dm", (parts[1], parts[2])
        return None
    if conv.startswith("grp:"):
        gid = conv[4:]
        if GROUP_ID_RE.fullmatch(gid):
            return "grp", (gid,)
    return None
