"""Shared service types: who is calling, how ops are handled, how services publish.

Services never import the MQTT layer. They publish through a `Publisher` that the
plugin layer implements on top of the broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload

from contract.errors import ErrorCode, ProtocolError


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated principal behind a request."""

    principal: str
    kind: str                 # user | device | service
    client_id: str


# An operation handler: params are the request object minus `id` and `op`.
# It returns the `result` object or raises ProtocolError.
Handler = Callable[[Caller, dict[str, Any]], Awaitable[dict[str, Any]]]


class Publisher(Protocol):
    """What services (and the gateway) need of a front end's broker: the MQTT
    engine implements it (broker/mqtt/hooks.py `BrokerApi`)."""

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int: ...

    async def deliver(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool: ...

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool | None:
        """deliver() without waiting: True/False as deliver() would answer, None when
        it would have to wait (a publisher that cannot tell always answers None)."""

    def client_ids_of(self, principal: str) -> list[str]: ...

    async def kick_principal(self, principal: str) -> int: ...

    def refresh_acl(self) -> None: ...


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel background tasks and wait until they are gone (their errors were
    already logged by the tasks themselves)."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    await asyncio.gather(*live, return_exceptions=True)


# ---- parameter helpers shared by every service's handlers --------------------

def bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def param_str(params: dict[str, Any], name: str, *, required: bool = True, max_len: int = 1024) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise bad(f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string")
    if len(value) > max_len:
        raise bad(f"'{name}' is longer than {max_len} characters")
    return value


@overload
def param_int(params: dict[str, Any], name: str, *, required: Literal[True] = True,
              minimum: int = 0, maximum: int | None = None) -> int: ...


@overload
def param_int(params: dict[str, Any], name: str, *, required: Literal[False], default: int,
              minimum: int = 0, maximum: int | None = None) -> int: ...


@overload
def param_int(params: dict[str, Any], name: str, *, required: Literal[False], default: None = None,
              minimum: int = 0, maximum: int | None = None) -> int | None: ...


def param_int(params: dict[str, Any], name: str, *, required: bool = True, default: int | None = None,
              minimum: int = 0, maximum: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        if required:
            raise bad(f"'{name}' is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        hi = f"..{maximum}" if maximum is not None else " or more"
        raise bad(f"'{name}' must be {minimum}{hi}")
    return value
