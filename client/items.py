"""What the people's SDK hands its consumer, in one queue: mailbox events,
other topics' messages, "reconnected" marks and the application's own items."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InboxItem:
    event: dict[str, Any]


@dataclass(frozen=True)
class TopicItem:
    """A message on a topic other than inbox/resp (presence, telemetry)."""

    topic: str
    payload: Any          # decoded JSON, or None for an empty (cleared) retained message
    retained: bool


@dataclass(frozen=True)
class ReconnectedItem:
    """The connection came back and subscriptions are restored."""


@dataclass(frozen=True)
class LocalItem:
    """Something the application posted into the same queue (a typed line, EOF...)."""

    value: Any


Item = InboxItem | TopicItem | ReconnectedItem | LocalItem
