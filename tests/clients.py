"""Real MQTT clients for tests (paho-mqtt over TCP), with helpers to wait for
messages, and an IM client that speaks PROTOCOL.md's request/response and
inbox events."""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from contract import topics
from tests.harness import RoostProcess

DEFAULT_TIMEOUT = 5.0


class ConnectFailed(Exception):
    def __init__(self, rc: int) -> None:
        super().__init__(f"CONNACK return code {rc}")
        self.rc = rc


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False

    def json(self) -> Any:
        return json.loads(self.payload)


def _filter_matches(pattern: str, topic: str) -> bool:
    return topics.matches(topic, pattern)


_V5_TO_311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class MqttClient:
    def __init__(self, client_id: str, *, clean_session: bool = True, protocol: int = mqtt.MQTTv311,
                 transport: str = "tcp") -> None:
        self.client_id = client_id
        self._c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                              clean_session=clean_session, protocol=protocol, transport=transport)
        self._c.on_connect = self._on_connect
        self._c.on_message = self._on_message
        self._c.on_disconnect = self._on_disconnect
        self._c.on_subscribe = self._on_subscribe
        self.messages: queue.Queue[Message] = queue.Queue()
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._rc: int | None = None
        self.session_present: bool | None = None
        self._suback: dict[int, list[int]] = {}
        self._suback_cv = threading.Condition()
        self._kept: list[Message] = []

    # ---- paho callbacks ----------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:  # noqa: ANN001
        # paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map back.
        value = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        self._rc = _V5_TO_311.get(value, value)
        self.session_present = bool(getattr(flags, "session_present", False))
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:  # noqa: ANN001
        self._disconnected.set()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        self.messages.put(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:  # noqa: ANN001
        with self._suback_cv:
            self._suback[mid] = [rc.value if hasattr(rc, "value") else int(rc) for rc in reason_codes]
            self._suback_cv.notify_all()

    # ---- actions -------------------------------------------------------------
    def connect(self, host: str, port: int, *, username: str | None = None, password: str | None = None,
                keepalive: int = 60, will: tuple[str, bytes, int, bool] | None = None,
                timeout: float = DEFAULT_TIMEOUT, tls: dict[str, Any] | None = None) -> MqttClient:
        if username is not None:
            self._c.username_pw_set(username, password)
        if will is not None:
            self._c.will_set(will[0], will[1], will[2], will[3])
        if tls is not None:
            self._c.tls_set(**tls)
        self._connected.clear()
        self._disconnected.clear()
        self._c.connect(host, port, keepalive=keepalive)
        self._c.loop_start()
        if not self._connected.wait(timeout):
            self._c.loop_stop()
            raise TimeoutError(f"{self.client_id}: no CONNACK within {timeout}s")
        if self._rc != 0:
            self._c.loop_stop()
            raise ConnectFailed(self._rc or -1)
        return self

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = DEFAULT_TIMEOUT) -> list[int]:
        rc, mid = self._c.subscribe(topic_filter, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"subscribe failed: {rc}")
        deadline = time.monotonic() + timeout
        with self._suback_cv:
            while mid not in self._suback:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no SUBACK for {topic_filter}")
                self._suback_cv.wait(left)
            return self._suback.pop(mid)

    def unsubscribe(self, topic_filter: str) -> None:
        self._c.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 0, retain: bool = False,
                wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self._c.publish(topic, payload, qos=qos, retain=retain)
        if wait and qos > 0:
            info.wait_for_publish(timeout)

    def disconnect(self) -> None:
        self._c.disconnect()
        self._disconnected.wait(DEFAULT_TIMEOUT)
        self._c.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (the socket is closed under paho)."""
        self._c.loop_stop()
        sock = self._c.socket()
        if sock is not None:
            sock.close()

    def wait_disconnected(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        return self._disconnected.wait(timeout)

    @property
    def paho(self) -> mqtt.Client:
        return self._c

    # ---- waiting -------------------------------------------------------------
    def wait_message(self, topic_filter: str = "#", timeout: float = DEFAULT_TIMEOUT) -> Message:
        for i, m in enumerate(self._kept):
            if _filter_matches(topic_filter, m.topic):
                return self._kept.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.client_id}: no message on {topic_filter} within {timeout}s")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if _filter_matches(topic_filter, m.topic):
                return m
            self._kept.append(m)

    def no_message(self, topic_filter: str = "#", wait: float = 0.5) -> bool:
        try:
            self.wait_message(topic_filter, timeout=wait)
        except TimeoutError:
            return True
        return False


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ImClient(MqttClient):
    """A principal's client speaking PROTOCOL.md: requests, responses, inbox events."""

    _ids = itertools.count(1)

    def __init__(self, principal: str, label: str | None = "test", *, clean_session: bool = True) -> None:
        super().__init__(f"{principal}.{label}" if label else principal, clean_session=clean_session)
        self.principal = principal
        self.events: list[dict[str, Any]] = []

    def open(self, broker: RoostProcess, password: str, *, subscribe_inbox: bool = True,
             keepalive: int = 60) -> ImClient:
        self.connect(broker.host, broker.port, username=self.principal, password=password, keepalive=keepalive)
        self.subscribe(f"roost/resp/{self.client_id}", 1)
        if subscribe_inbox:
            self.subscribe(f"roost/inbox/{self.principal}", 1)
        return self

    def send_raw(self, payload: bytes | str) -> None:
        self.publish(f"roost/req/{self.client_id}", payload, qos=1)

    def request(self, op: str, timeout: float = DEFAULT_TIMEOUT, **params: Any) -> dict[str, Any]:
        rid = f"r{next(self._ids)}"
        self.publish(f"roost/req/{self.client_id}", {"id": rid, "op": op, **params}, qos=1)
        return self.wait_response(rid, timeout)

    def wait_response(self, rid: str | None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.wait_message(f"roost/resp/{self.client_id}", max(0.01, deadline - time.monotonic()))
            doc = m.json()
            if doc.get("id") == rid:
                return doc

    def call(self, op: str, timeout: float = DEFAULT_TIMEOUT, **params: Any) -> dict[str, Any]:
        doc = self.request(op, timeout, **params)
        if not doc.get("ok"):
            raise RequestFailed(doc["error"]["code"], doc["error"]["message"])
        return doc["result"]

    def _drain_inbox(self, timeout: float) -> dict[str, Any] | None:
        try:
            m = self.wait_message(f"roost/inbox/{self.principal}", timeout)
        except TimeoutError:
            return None
        ev = m.json()
        self.events.append(ev)
        return ev

    def wait_event(self, kind: str | None = None, timeout: float = DEFAULT_TIMEOUT, **match: Any) -> dict[str, Any]:
        """The next inbox event (already received or arriving) of `kind` whose fields equal `match`."""
        def fits(ev: dict[str, Any]) -> bool:
            return (kind is None or ev.get("kind") == kind) and all(ev.get(k) == v for k, v in match.items())

        for ev in self.events:
            if fits(ev) and not ev.get("_seen"):
                ev["_seen"] = True
                return ev
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ev = self._drain_inbox(left)
            if ev is not None and fits(ev):
                ev["_seen"] = True
                return ev
        raise TimeoutError(f"{self.client_id}: no {kind or 'event'} {match} within {timeout}s")


def eventually_ok(client: ImClient, op: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
    """Repeat a request (safe to repeat) until it is answered ok."""
    deadline = time.monotonic() + timeout
    while True:
        doc = client.request(op, **params)
        if doc["ok"]:
            return doc["result"]
        assert doc["error"]["code"] in ("unavailable", "rate_limited"), doc   # both: retry later
        if time.monotonic() > deadline:
            raise AssertionError(f"{op} still answered {doc['error']} after {timeout}s")
