"""Presence payloads on `roost/presence/<principal>` (retained)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ONLINE = "online"
OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Presence:
    state: str
    clients: int
    since: float
    last_seen: float

    def to_wire(self) -> dict[str, object]:
        return asdict(self)


def never_seen() -> dict[str, object]:
    """The presence of a principal that never connected: offline, and times are
    numbers like every time on the wire (0: never)."""
    return Presence(OFFLINE, 0, 0.0, 0.0).to_wire()
