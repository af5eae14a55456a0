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
