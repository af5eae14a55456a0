"""People-side SDK: a Roost client over paho-mqtt, for the CLI and for scripts.

    client = RoostClient(Server("127.0.0.1", 1883), "alice", "secret", label="laptop")
    client.connect()                      # raises ConnectError / AuthError
    client.call("send", to="bob", cmid="c1", body={"type": "text", "text": "hi"})
    stream = EventStream(client)          # the mailbox, in order, once each
    stream.start_at_head()
    for item in stream.poll(1.0): ...

Threading: paho's network thread runs the callbacks; they only decode and queue.
Everything that waits (requests, the event stream) runs in the caller's thread.
After a reconnect the client re-subscribes by itself; `EventStream` then calls
`sync` from the last event it handed out, so nothing is missed or repeated.

Request correlation, gap filling, the cursor file, backoff and the error types
come from the SDK core shared with the device SDK (contract/sdkcore/); this
module is the people's paho wiring (connect diagnostics, subscriptions), the
item queue, the label lock and the ordered stream.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from client.config import Server
from contract import topics
from contract.ids import TRANSIENT_LABEL_PREFIX
from contract.sdkcore import (
    SYNC_PAGE,
    AuthError,
    ConnectError,
    ConnectTimeout,
    CursorFile,
    CursorLocked,
    LinkState,
    MailboxFollower,
    Place,
    RequestError,
    Requests,
    RequestTimeout,
    RoostError,
    mailbox_head,
)
from contract.sdkcore.backoff import CLIENT_RECONNECT

__all__ = [
    "AuthError", "ConnectError", "ConnectTimeout", "CursorLocked", "RequestError", "RequestTimeout", "RoostError",
    "ServerError", "RoostClient", "EventStream", "CursorStore", "Item", "InboxItem", "TopicItem", "ReconnectedItem",
    "LocalItem", "SYNC_PAGE", "REPEATABLE_OPS",
]

log = logging.getLogger("roost.client")
# A library never prints on its own: the application decides where logs go.
log.addHandler(logging.NullHandler())

ITEM_QUEUE_MAX = 10000        # messages waiting for the consumer; past it: counted, then re-synced
# Ops the SDK may publish again after a reconnect when their answer was lost:
# reads, and writes made idempotent by the protocol (send by cmid, cumulative ack).
REPEATABLE_OPS = frozenset({
    "send", "sync", "ack", "read", "history", "convs", "contacts", "user.search",
    "profile.get", "profile.set", "group.info", "devices",
})


# ---- errors: the core's tree (contract/sdkcore/errors.py) ------------------------

# The name this SDK has always used for an `ok: false` answer.
ServerError = RequestError

# CONNACK codes (as paho reports them) that retrying cannot fix: client id not
# valid, bad user name or password, not authorized.
_REFUSED_FOR_GOOD = frozenset({133, 134, 135})


# ---- items handed to consumers ------------------------------------------------

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


# ---- the client ---------------------------------------------------------------

class RoostClient:
    """One MQTT connection as `<user>.<label>`, with requests and an item queue."""

    def __init__(
        self,
        server: Server,
        user: str,
        secret: str,
        *,
        label: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        subscribe_inbox: bool = True,
    ) -> None:
        self.server = server
        self.user = user
        # Without a label: a transient `cli-` one (docs/PROTOCOL.md, Presence), not
        # counted for presence. A long-lived client should name itself.
        self.label = label or f"{TRANSIENT_LABEL_PREFIX}{uuid.uuid4().hex[:8]}"
        self.client_id = f"{user}.{self.label}"
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.items: queue.Queue[Item] = queue.Queue(maxsize=ITEM_QUEUE_MAX)
        self.overflow = 0                       # items dropped because the consumer lagged
        self._subscribe_inbox = subscribe_inbox
        self._lock = threading.Lock()
        self._subs: dict[str, int] = {}         # topic filter -> qos, restored after reconnect
        self._sub_waits: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._link = LinkState()                # ready = connected and subscriptions restored
        self._requests = Requests(self._link, self._publish_request, where=str(server), timeout=request_timeout,
                                  repeatable=REPEATABLE_OPS)
        self._connack: Any = None
        self._closed_early = False              # the server hung up before its CONNACK (see connect)
        self.refused: str | None = None     # the broker refused a reconnect (see check_refused)
        self._closing = False
        self._started = False

        c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        c.username_pw_set(user, secret)
        if tls:
            ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
            c.tls_set_context(ctx)
        c.reconnect_delay_set(min_delay=int(CLIENT_RECONNECT.initial), max_delay=int(CLIENT_RECONNECT.maximum))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._mqtt = c
        self._tls = tls
        self._keepalive = keepalive

    # -- connection ---------------------------------------------------------

    def connect(self) -> None:
        """Connect, subscribe to our response topic (and inbox); raise on failure."""
        base = [topics.resp(self.client_id)]
        if self._subscribe_inbox:
            base.append(topics.inbox(self.user))
        for t in base:
            self._subs[t] = 1
        where = str(self.server)
        try:
            self._mqtt.connect(self.server.host, self.server.port, keepalive=self._keepalive)
        except ConnectionRefusedError:
            raise ConnectError(f"cannot connect to {where}: connection refused (is the broker running?)") from None
        except ssl.SSLError as e:
            # A plain MQTT port hangs up on a TLS hello, or answers with bytes that are no TLS record.
            plain = e.reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING")
            hint = " (is this a plain MQTT port? try --no-tls)" if plain else ""
            raise ConnectError(f"cannot connect to {where}: TLS failed ({e.reason or e}){hint}") from None
        except (TimeoutError, OSError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise ConnectError(f"cannot connect to {where}: {reason}") from None
        self._mqtt.loop_start()
        self._started = True
        deadline = time.monotonic() + self.connect_timeout
        while not self._link.wait_ready(0.05):
            rc = self._connack
            if rc is not None and getattr(rc, "is_failure", False):
                self.close()
                raise AuthError(f"{where} refused {self.user} ({str(rc).lower()}); check the id and password, or run `roost login`")
            if self._closed_early:
                # A TLS listener drops a plain CONNECT without a word; paho would
                # retry in silence until the timeout. An MQTT broker always answers
                # CONNECT with a CONNACK, so say at once what is most likely wrong.
                self.close()
                hint = "" if self._tls else " (is this a TLS port? try --tls)"
                raise ConnectError(f"cannot connect to {where}: the server closed the connection before "
                                   f"answering CONNECT{hint}")
            if time.monotonic() > deadline:
                self.close()
                raise ConnectError(f"no answer from {where} within {self.connect_timeout:g}s")

    def close(self) -> None:
        self._closing = True
        if self._started:
            try:
                self._mqtt.disconnect()
            finally:
                self._mqtt.loop_stop()
                self._started = False

    def __enter__(self) -> RoostClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._link.is_connected()

    def check_refused(self) -> None:
        """Raise AuthError if the broker refused a reconnect (streams call this)."""
        if self.refused is not None:
            raise AuthError(f"{self.server} now refuses {self.user} ({self.refused}): the account was removed "
                            "or its password changed; run `roost login` again")

    # -- paho callbacks (network thread: decode and queue, never block) --------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connack = reason_code
        if reason_code.is_failure:
            log.warning("connect refused: %s", reason_code)
            if self._link.epoch == 0:
                client.disconnect()     # first connect: connect() reports it
            elif getattr(reason_code, "value", None) in _REFUSED_FOR_GOOD:
                # Refused on a reconnect: the account was removed or its secret
                # changed meanwhile. Retrying forever would hide that.
                self.refused = str(reason_code).lower()
                client.disconnect()
            return
        self._link.connected()
        with self._lock:
            subs = list(self._subs.items())
        if not subs:
            self._mark_ready()
            return
        rc, mid = client.subscribe(subs)
        if mid is None:     # not sent (the connection just dropped): the next connect tries again
            return
        done = threading.Event()
        with self._lock:
            self._sub_waits[mid] = (done, [t for t, _ in subs])
        threading.Thread(target=self._await_resubscribe, args=(done,), daemon=True).start()

    def _await_resubscribe(self, done: threading.Event) -> None:
        if done.wait(self.connect_timeout):
            self._mark_ready()

    def _mark_ready(self) -> None:
        if self._link.ready():
            self._put(ReconnectedItem())

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._link.lost()
        if self._link.epoch == 0 and self._connack is None and not self._closing:
            self._closed_early = True
        if not self._closing:
            log.info("disconnected (%s); reconnecting", reason_code)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_code_list: list[Any],
                      properties: Any) -> None:
        with self._lock:
            wait = self._sub_waits.pop(mid, None)
        if wait is None:
            return
        done, filters = wait
        granted = []
        for t, rc in zip(filters, reason_code_list):
            ok = not rc.is_failure
            granted.append(ok)
            if not ok:
                with self._lock:
                    self._subs.pop(t, None)
        wait[1][:] = granted  # the caller reads the grants back from the same list
        done.set()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        t = msg.topic
        if t == topics.resp(self.client_id):
            doc = _decode(msg.payload)
            if not isinstance(doc, dict):
                log.warning("undecodable response ignored")
                return
            if not self._requests.resolve(doc) and doc.get("id") is None and doc.get("ok") is False:
                log.warning("server error for an unidentified request: %s", doc.get("error"))
            return
        if t == topics.inbox(self.user):
            ev = _decode(msg.payload)
            if isinstance(ev, dict) and isinstance(ev.get("n"), int):
                self._put(InboxItem(ev))
            else:
                log.warning("malformed inbox event ignored")
            return
        self._put(TopicItem(t, _decode(msg.payload) if msg.payload else None, bool(msg.retain)))

    def _put(self, item: Item) -> None:
        try:
            self.items.put_nowait(item)
        except queue.Full:
            # Inbox events lost here come back through sync (the stream sees the gap).
            self.overflow += 1
            if self.overflow == 1 or self.overflow % 1000 == 0:
                log.warning("consumer is behind: %d item(s) dropped so far", self.overflow)

    def post(self, value: Any) -> None:
        """Queue an application item (e.g. a line typed by the user) among the network ones."""
        self.items.put(LocalItem(value))

    # -- subscriptions --------------------------------------------------------

    def subscribe(self, filters: list[str], qos: int = 1, timeout: float | None = None) -> dict[str, bool]:
        """Subscribe and wait for SUBACK; returns which filters were granted."""
        if not filters:
            return {}
        timeout = self.request_timeout if timeout is None else timeout
        self._wait_ready(timeout)
        done = threading.Event()
        grants: list[Any] = list(filters)
        with self._lock:
            for f in filters:
                self._subs[f] = qos
            rc, mid = self._mqtt.subscribe([(f, qos) for f in filters])
            if mid is not None:
                self._sub_waits[mid] = (done, grants)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None or not done.wait(timeout):
            raise RequestTimeout(f"no answer to subscribe within {timeout:g}s")
        return dict(zip(filters, grants))

    def unsubscribe(self, filters: list[str]) -> None:
        with self._lock:
            for f in filters:
                self._subs.pop(f, None)
        if filters and self.connected:
            self._mqtt.unsubscribe(filters)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self._mqtt.publish(topic, payload, qos=qos)

    # -- requests -------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> None:
        if not self._link.wait_ready(timeout):
            raise ConnectTimeout(f"not connected to {self.server} (waited {timeout:g}s)")

    def _publish_request(self, payload: bytes) -> None:
        self._mqtt.publish(topics.req(self.client_id), payload, qos=1)

    def request(self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
                repeat: bool | None = None) -> dict[str, Any]:
        """Send one request and return the whole response document. By default
        only REPEATABLE_OPS are published again after a reconnect."""
        return self._requests.request(op, params, timeout=timeout, repeat=repeat)

    def call(self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
             repeat: bool | None = None) -> dict[str, Any]:
        """Like request() but returns `result` or raises ServerError (RequestError)."""
        return self._requests.call(op, params, timeout=timeout, repeat=repeat)

    # -- conveniences -----------------------------------------------------------

    def send(self, body: dict[str, Any], *, to: str | None = None, conv: str | None = None,
             cmid: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a message; retried with the same cmid, so at most one is stored."""
        params: dict[str, Any] = {"cmid": cmid or uuid.uuid4().hex, "body": body}
        if conv:
            params["conv"] = conv
        else:
            params["to"] = to
        return self.call("send", params, timeout=timeout)

    def mailbox_head(self, after: int = 0) -> int:
        """The newest event number in our mailbox (contract/sdkcore/mailbox.py)."""
        return mailbox_head(self.sync, after)

    def sync(self, after: int, limit: int = SYNC_PAGE) -> dict[str, Any]:
        """One `sync` page: the events after `after`."""
        return self.call("sync", {"after": after, "limit": limit})


