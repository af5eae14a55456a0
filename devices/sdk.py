"""Roost device SDK: the reference for people writing device firmware.

A device is a full participant: it logs in with its own id and secret, has an
inbox, receives `command` messages from the people allowed to use it, answers
each with a `result` message, tells its people about things with `event`
messages, and publishes telemetry. Everything here follows PROTOCOL.md; only
paho-mqtt and the wire contract (contract/) are used.

    dev = Device("thermo1", secret, host="roost.local", kind="thermostat")

    @dev.command("set_setpoint")
    def set_setpoint(cmd):                 # runs on the SDK's worker thread
        heater.target = cmd.args["setpoint"]
        return {"setpoint": heater.target} # -> result, status "ok"

    dev.start()
    dev.telemetry(temperature=20.5, humidity=41)
    dev.send_event("opened", {"open": True})

How nothing gets lost:
* The MQTT session is persistent (clean_session=False, fixed client id) and the
  inbox subscription is QoS 1, so the broker keeps pushing what arrives while
  the device is away, starting after the last `n` it acknowledged.
* The device acknowledges (`ack`) an inbox event only after handling it. Events
  are numbered without gaps: a duplicate (n already handled) is skipped, a gap
  is filled with `sync` before going on, and every reconnect starts with a
  `sync` from the last handled n. Pass `state_file` to remember that n across
  restarts of the device program itself.
* Answers use a client message id derived from the command
  (`res-<conv>-<seq>`), so answering the same command twice never stores a
  second message. Requests are retried across reconnects with the same id.
* A command handled but not yet acknowledged when the device program dies is
  handed over again after the restart (at least once); its answer is still
  stored once. Write handlers that set state ("brightness 30") rather than
  change it ("10 % brighter").
* paho reconnects by itself with exponential backoff (1 s doubling up to 30 s).

Request correlation, gap filling, the cursor file, backoff and the error types
(`RoostError` and below) come from the SDK core shared with the people's SDK
(contract/sdkcore/); this module is the device's paho wiring and its inbox worker.

Threads: paho's network thread only sorts incoming messages into queues; a
worker thread runs command handlers and inbox bookkeeping, so handlers may call
`request`, `send_event` and `telemetry`. Never call `request` from inside a
paho callback of your own: its answer arrives on that same thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from contract import catalog, topics
from contract.ids import parse_conv
from contract.sdkcore import (
    ConnectTimeout,
    CursorFile,
    LinkState,
    MailboxFollower,
    Place,
    RequestError,
    Requests,
    RoostError,
)
from contract.sdkcore import files as sdkfiles
from contract.sdkcore.backoff import DEVICE_RECONNECT, REQUEST_RETRY

__all__ = ["Device", "Command", "CommandError", "RequestError", "RoostError"]

SESSION_EXPIRY_V5 = 7 * 86400   # MQTT 5: seconds the broker keeps a device's session while it is offline
SYNC_PAGE = 200           # events per catch-up `sync` (a device's handlers are slower than a listing)


@dataclass(frozen=True, slots=True)
class Command:
    """A command message from a person (or integration) to this device."""

    name: str
    args: dict[str, Any]
    sender: str        # who sent it; the result goes back to them
    conv: str          # the conversation it came in (dm:<a>:<b>)
    seq: int           # its seq there; the result's `for`
    n: int             # its number in this device's inbox
    ts: float


class CommandError(Exception):
    """Raise from a handler to answer with status "error" (message + optional data).

    Not a RoostError: it is the handler's answer to a person, not a failure of the SDK."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data or {}


Handler = Callable[[Command], "dict[str, Any] | None"]
_RESYNC = object()   # worker queue marker: catch up with `sync` (after a (re)connect)


