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
module is the people's paho wiring (connect diagnostics, subscriptions) and the
item queue (client/items.py); the ordered stream and the per-label cursor are
client/stream.py. Every name is importable from here.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from client.config import Server
from client.items import InboxItem, Item, LocalItem, ReconnectedItem, TopicItem
from client.stream import CursorStore, EventStream
from contract import topics
from contract.ids import TRANSIENT_LABEL_PREFIX
from contract.sdkcore import (
    SYNC_PAGE,
    AuthError,
    ConnectError,
    ConnectTimeout,
    CursorLocked,
    LinkState,
    RequestError,
    Requests,
    RequestTimeout,
    RoostError,
    mailbox_head,
)
from contract.sdkcore import files as sdkfiles
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
    "profile.get", "profile.set", "group.info", "devices", "device.history", "file.download",
})


# ---- errors: the core's tree (contract/sdkcore/errors.py) ------------------------

# The name this SDK has always used for an `ok: false` answer.
ServerError = RequestError

# CONNACK codes (as paho reports them) that retrying cannot fix: client id not
# valid, bad user name or password, not authorized.
_REFUSED_FOR_GOOD = frozenset({133, 134, 135})


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
        mqtt_version: int = 4,
    ) -> None:
        """`mqtt_version`: 4 (MQTT 3.1.1) or 5 (MQTT 5; the broker serves both alike)."""
        if mqtt_version not in (4, 5):
            raise ValueError(f"mqtt_version must be 4 (3.1.1) or 5, got {mqtt_version!r}")
        self.mqtt_version = mqtt_version
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

        if mqtt_version == 5:
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                            clean_session=True, protocol=mqtt.MQTTv311)
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
            if self.mqtt_version == 5:    # Session Expiry Interval 0: the session ends with the connection
                self._mqtt.connect(self.server.host, self.server.port, keepalive=self._keepalive, clean_start=True)
            else:
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
                raise ConnectTimeout(f"no answer from {where} within {self.connect_timeout:g}s")

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

    def send_file(self, data: bytes, name: str, *, to: str | None = None, conv: str | None = None,
                  media_type: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Upload `data` as a file called `name` (media type from its suffix unless
        given) and send it as a `file` body; returns the send result and `file`
        (the reference)."""
        ref = sdkfiles.upload(lambda op, params: self.call(op, params, timeout=timeout), data, name, media_type)
        sent = self.send(sdkfiles.file_body(ref), to=to, conv=conv, timeout=timeout)
        return {**sent, "file": ref}

    def download_file(self, file_id: str, *, timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        """A file sent to us (or uploaded by us): its {id, name, size, media_type} and bytes."""
        return sdkfiles.download(lambda op, params: self.call(op, params, timeout=timeout), file_id)

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