def _decode(payload: bytes | bytearray) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None


# ---- cursor persistence -------------------------------------------------------

class CursorStore:
    """The last event n handed out for one (server, user, label), kept across runs
    in a cursor file (contract/sdkcore/cursor.py).

    A lock file keeps two processes from using the same label at once: with the
    same client id they would take each other's connection over, endlessly.
    """

    def __init__(self, directory: Path, server: Server, user: str, label: str) -> None:
        safe_server = f"{server.host}_{server.port}".replace("/", "_").replace(":", "_")
        self.path = directory / "cursors" / safe_server / f"{user}.{label}.json"
        self._file = CursorFile(self.path)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CursorLocked("another roost process is already using this label; pick another with --label") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> int | None:
        saved = self._file.load()
        return saved.n if saved is not None else None

    def load_ts(self) -> float | None:
        """The `ts` of event n when it was saved: tells this mailbox from another
        one behind the same server address and user (a store that was replaced)."""
        saved = self._file.load()
        return saved.ts if saved is not None else None

    def save(self, n: int, ts: float | None = None) -> None:
        self._file.save(n, ts)


# ---- the ordered event stream -----------------------------------------------------

class EventStream:
    """The mailbox as a gap-free, duplicate-free, in-order stream, plus other items.

    Live events come pushed on the inbox topic; a gap (events lost while away, or
    dropped because the consumer lagged) or a reconnect is filled by `sync` from
    the last event handed out. Events are acked (cumulative) and the cursor saved
    once the consumer comes back for more, i.e. after it handled them.
    """

    def __init__(self, client: RoostClient, *, cursor: int | None = None,
                 store: CursorStore | None = None, ack: bool = True,
                 ack_interval: float = 0.5) -> None:
        self.client = client
        # The cursor (last n handed out; None = not known yet) and the ts of that event.
        self._mailbox = MailboxFollower(client.sync, cursor=cursor)
        self.store = store
        self._ack = ack
        self._ack_interval = ack_interval
        self._acked = cursor
        self._last_ack = 0.0
        self._behind = False              # a catch-up failed: retry before trusting pushes
        self.gaps_filled = 0

    @property
    def cursor(self) -> int | None:
        return self._mailbox.cursor

    @cursor.setter
    def cursor(self, n: int | None) -> None:
        self._mailbox.cursor = n

    @property
    def cursor_ts(self) -> float | None:
        return self._mailbox.cursor_ts

    def start_at_head(self) -> int:
        head = self.client.mailbox_head()
        self.cursor = self._acked = head
        return head

    def resume(self, n: int, ts: float | None) -> str | None:
        """Continue after event `n` saved earlier, unless the server's mailbox is not
        the one it was saved from (the store was replaced: numbers start again),
        in which case the whole mailbox is replayed so nothing is skipped. Returns
        what to tell the user then."""
        head = self.client.mailbox_head()
        if head < n:
            self.cursor = 0
            return f"the server's mailbox ends at #{head}, before the saved position #{n} (a new store?): " \
                   "replaying it from the start"
        if ts is not None and n > 0:
            res = self.client.call("sync", {"after": n - 1, "limit": 1})
            events = [e for e in res.get("events") or [] if isinstance(e, dict)]
            if events and events[0].get("n") == n and events[0].get("ts") != ts:
                self.cursor = 0
                return f"event #{n} on the server is not the one seen before (a new store?): " \
                       "replaying the mailbox from the start"
        self.cursor = n
        return None

    def catch_up(self) -> list[dict[str, Any]]:
        """Events after the cursor, fetched with sync (the cursor must be known).

        A failure part-way (connection lost again, rate limited) keeps what was
        fetched, marks the stream as behind, and the next poll tries again.
        """
        out: list[dict[str, Any]] = []
        try:
            for ev in self._mailbox.missing():
                out.append(ev)
        except RoostError as e:
            log.warning("catching up from #%s failed (%s); will retry", self.cursor, e)
            self._behind = True
            return out
        self._behind = False
        return out

    def poll(self, timeout: float) -> list[Item]:
        """Wait up to `timeout` for items; returns them in order (possibly none)."""
        self.flush_ack()
        out: list[Item] = []
        if self._behind and self.client.connected:
            out.extend(InboxItem(ev) for ev in self.catch_up())
        try:
            first = self.client.items.get(timeout=0.2 if (self._behind or out) else timeout)
        except queue.Empty:
            if not out:
                self.flush_ack(force=True)
            return out
        batch = [first]
        while len(batch) < 500:
            try:
                batch.append(self.client.items.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            if isinstance(item, InboxItem):
                out.extend(InboxItem(ev) for ev in self._accept(item.event))
            elif isinstance(item, ReconnectedItem):
                out.append(item)
                out.extend(InboxItem(ev) for ev in self.catch_up())
            else:
                out.append(item)
        return out

    def _accept(self, ev: dict[str, Any]) -> list[dict[str, Any]]:
        place = self._mailbox.place(ev["n"])
        if place is Place.NEXT and (self.cursor is None or not self._behind):
            self._mailbox.advance(ev)
            return [ev]
        if place is Place.OLD:
            return []                     # already handed out (sync and push overlap)
        # A gap: fill it from the server, which has ev too (it was committed before the push).
        self.gaps_filled += 1
        return self.catch_up()

    def flush_ack(self, force: bool = False) -> None:
        """Ack and save the cursor if it moved (at most every ack_interval unless forced)."""
        if self.cursor is None or self.cursor == self._acked:
            return
        now = time.monotonic()
        if not force and now - self._last_ack < self._ack_interval:
            return
        n = self.cursor
        if self._ack and self.client.connected:
            try:
                self.client.call("ack", {"n": n})
            except RoostError as e:
                log.warning("ack %d failed: %s", n, e)
                return
        if self.store is not None:
            self.store.save(n, self.cursor_ts)
        self._acked = n
        self._last_ack = now
