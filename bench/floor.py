"""The floor: the least any broker written in Python on uvloop can do, as a bench column.

`python -m bench.floor PORT` serves MQTT 3.1.1 with nothing but what forwarding
needs: CONNECT is answered CONNACK without checks, SUBSCRIBE keeps exact topic
names (no wildcards, no sessions, no ACL), a PUBLISH of QoS 0 or 1 is copied to
the subscribers of its topic and acknowledged at once; nothing is stored,
queued, counted or bounded. It is not a broker anyone should run, and not
Roost's design: it is a measuring stick. What it costs (latency at a paced
load, RSS per idle connection) no broker on the same interpreter and event
loop can undercut, so a target below the floor cannot be met by tuning Roost.

Scenarios it can serve: see FLOOR_SCENARIOS in bench/run.py.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any

import uvloop

CONNACK = b"\x20\x02\x00\x00"
PINGRESP = b"\xd0\x00"


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


class Relay:
    """The subscribers of each exact topic name (encoded), shared by all connections."""

    def __init__(self) -> None:
        self.subscribers: dict[bytes, list[FloorConnection]] = {}

    def forget(self, conn: FloorConnection) -> None:
        for topic in conn.topics:
            subs = self.subscribers.get(topic)
            if subs is not None and conn in subs:
                subs.remove(conn)


class FloorConnection(asyncio.Protocol):
    __slots__ = ("buf", "next_pid", "relay", "topics", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.buf = b""
        self.next_pid = 0
        self.topics: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.forget(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            i, rl, shift = pos + 1, 0, 0
            while i < end:
                b = buf[i]
                i += 1
                rl |= (b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
            else:
                break           # the remaining length is not all here yet
            if i + rl > end:
                break
            first, body, pos = buf[pos], buf[i:i + rl], i + rl
            if not self._packet(first, body):
                self.transport.close()
                return
        self.buf = buf[pos:]

    def _packet(self, first: int, body: bytes) -> bool:
        """Handle one packet; False closes the connection (DISCONNECT, or what the floor does not do)."""
        kind = first >> 4
        if kind == 3:
            self._publish(first, body)
        elif kind == 4:
            pass                # a subscriber's PUBACK: nothing is kept to release
        elif kind == 1:
            self.transport.write(CONNACK)
        elif kind == 8:
            self._subscribe(body)
        elif kind == 12:
            self.transport.write(PINGRESP)
        else:
            return False
        return True

    def _subscribe(self, body: bytes) -> None:
        granted = bytearray()
        i = 2
        while i < len(body):
            n = int.from_bytes(body[i:i + 2], "big")
            topic = body[i + 2:i + 2 + n]
            qos = min(body[i + 2 + n], 1)
            i += 3 + n
            self.relay.subscribers.setdefault(topic, []).append(self)
            self.topics.append(topic)
            granted.append(qos)
        self.transport.write(b"\x90" + _length(2 + len(granted)) + body[:2] + bytes(granted))

    def _publish(self, first: int, body: bytes) -> None:
        n = int.from_bytes(body[:2], "big")
        qos = (first >> 1) & 3
        topic = body[2:2 + n]
        at = 2 + n
        pid = body[at:at + 2] if qos else b""
        payload = body[at + len(pid):]
        for sub in self.relay.subscribers.get(topic, ()):
            if qos:
                sub.next_pid = sub.next_pid % 0xFFFF + 1
                rest = body[:at] + sub.next_pid.to_bytes(2, "big") + payload
                sub.transport.write(b"\x32" + _length(len(rest)) + rest)
            else:
                sub.transport.write(b"\x30" + _length(len(body)) + body)
        if qos:
            self.transport.write(b"\x40\x02" + pid)


async def serve(port: int) -> None:
    relay = Relay()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorConnection(relay), "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("floor relay serving on port", port, flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    # uvloop, the loop Roost runs on: the floor is that of the same interpreter and loop
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