class Device:
    def __init__(self, device_id: str, secret: str, host: str = "127.0.0.1", port: int = 1883, *,
                 kind: str | None = None, label: str | None = None, keepalive: int = 30,
                 tls: ssl.SSLContext | bool | None = None, state_file: str | None = None,
                 request_timeout: float = 10.0, people_ttl: float = 0.0, inbox_queue: int = 1000,
                 min_backoff: int = int(DEVICE_RECONNECT.initial), max_backoff: int = int(DEVICE_RECONNECT.maximum),
                 mqtt_version: int = 4) -> None:
        """`mqtt_version`: 4 (MQTT 3.1.1) or 5 (MQTT 5, the session kept SESSION_EXPIRY_V5 seconds offline)."""
        if mqtt_version not in (4, 5):
            raise ValueError(f"mqtt_version must be 4 (3.1.1) or 5, got {mqtt_version!r}")
        self.mqtt_version = mqtt_version
        self.id = device_id
        self.client_id = f"{device_id}.{label}" if label else device_id
        self.kind = catalog.get_kind(kind)
        self.host, self.port, self.keepalive = host, port, keepalive
        self.request_timeout = request_timeout
        self.people_ttl = people_ttl          # cache the owner list this long (0: ask every time)
        self.log = logging.getLogger(f"roost.device.{device_id}")
        self._handlers: dict[str, Handler] = {}
        self.on_message: Callable[[dict[str, Any]], None] | None = None  # non-command msgs (texts, ...)
        self._cursor_file = CursorFile(state_file) if state_file else None
        saved = self._cursor_file.load() if self._cursor_file else None
        # The inbox cursor: the last n handled (None: first run without a state file).
        self._mailbox = MailboxFollower(self._sync, cursor=saved.n if saved else None, page=SYNC_PAGE)
        self._acked_n: int | None = self._mailbox.cursor
        self._inbox: queue.Queue[Any] = queue.Queue(inbox_queue)
        self._link = LinkState()
        # Every request of a device is idempotent (send by cmid, cumulative ack, reads),
        # so all are published again after a reconnect; rate_limited/unavailable are retried.
        self._requests = Requests(self._link, self._publish_request, where=f"{host}:{port}", timeout=request_timeout,
                                  retry=REQUEST_RETRY)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._people: tuple[float, list[str]] | None = None
        self.stats = {"commands": 0, "events_in": 0, "duplicates": 0, "gaps": 0, "inbox_overflow": 0,
                      "telemetry": 0, "telemetry_dropped": 0, "connects": 0}

        if mqtt_version == 5:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            clean_session=False, protocol=mqtt.MQTTv311)
        c.username_pw_set(device_id, secret)
        c.reconnect_delay_set(min_delay=min_backoff, max_delay=max_backoff)
        c.max_queued_messages_set(1000)   # bounded: telemetry beyond this while offline is dropped
        if tls:
            c.tls_set_context(tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context())
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._mqtt = c

    # ---- set-up ------------------------------------------------------------
    def command(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: register the handler of command `name`."""
        def register(fn: Handler) -> Handler:
            self._handlers[name] = fn
            return fn
        return register

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the SDK's worker thread, in order with command handling
        (e.g. a sensor interrupt that sends an event). Blocks while the queue is full."""
        self._inbox.put(fn)

    def start(self, wait: float | None = 10.0) -> Device:
        """Connect (in the background, retrying) and start handling the inbox.
        With `wait`, block until connected or raise TimeoutError."""
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name=f"roost-dev-{self.id}", daemon=True)
        self._worker.start()
        if self.mqtt_version == 5:
            # a persistent session, as clean_session=0 gives a 3.1.1 device
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_V5
            self._mqtt.connect_async(self.host, self.port, keepalive=self.keepalive, clean_start=False,
                                     properties=props)
        else:
            self._mqtt.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._mqtt.loop_start()
        if wait is not None and not self._link.wait_ready(wait):
            raise ConnectTimeout(f"{self.id}: not connected to {self.host}:{self.port} within {wait}s")
        return self

    def stop(self) -> None:
        """Acknowledge what was handled, DISCONNECT, and stop the threads."""
        self._stop.set()
        if self._worker is not None:
            try:
                self._inbox.put(None, timeout=1.0)   # wake it; it also checks _stop twice a second
            except queue.Full:
                pass
            self._worker.join(timeout=self.request_timeout + 1)
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._link.lost()

    @property
    def connected(self) -> bool:
        return self._link.is_ready()

    def wait_connected(self, timeout: float) -> bool:
        return self._link.wait_ready(timeout)

    # ---- what a device does ----------------------------------------------------
    def telemetry(self, fields: dict[str, Any] | None = None, **more: Any) -> bool:
        """Publish one flat reading; `ts` is added when missing. False if it had to
        be dropped (offline and paho's outgoing queue full)."""
        doc = {**(fields or {}), **more}
        doc.setdefault("ts", round(time.time(), 3))
        info = self._mqtt.publish(topics.telemetry(self.id), json.dumps(doc, separators=(",", ":")), qos=1)
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued for the reconnect
            self.stats["telemetry"] += 1
            return True
        self.stats["telemetry_dropped"] += 1
        return False

    def people(self) -> list[str]:
        """Owners and sharees, as the broker knows them now."""
        if self._people and time.monotonic() - self._people[0] < self.people_ttl:
            return self._people[1]
        mine = self.request("devices")["devices"]
        people = sorted(set(mine[0].get("owners", []) + mine[0].get("sharees", []))) if mine else []
        # An empty answer is not cached: the first claim must be heard at once.
        self._people = (time.monotonic(), people) if people else None
        return people

    def send_event(self, name: str, data: dict[str, Any] | None = None) -> dict[str, int]:
        """Tell every owner and sharee: one `event` message in each conversation.
        Returns {person: seq}. Retrying the same event reuses its cmids."""
        event_id = uuid.uuid4().hex[:12]
        body = {"type": "event", "name": name, "data": data or {}}
        sent = {}
        for person in self.people():
            try:
                res = self._call("send", {"to": person, "cmid": _cmid(f"ev-{event_id}-{person}"), "body": body})
                sent[person] = res["seq"]
            except RequestError as exc:   # e.g. a share was just withdrawn: tell the others anyway
                self.log.warning("event %s to %s refused: %s", name, person, exc)
        return sent

    def send_file(self, data: bytes, name: str, media_type: str | None = None) -> dict[str, int]:
        """Upload `data` once (a camera's snapshot) and send it as a `file` message
        to every owner and sharee. Returns {person: seq}."""
        ref = sdkfiles.upload(lambda op, params: self._call(op, params), data, name, media_type)
        body = sdkfiles.file_body(ref)
        send_id = uuid.uuid4().hex[:12]
        sent = {}
        for person in self.people():
            try:
                sent[person] = self._call("send", {"to": person, "cmid": _cmid(f"file-{send_id}-{person}"),
                                                   "body": body})["seq"]
            except RequestError as exc:   # a share just withdrawn: the others still get it
                self.log.warning("file %s to %s refused: %s", name, person, exc)
        return sent

    def request(self, op: str, timeout: float | None = None, **params: Any) -> dict[str, Any]:
        """One request/response (PROTOCOL.md). Waits for a connection, re-sends
        after a reconnect and backs off on rate_limited/unavailable until
        `timeout`; raises RequestError for any other error, a RoostError that is
        also a TimeoutError (ConnectTimeout, RequestTimeout) at the end."""
        return self._call(op, params, timeout)

    def _call(self, op: str, params: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return self._requests.call(op, params, timeout=timeout or self.request_timeout)

    def _publish_request(self, payload: bytes) -> None:
        self._mqtt.publish(topics.req(self.client_id), payload, qos=1)

    def _sync(self, after: int, limit: int) -> dict[str, Any]:
        return self._call("sync", {"after": after, "limit": limit})

    # ---- paho callbacks (network thread: sort, never block) -------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.log.error("connect refused: %s (retrying with backoff)", reason_code)
            return
        client.subscribe([(topics.inbox(self.id), 1), (topics.resp(self.client_id), 1)])
        self.stats["connects"] += 1
        # Ready at once: the broker handles this connection's packets in order, so a
        # request published after the SUBSCRIBE is answered on the subscribed topic.
        self._link.ready()
        self._put(_RESYNC)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._link.lost()
        if not self._stop.is_set():
            self.log.warning("connection lost (%s); reconnecting", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            self.log.warning("ignoring non-JSON message on %s", msg.topic)
            return
        if not isinstance(doc, dict):
            return
        if msg.topic == topics.resp(self.client_id):
            self._requests.resolve(doc)
        elif msg.topic == topics.inbox(self.id):
            self._put(doc)

    def _put(self, item: Any) -> None:
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            # Not acked, so not lost: the catch-up `sync` will fetch it again.
            self.stats["inbox_overflow"] += 1
            try:
                self._inbox.put_nowait(_RESYNC)
            except queue.Full:
                pass

    # ---- worker thread: the inbox, in order, exactly once ----------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            try:
                if callable(item):
                    item()
                elif item is _RESYNC:
                    self._catch_up()
                else:
                    self._pushed(item)
                # Ack when idle, and at least every 100 events on a busy stream.
                if self._inbox.empty() or (self._mailbox.cursor or 0) - (self._acked_n or 0) >= 100:
                    self._ack()
            except RoostError as exc:
                # Offline or refused: what was not handled is not acked; the
                # next reconnect's catch-up gets it again.
                self.log.warning("inbox handling interrupted: %s", exc)
            except Exception:  # noqa: BLE001 - the worker must survive a bad event
                self.log.exception("inbox handling failed")
        try:
            if self._link.is_ready():
                self._ack()
        except RoostError:
            pass

    def _pushed(self, ev: dict[str, Any]) -> None:
        n = ev.get("n")
        if not isinstance(n, int):
            return
        place = self._mailbox.place(n)
        if place is Place.OLD:
            self.stats["duplicates"] += 1
            return
        if place is Place.GAP:
            self.stats["gaps"] += 1
            self._catch_up(until=n - 1)
            if self._mailbox.place(n) is Place.OLD:
                return
        self._handle(ev)
        self._mailbox.advance(ev)

    def _catch_up(self, until: int | None = None) -> None:
        """Handle what `sync` has after the last handled n (up to `until`); nothing
        without a cursor (first run without a state file: the broker's push is all we have)."""
        for ev in self._mailbox.missing(until):
            self._handle(ev)

    def _handle(self, ev: dict[str, Any]) -> None:
        self.stats["events_in"] += 1
        kind = ev.get("kind")
        if kind == "msg":
            body = ev.get("body") or {}
            if ev.get("from") != self.id and body.get("type") == "command":
                self._run_command(ev, body)
            elif ev.get("from") != self.id and self.on_message is not None:
                self.on_message(ev)
        elif kind == "dropped":
            self.log.warning("the broker discarded %s inbox event(s): %s", ev.get("count"), ev.get("reason"))

    def _run_command(self, ev: dict[str, Any], body: dict[str, Any]) -> None:
        self.stats["commands"] += 1
        cmd = Command(name=str(body.get("name", "")), args=body.get("args") or {}, sender=ev.get("from", ""),
                      conv=ev.get("conv", ""), seq=int(ev.get("seq", 0)), n=ev["n"], ts=ev.get("ts", 0.0))
        try:
            status, data = "ok", self._execute(cmd)
        except CommandError as exc:
            status, data = "error", {"error": exc.message, **exc.data}
        except Exception as exc:  # noqa: BLE001 - a handler bug answers "error", never kills the worker
            self.log.exception("command %s failed", cmd.name)
            status, data = "error", {"error": f"internal error: {type(exc).__name__}"}
        result = {"type": "result", "for": cmd.seq, "status": status, "data": data}
        cmid = _cmid(f"res-{cmd.conv}-{cmd.seq}")
        where = {"to": cmd.sender} if (parse_conv(cmd.conv) or ("",))[0] == "dm" else {"conv": cmd.conv}
        try:
            self._call("send", {"cmid": cmid, "body": result, **where})
        except RequestError as exc:     # e.g. the commander lost access meanwhile
            self.log.warning("result of %s to %s refused: %s", cmd.name, cmd.sender, exc)

    def _execute(self, cmd: Command) -> dict[str, Any]:
        spec = self.kind.command(cmd.name) if self.kind else None
        handler = self._handlers.get(cmd.name)
        if handler is None:
            if cmd.name == "ping":
                return {"pong": True}
            raise CommandError(f"unknown command {cmd.name!r}")
        if spec is not None:
            try:
                args = catalog.check_args(spec, cmd.args)
            except catalog.InvalidArgs as exc:
                raise CommandError(str(exc)) from None
            cmd = Command(cmd.name, args, cmd.sender, cmd.conv, cmd.seq, cmd.n, cmd.ts)
        return handler(cmd) or {}

    def _ack(self) -> None:
        n = self._mailbox.cursor
        if n is not None and n != self._acked_n:
            self._call("ack", {"n": n})
            self._acked_n = n
            if self._cursor_file is not None:    # the inbox cursor across program restarts
                self._cursor_file.save(n, self._mailbox.cursor_ts)


def _cmid(text: str) -> str:
    """Client message ids stay short: long ones are replaced by a stable digest."""
    return text if len(text) <= 64 else text[:40] + "-" + hashlib.sha256(text.encode()).hexdigest()[:16]
