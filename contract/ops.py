"""Request operations (PROTOCOL.md, "Operations"): the one registry of every op
the broker answers on `roost/req/<client_id>`.

Each `OpSpec` says who may call it, its parameters (type, required, bounds)
and the top-level keys of its `result`. The broker's services serve exactly
these ops (tests/test_contract_registry.py fails on any difference), and
docs/PROTOCOL.md's tables are checked against them.

Plain data, standard library only: firmware-side code may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Who is calling (the principal kinds of contract.ids.PRINCIPAL_KINDS).
USER = "user"
DEVICE = "device"
SERVICE = "service"
ANYONE: frozenset[str] = frozenset({USER, DEVICE, SERVICE})
PEOPLE: frozenset[str] = frozenset({USER})
# A device never owns a device: ops for owners are for people and integrations.
OWNERS: frozenset[str] = frozenset({USER, SERVICE})

# Parameter types.
STRING = "string"
INTEGER = "integer"          # a whole number, never a bool
PRINCIPAL = "principal"      # a principal id (contract.ids.PRINCIPAL_ID_RE)
PRINCIPALS = "principals"    # a list of principal ids
CONV = "conv"                # dm:<a>:<b> or grp:<id>
GROUP_CONV = "group_conv"    # grp:<id>
BODY = "body"                # a message body (contract.bodies)

# `n`, `seq`, `after`, `before`: SQLite integers overflow past 2**63.
MAX_NUMBER = 2 ** 62
MAX_SYNC_LIMIT = 1000
MAX_HISTORY_LIMIT = 200
MAX_CMID_LEN = 64
MAX_GROUP_NAME = 64
MAX_GROUP_MEMBERS = 256
MAX_NOTE = 500
MAX_PROFILE_NAME = 64
MAX_STATUS = 256
MAX_QUERY = 64
MAX_PAIRING_CODE = 64
DEFAULT_SYNC_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50
# Files (docs/PROTOCOL.md, "Files"): bytes per chunk, before base64 (4/3 larger
# on the wire), far under the request size limit even with a small limits.max_body.
FILE_CHUNK = 48 * 1024
MAX_CHUNK_TEXT = FILE_CHUNK * 4 // 3
MAX_UPLOAD_ID = 64
MAX_DEVICE_HISTORY_LIMIT = 1000
DEFAULT_DEVICE_HISTORY_LIMIT = 500
MAX_METRIC = 64


@dataclass(frozen=True, slots=True)
class ParamSpec:
    name: str
    type: str
    required: bool = True
    # Strings: length bounds in characters. Integers: value bounds. Lists: length.
    min_len: int | None = None
    max_len: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    default: int | str | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class ItemShape:
    """The objects of a list in a result (`devices` of `devices`): their keys in
    the shared contract, Roost's extra keys, and keys only some items have."""

    key: str
    fields: tuple[str, ...]
    extensions: tuple[str, ...] = ()
    sometimes: tuple[str, ...] = ()     # `convs`: `peer` for a dm, `name` for a group

    @property
    def all_fields(self) -> tuple[str, ...]:
        return self.fields + self.extensions


