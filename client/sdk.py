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
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import ssl
import tempfile
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

log = logging.getLogger("roost.client")
# A library never prints on its own: the application decides where logs go.
log.addHandler(logging.NullHandler())

ITEM_QUEUE_MAX = 10000        # messages waiting for the consumer; past it: counted, then re-synced
SYNC_PAGE = 1000              # PROTOCOL.md: sync limit <= 1000
# Ops the SDK may publish again after a reconnect when their answer was lost:
# reads, and writes made idempotent by the protocol (send by cmid, cumulative ack).
REPEATABLE_OPS = frozenset({
    "send", "sync", "ack", "read", "history", "convs", "contacts", "user.search",
    "profile.get", "profile.set", "group.info", "devices",
})


# ---- errors ------------------------------------------------------------------

class RoostError(Exception):
    """Base of every error the SDK raises on purpose; `str()` is one human line."""


class ConnectError(RoostError):
    """The server could not be reached, or the connection was lost for good."""


# CONNACK codes (as paho reports them) that retrying cannot fix: client id not
# valid, bad user name or password, not authorized.
_REFUSED_FOR_GOOD = frozenset({133, 134, 135})


class AuthError(ConnectError):
    """The server refused the credentials or the client id."""


class RequestTimeout(RoostError):
    """No answer in time."""


class ServerError(RoostError):
    """The server answered `ok: false`."""

    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message


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


