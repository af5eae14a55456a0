"""Mailbox event kinds (PROTOCOL.md, "Events"): the one registry of what can
arrive on `roost/inbox/<principal>` and in `sync`.

Every event is `{"n": ..., "kind": ..., "ts": ..., <fields>}`. Fields marked
`extension` are Roost's additions to the shared contract; so are `values`
listed under `extension_values`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

# Members of every event, whatever its kind.
ENVELOPE_FIELDS = ("n", "kind", "ts")


class EventKind(StrEnum):
    """An event's `kind` (a str: `EventKind.MSG == "msg"`)."""

    MSG = "msg"
    DELIVERED = "delivered"
    READ = "read"
    UNREAD = "unread"
    CONTACT = "contact"
    GROUP = "group"
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class EventField:
    name: str
    extension: bool = False
    # For a field that names what happened (`contact.event`, `dropped.reason`):
    # the values of the shared contract, then Roost's own.
    values: tuple[str, ...] = ()
    extension_values: tuple[str, ...] = ()
    # Present only sometimes (`group.name`: on `created` only).
    always: bool = True


@dataclass(frozen=True, slots=True)
class EventSpec:
    kind: EventKind
    fields: tuple[EventField, ...]
    recipients: str

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> EventField | None:
        return next((f for f in self.fields if f.name == name), None)


# Keyed by EventKind, so a plain string looks an event up as well: EVENTS["msg"].
EVENTS: Mapping[str, EventSpec] = MappingProxyType({spec.kind: spec for spec in (
    EventSpec(EventKind.MSG, (EventField("conv"), EventField("seq"), EventField("from"), EventField("cmid"), EventField("body")),
              "every member, the sender included"),
    EventSpec(EventKind.DELIVERED, (EventField("conv"), EventField("seq"), EventField("to")),
              "the sender, once per recipient, when a client of the recipient first acks the message"),
    EventSpec(EventKind.READ, (EventField("conv"), EventField("seq"), EventField("by")),
              "the other members, when `by`'s read position advances"),
    EventSpec(EventKind.UNREAD, (EventField("conv"), EventField("count"), EventField("total")),
              "all the reader's clients, after any change of their counts"),
    EventSpec(EventKind.CONTACT, (EventField("event", values=("request", "accepted", "rejected", "removed"),
                                     extension_values=("blocked", "unblocked")),
                          EventField("with"), EventField("note"), EventField("by", extension=True)),
              "both sides (blocked / unblocked: the blocker's own clients only)"),
    EventSpec(EventKind.GROUP, (EventField("event", values=("created", "added", "removed", "left")),
                        EventField("conv"), EventField("by"), EventField("members", extension=True),
                        EventField("name", extension=True, always=False)),
              "every member, and those just removed or leaving"),
    EventSpec(EventKind.DROPPED, (EventField("count"), EventField("reason", values=("queue_full", "expired"))),
              "the mailbox that lost events"),
)})