@dataclass(frozen=True, slots=True)
class OpSpec:
    name: str
    # Principal kinds that may call it; another kind is refused (forbidden, or
    # not_found where the target must stay hidden: docs/PROTOCOL.md, "Operations").
    callers: frozenset[str]
    params: tuple[ParamSpec, ...]
    result: tuple[str, ...]             # top-level keys of `result` in the shared contract
    description: str
    result_extensions: tuple[str, ...] = ()   # Roost's extra keys of `result`
    extension: bool = False             # the op itself is Roost's, not the shared contract's
    # Exactly one of these parameters must be given (`send`: `to` or `conv`).
    one_of: tuple[str, ...] = ()
    # At least one of these parameters must be given (`profile.set`).
    any_of: tuple[str, ...] = ()
    # A config switch (dotted path, e.g. "homeassistant.enabled") that must be on
    # for the broker to serve the op; None: always served.
    requires: str | None = None
    # Lists in the result and the keys of their objects (`sync`'s events: contract.events).
    items: tuple[ItemShape, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def result_keys(self) -> tuple[str, ...]:
        return self.result + self.result_extensions

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def item(self, key: str) -> ItemShape | None:
        return next((i for i in self.items if i.key == key), None)


def _number(name: str, *, required: bool = True, minimum: int = 0) -> ParamSpec:
    return ParamSpec(name, INTEGER, required, minimum=minimum, maximum=MAX_NUMBER)


def _limit(default: int, maximum: int) -> ParamSpec:
    return ParamSpec("limit", INTEGER, False, minimum=1, maximum=maximum, default=default)


def _principal(name: str, description: str = "") -> ParamSpec:
    return ParamSpec(name, PRINCIPAL, description=description)


def _members(*, required: bool) -> ParamSpec:
    return ParamSpec("members", PRINCIPALS, required, min_len=1 if required else None, max_len=MAX_GROUP_MEMBERS)


MESSAGE_FIELDS = ("conv", "seq", "from", "cmid", "ts", "body")
_PEOPLE_LIST = ("id", "kind", "name")

_CONV = ParamSpec("conv", CONV)
_GROUP = ParamSpec("conv", GROUP_CONV)
_DEVICE = _principal("device")

OPS: Mapping[str, OpSpec] = MappingProxyType({spec.name: spec for spec in (
    # ---- messaging (broker/services/messaging.py) -------------------------------
    OpSpec("send", ANYONE, (
        ParamSpec("to", PRINCIPAL, False, description="the direct conversation with this principal"),
        ParamSpec("conv", CONV, False, description="an existing conversation"),
        ParamSpec("cmid", STRING, min_len=1, max_len=MAX_CMID_LEN, description="unique per sender"),
        ParamSpec("body", BODY),
    ), ("conv", "seq", "ts", "dup"), "send a message", one_of=("to", "conv")),
    OpSpec("sync", ANYONE, (ParamSpec("after", INTEGER, False, minimum=0, maximum=MAX_NUMBER, default=0,
                                      description="mailbox n"),
                            _limit(DEFAULT_SYNC_LIMIT, MAX_SYNC_LIMIT)),
           ("events", "last", "more"), "mailbox events after `after`, oldest first"),
    OpSpec("ack", ANYONE, (_number("n"),), ("n",), "this client has every event up to n"),
    OpSpec("read", ANYONE, (_CONV, _number("seq")), ("conv", "seq", "unread", "total_unread"),
           "mark messages up to seq as read"),
    OpSpec("history", ANYONE, (_CONV, _number("before", required=False, minimum=1),
                               _limit(DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT)),
           ("messages",), "messages of a conversation, oldest first", result_extensions=("more",),
           items=(ItemShape("messages", MESSAGE_FIELDS),)),
    OpSpec("convs", ANYONE, (), ("convs", "total_unread"), "your conversations, most recently active first",
           items=(ItemShape("convs", ("conv", "kind", "peer", "name", "last", "unread"), ("last_seq", "read"),
                            sometimes=("peer", "name")),)),
    # ---- groups (broker/services/messaging.py) ----------------------------------
    OpSpec("group.create", ANYONE, (ParamSpec("name", STRING, min_len=1, max_len=MAX_GROUP_NAME),
                                    _members(required=False)),
           ("conv",), "create a group"),
    OpSpec("group.add", ANYONE, (_GROUP, _members(required=True)), (), "add members"),
    OpSpec("group.remove", ANYONE, (_GROUP, _members(required=True)), (), "remove members (creator only)"),
    OpSpec("group.leave", ANYONE, (_GROUP,), (), "leave a group"),
    OpSpec("group.info", ANYONE, (_GROUP,), ("conv", "name", "members"), "a group's name and members",
           result_extensions=("created_by",)),
    # ---- contacts, search, profiles (broker/services/social.py) -------------------
    OpSpec("contact.request", PEOPLE, (_principal("to"), ParamSpec("note", STRING, False, max_len=MAX_NOTE)),
           (), "ask someone to be a contact", result_extensions=("state",)),
    OpSpec("contact.accept", PEOPLE, (_principal("from"),), (), "accept a pending request"),
    OpSpec("contact.reject", PEOPLE, (_principal("from"),), (), "reject a pending request"),
    OpSpec("contact.remove", PEOPLE, (_principal("user"),), (), "end a contact or a pending request"),
    OpSpec("contact.block", PEOPLE, (_principal("user"),), (), "block a principal"),
    OpSpec("contact.unblock", PEOPLE, (_principal("user"),), (), "lift a block"),
    OpSpec("contacts", ANYONE, (), ("contacts",), "accepted contacts with their presence",
           result_extensions=("incoming", "outgoing", "blocked"),
           items=(ItemShape("contacts", (*_PEOPLE_LIST, "presence")), ItemShape("incoming", (), ("from", "note", "ts")),
                  ItemShape("outgoing", (), ("to", "note", "ts")))),
    OpSpec("user.search", ANYONE, (ParamSpec("q", STRING, min_len=1, max_len=MAX_QUERY),),
           ("users",), "people by exact id or name prefix, and your devices",
           items=(ItemShape("users", _PEOPLE_LIST),)),
    OpSpec("profile.get", ANYONE, (ParamSpec("user", PRINCIPAL, False, description="default: yourself"),),
           ("user", "kind", "name", "status"), "a profile you may see"),
    OpSpec("profile.set", ANYONE, (ParamSpec("name", STRING, False, min_len=1, max_len=MAX_PROFILE_NAME),
                                   ParamSpec("status", STRING, False, max_len=MAX_STATUS)),
           ("user", "kind", "name", "status"), "change your display name and/or status", any_of=("name", "status")),
    # ---- devices (broker/services/devices.py) -------------------------------------
    OpSpec("device.claim", OWNERS, (_DEVICE, ParamSpec("code", STRING, max_len=MAX_PAIRING_CODE,
                                                       description="pairing code; spaces and dashes ignored")),
           (), "become a device's owner", result_extensions=("device", "role")),
    OpSpec("device.share", OWNERS, (_DEVICE, _principal("with", "an accepted contact")),
           (), "share a device you own", result_extensions=("device", "with", "role")),
    OpSpec("device.unshare", OWNERS, (_DEVICE, _principal("with")), (), "take a share back", extension=True),
    OpSpec("devices", ANYONE, (), ("devices",), "the devices you own or use (a device: itself)",
           items=(ItemShape("devices", (*_PEOPLE_LIST, "presence", "last_telemetry"), ("room", "role", "owners", "sharees")),)),
    OpSpec("device.history", ANYONE, (_DEVICE, ParamSpec("metric", STRING, False, min_len=1, max_len=MAX_METRIC),
                                      ParamSpec("since", INTEGER, False, minimum=0, maximum=MAX_NUMBER, default=0,
                                                description="unix seconds"),
                                      _limit(DEFAULT_DEVICE_HISTORY_LIMIT, MAX_DEVICE_HISTORY_LIMIT)),
           ("device", "points"), "a device's recent telemetry, oldest first (for charts)", extension=True,
           items=(ItemShape("points", ("ts", "fields")),)),
    # ---- files (broker/services/files.py) ------------------------------------------
    OpSpec("file.upload", ANYONE, (ParamSpec("name", STRING, min_len=1, max_len=255, description="no path"),
                                   ParamSpec("media_type", STRING, min_len=1, description="one of the file types"),
                                   ParamSpec("size", INTEGER, minimum=1, maximum=MAX_NUMBER, description="bytes")),
           ("upload", "chunk_size"), "start an upload", extension=True),
    OpSpec("file.chunk", ANYONE, (ParamSpec("upload", STRING, min_len=1, max_len=MAX_UPLOAD_ID),
                                  _number("offset"),
                                  ParamSpec("data", STRING, min_len=1, max_len=MAX_CHUNK_TEXT,
                                            description="base64 of at most chunk_size bytes")),
           ("upload", "received"), "the next bytes of an upload", extension=True),
    OpSpec("file.finish", ANYONE, (ParamSpec("upload", STRING, min_len=1, max_len=MAX_UPLOAD_ID),),
           ("id", "name", "size", "media_type"), "store the upload; its reference for a file body", extension=True),
    OpSpec("file.download", ANYONE, (ParamSpec("file", STRING, min_len=64, max_len=64, description="its id"),
                                     _number("offset", required=False)),
           ("id", "name", "size", "media_type", "offset", "data", "eof"), "a chunk of a file you may see",
           extension=True),
)})