class _Pending:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: dict[str, Any] | None = None


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
        self._pending: dict[str, _Pending] = {}
        self._subs: dict[str, int] = {}         # topic filter -> qos, restored after reconnect
        self._sub_waits: dict[int, tuple[threading.Event, list]] = {}
        self._connected = threading.Event()
        self._ready = threading.Event()         # connected and subscriptions restored
        self._connack: Any = None
        self._closed_early = False              # the server hung up before its CONNACK (see connect)
        self.refused: str | None = None     # the broker refused a reconnect (see check_refused)
        self._epoch = 0                         # +1 every time subscriptions are (re)established
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
        c.reconnect_delay_set(min_delay=1, max_delay=15)
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
        while not self._ready.wait(0.05):
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
        return self._connected.is_set()

    def check_refused(self) -> None:
        """Raise AuthError if the broker refused a reconnect (streams call this)."""
        if self.refused is not None:
            raise AuthError(f"{self.server} now refuses {self.user} ({self.refused}): the account was removed "
                            "or its password changed; run `roost login` again")

    # -- paho callbacks (network thread: decode and queue, never block) --------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code
        if reason_code.is_failure:
            log.warning("connect refused: %s", reason_code)
            if self._epoch == 0:
                client.disconnect()     # first connect: connect() reports it
            elif getattr(reason_code, "value", None) in _REFUSED_FOR_GOOD:
                # Refused on a reconnect: the account was removed or its secret
                # changed meanwhile. Retrying forever would hide that.
                self.refused = str(reason_code).lower()
                client.disconnect()
            return
        self._connected.set()
        with self._lock:
            subs = list(self._subs.items())
        if not subs:
            self._mark_ready()
            return
        rc, mid = client.subscribe(subs)
        done = threading.Event()
        with self._lock:
            self._sub_waits[mid] = (done, [t for t, _ in subs])
        threading.Thread(target=self._await_resubscribe, args=(done,), daemon=True).start()

    def _await_resubscribe(self, done: threading.Event) -> None:
        if done.wait(self.connect_timeout):
            self._mark_ready()

    def _mark_ready(self) -> None:
        first = self._epoch == 0
        with self._lock:
            self._epoch += 1
        self._ready.set()
        if not first:
            self._put(ReconnectedItem())

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self._ready.clear()
        if self._epoch == 0 and self._connack is None and not self._closing:
            self._closed_early = True
        if not self._closing:
            log.info("disconnected (%s); reconnecting", reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
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
            with self._lock:
                slot = self._pending.pop(doc.get("id"), None) if isinstance(doc.get("id"), str) else None
            if slot is not None:
                slot.response = doc
                slot.event.set()
            elif doc.get("id") is None and doc.get("ok") is False:
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
        grants: list = list(filters)
        with self._lock:
            for f in filters:
                self._subs[f] = qos
            rc, mid = self._mqtt.subscribe([(f, qos) for f in filters])
            self._sub_waits[mid] = (done, grants)
        if rc != mqtt.MQTT_ERR_SUCCESS or not done.wait(timeout):
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
        if not self._ready.wait(timeout):
            raise ConnectError(f"not connected to {self.server} (waited {timeout:g}s)")

    def request(self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
                repeat: bool | None = None) -> dict[str, Any]:
        """Send one request and return the whole response document."""
        timeout = self.request_timeout if timeout is None else timeout
        repeat = (op in REPEATABLE_OPS) if repeat is None else repeat
        rid = uuid.uuid4().hex
        payload = json.dumps({"id": rid, "op": op, **(params or {})}, separators=(",", ":")).encode()
        slot = _Pending()
        deadline = time.monotonic() + timeout
        self._wait_ready(timeout)
        with self._lock:
            self._pending[rid] = slot
            epoch = self._epoch
        try:
            self._mqtt.publish(topics.req(self.client_id), payload, qos=1)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not self.connected:
                        raise ConnectError(f"lost the connection to {self.server} waiting for '{op}'")
                    raise RequestTimeout(f"no answer to '{op}' within {timeout:g}s")
                if slot.event.wait(min(remaining, 0.2)):
                    assert slot.response is not None
                    return slot.response
                # The answer of a request published before a reconnect may be lost
                # with the old session; publish idempotent ones again.
                if repeat and self._ready.is_set() and self._epoch != epoch:
                    epoch = self._epoch
                    self._mqtt.publish(topics.req(self.client_id), payload, qos=1)
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def call(self, op: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Like request() but returns `result` or raises ServerError."""
        resp = self.request(op, params, **kw)
        if resp.get("ok") is True:
            result = resp.get("result")
            return result if isinstance(result, dict) else {}
        err = resp.get("error") if isinstance(resp.get("error"), dict) else {}
        raise ServerError(op, str(err.get("code", "internal")), str(err.get("message", "no message")))

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
        """The newest event number in our mailbox.

        Fast path: asked for events after a number beyond any mailbox, this broker
        answers no events and `last` = its newest n. A server that echoes the
        cursor instead (or refuses) gets the slow path: page through `sync`.
        """
        probe = 2 ** 53
        try:
            res = self.call("sync", {"after": probe, "limit": 1})
            last = res.get("last")
            if not res.get("events") and isinstance(last, int) and 0 <= last < probe:
                return max(after, last)
        except ServerError:
            pass
        n = after
        while True:
            res = self.call("sync", {"after": n, "limit": SYNC_PAGE})
            events = res.get("events") or []
            for ev in events:
                if isinstance(ev, dict) and isinstance(ev.get("n"), int):
                    n = max(n, ev["n"])
            last = res.get("last")
            if not res.get("more") or not events:
                if isinstance(last, int) and last > n:
                    n = last
                return n


def _decode(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None


# ---- cursor persistence -------------------------------------------------------

class CursorLocked(RoostError):
    """Another process is streaming with the same label."""


class CursorStore:
    """The last event n handed out for one (server, user, label), kept across runs.

    A lock file keeps two processes from using the same label at once: with the
    same client id they would take each other's connection over, endlessly.
    """

    def __init__(self, directory: Path, server: Server, user: str, label: str) -> None:
        safe_server = f"{server.host}_{server.port}".replace("/", "_").replace(":", "_")
        self.path = directory / "cursors" / safe_server / f"{user}.{label}.json"
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

    def _doc(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def load(self) -> int | None:
        n = self._doc().get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None

    def load_ts(self) -> float | None:
        """The `ts` of event n when it was saved: tells this mailbox from another
        one behind the same server address and user (a store that was replaced)."""
        ts = self._doc().get("ts")
        return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None

    def save(self, n: int, ts: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cursor-")
        with os.fdopen(fd, "w") as f:
            json.dump({"n": n, "ts": ts, "saved": time.time()}, f)
        os.replace(tmp, self.path)


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
        self.cursor = cursor              # last n handed out; None = not known yet
        self.cursor_ts: float | None = None   # the ts of that event, when it passed through here
        self.store = store
        self._ack = ack
        self._ack_interval = ack_interval
        self._acked = cursor
        self._last_ack = 0.0
        self._behind = False              # a catch-up failed: retry before trusting pushes
        self.gaps_filled = 0

    def start_at_head(self) -> int:
        self.cursor = self.client.mailbox_head()
        self._acked = self.cursor
        return self.cursor

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
        if self.cursor is None:
            self._behind = False
            return []
        out: list[dict[str, Any]] = []
        try:
            while True:
                res = self.client.call("sync", {"after": self.cursor, "limit": SYNC_PAGE})
                events = sorted((e for e in res.get("events") or []
                                 if isinstance(e, dict) and isinstance(e.get("n"), int)), key=lambda e: e["n"])
                for ev in events:
                    if ev["n"] > self.cursor:
                        out.append(ev)
                        self.cursor = ev["n"]
                        self.cursor_ts = ev.get("ts")
                if not res.get("more") or not events:
                    self._behind = False
                    return out
        except RoostError as e:
            log.warning("catching up from #%s failed (%s); will retry", self.cursor, e)
            self._behind = True
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
        n = ev["n"]
        if self.cursor is None or (n == self.cursor + 1 and not self._behind):
            self.cursor = n
            self.cursor_ts = ev.get("ts")
            return [ev]
        if n <= self.cursor:
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
