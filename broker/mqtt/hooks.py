"""What the MQTT engine offers to plugins, and what it calls on them.

This file is the contract between the transport layer (engine + RoostBroker) and
the plugins. Plugins are ordinary amqtt plugins (`amqtt.plugins.base.BasePlugin`
subclasses listed under `plugins:` in the amqtt config the RoostBroker builds);
the engine looks for the optional methods below on each loaded plugin and calls
them, awaited and in order, for one connection at a time.

Engine -> plugin calls (all optional; found with getattr at broker start):

* Authentication: for each `BaseAuthPlugin`, `await plugin.authenticate(session=s)`
  (amqtt's own signature). Return True to accept, False to refuse with CONNACK 4
  (bad user name or password), None for "no opinion". To refuse with another
  code raise `ConnectRefused(code)`. At least one True and no False is needed.
  The plugin sets `s.principal` (and `s.kind`) on success.

* Access control: for each `BaseTopicPlugin`, if it has a *synchronous*
  `check(session, topic, action) -> bool`, the engine uses it (fast path, called
  on every publish, subscribe and delivery); otherwise it awaits amqtt's
  `topic_filtering(session=, topic=, action=)`. `action` is amqtt's `Action`
  (PUBLISH, SUBSCRIBE, RECEIVE). For SUBSCRIBE, `topic` is the filter; a False
  gives SUBACK 0x80 for that filter. For RECEIVE it is called per target session
  (retained messages included) and a False skips that session silently.

* Interception: a plugin with `publish_prefixes: tuple[str, ...]` and
  `async def on_client_publish(session, topic, payload, qos, retain) -> bool`
  is called for publishes (already allowed by ACL) whose topic starts with one of
  the prefixes. Returning True consumes the message (it is not routed to
  subscribers nor retained); False lets it continue. It must not block: queue
  work and return.
  For an MQTT 5 publish, `session.publish_properties` holds during the call its
  `properties.MsgProps` (`response_topic`, `correlation_data`; None for 3.1.1):
  plugins/im.py answers a request on its Response Topic.
  An interceptor consuming an MQTT 5 QoS 1/2 publish it refuses may set
  `session.publish_refused` to a PUBACK reason code (>= 0x80) during the call: the
  engine acks with it (a 3.1.1 client still gets a plain ack).
  Optionally also a synchronous `on_client_publish_nowait(...)` with the same
  arguments and meaning: the engine calls it instead of on_client_publish for a
  non-retained publish, and when every interceptor matching one has it, inside
  data_received (no task per message).

* Lifecycle (awaited, in the order things happened for that client id):
    async on_client_connected(session)                         after CONNACK 0
    async on_client_disconnected(session, reason: str)         reason in DisconnectReason
    async on_client_subscribed(session, topic_filter, qos)     after SUBACK, before retained replay
    async on_client_unsubscribed(session, topic_filter)
  A take-over (same client id connects again) calls on_client_disconnected with
  reason "taken_over" for the old connection *after* on_client_connected for the
  new one, so a presence count never drops to zero in between.

* Counting (synchronous, not awaited; called at the very moment of the change, so
  across all connections they come in the order things happened):
    on_client_online(session)                 as CONNACK 0 is written
    on_client_offline(session, reason: str)   as the broker closes the connection or
                                              learns it was lost; session.last_activity
                                              is when its last packet arrived
  On a take-over the new connection's on_client_online comes before the old one's
  on_client_offline. The awaited hooks above may run later (after a plugin's
  awaits, after the will), so count connections with these, not those.

* Start/stop: async on_roost_start(broker) once listeners are up, and
  async on_roost_stop() before they close; amqtt's own `close()` is called too.

Plugin -> engine calls: `RoostBroker` (plugin.context._broker, or the helper
`plugins.base.broker_of(plugin)`) implements `BrokerApi` below.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class DisconnectReason(StrEnum):
    DISCONNECT = "disconnect"      # client sent DISCONNECT
    LOST = "lost"                  # connection dropped without DISCONNECT
    KEEPALIVE = "keepalive"        # nothing received for 1.5 x keepalive
    TAKEN_OVER = "taken_over"      # same client id connected again
    KICKED = "kicked"              # broker closed it (principal removed, protocol error)
    # (an MQTT 5 client is sent DISCONNECT 0x8E taken over, 0x8B shutdown, 0x8D keepalive,
    # 0x98 kicked, or the protocol violation's own reason code: connection.py)
    SHUTDOWN = "shutdown"          # broker stopping


class NotAcknowledged(Exception):
    """What a client's publish needed before its PUBACK/PUBREC cannot be had (the
    store refused its journal, the cluster node it went to died without it): the
    engine closes the connection without the ack, so the client sends it again.
    The message says why, in one line."""


class ConnectRefused(Exception):
    """Raised by an auth plugin to refuse a CONNECT with a specific return code."""

    UNACCEPTABLE_PROTOCOL = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_CREDENTIALS = 4
    NOT_AUTHORIZED = 5

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(reason or f"connect refused ({code})")
        self.code = code
        self.reason = reason


class ClientSession(Protocol):
    """What plugins may read on the session object the engine passes them.

    Attribute names follow amqtt's `Session` where they exist, so amqtt-style
    plugins keep working.
    """

    client_id: str
    username: str | None
    password: str | None          # cleared after authentication
    remote_address: str
    remote_port: int
    clean_session: bool
    keep_alive: int
    listener_name: str
    is_anonymous: bool
    principal: str | None         # set by the auth plugin
    kind: str | None              # principal kind: user/device/service
    connected_at: float
    # Also present (broker/mqtt/session.py ClientInfo): client_id_generated (the
    # client sent an empty id; the broker made "<username>.auto-<hex>" or
    # "auto-<hex>"), will_flag/will_topic/will_message/will_qos/will_retain, and
    # attributes: dict for plugin-owned data (amqtt's Session.attributes).


class BrokerApi(Protocol):
    """Calls plugins make on the broker. All are safe to call from the event loop."""

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Route like a client publish from the broker itself (ACL RECEIVE applies per
        subscriber; retain stores/clears the retained message, persisted). Returns
        the number of sessions it was queued for."""

    async def deliver(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Queue a message for one session only, if that session exists and has a
        subscription matching `topic` (ACL RECEIVE applies). `client_id` names the
        session: a client id of its principal's own form (`alice`, `alice.phone`),
        else `<principal>|<client id>` (sessions are keyed by principal and client id). Waits while that
        session's outgoing queue is full (backpressure). False if not delivered.
        (Engine: waits at most 10 s; an offline persistent session queues QoS >= 1
        up to limits.max_queued and True is returned; delivered QoS is
        min(qos, granted QoS).)"""

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool | None:
        """(Optional) deliver() without waiting: True/False as deliver() would answer,
        None when deliver() would have to wait (full queue, async ACL undecided)."""

    def retained(self, topic: str) -> bytes | None:
        """The retained payload on an exact topic, if any."""

    def client_ids_of(self, principal: str) -> list[str]:
        """Connected client ids whose principal is `principal`."""

    async def kick_principal(self, principal: str) -> int:
        """Disconnect every live connection of a principal (e.g. it was removed);
        their persistent sessions are discarded. Returns how many were closed."""

    def refresh_acl(self) -> None:
        """Drop cached ACL decisions (call after contacts/ownership change)."""
