"""MQTT 3.1.1 conformance and plugin-hook behaviour of RoostBroker's engine,
over real TCP with paho (and raw sockets where paho is too polite)."""

from __future__ import annotations

import socket
import time

import pytest

from broker.mqtt import codec
from tests import test_mqtt_helpers as H
from tests.test_mqtt_helpers import HELPERS, Client, InProcRoost, RawClient


def wait_for(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture(scope="module")
def b():
    broker = InProcRoost().start()
    yield broker
    broker.stop()


@pytest.fixture
def fresh():
    started = []

    def start(config: dict | None = None, plugins: dict | None = None, db_path=None) -> InProcRoost:
        x = InProcRoost(config=config or {}, plugins=plugins, db_path=db_path).start()
        started.append(x)
        return x

    yield start
    for x in started:
        x.stop()


# ---- QoS ------------------------------------------------------------------------

def test_qos_0_1_2_both_directions(b):
    sub = Client(b.port, "qos-sub")
    assert sub.sub("qos/t", 2) == [2]
    pub = Client(b.port, "qos-pub")
    for q in (0, 1, 2):
        pub.pub("qos/t", f"q{q}".encode(), qos=q)
        m = sub.get()
        assert (m.payload, m.qos, m.retain) == (f"q{q}".encode(), q, False)


def test_incoming_qos2_duplicate_is_delivered_once(b):
    sub = Client(b.port, "dup2-sub")
    sub.sub("dup2/t", 2)
    raw = RawClient(b.port)
    raw.connect("dup2-raw")
    t = b"dup2/t"
    body = len(t).to_bytes(2, "big") + t + (7).to_bytes(2, "big") + b"once"
    raw.send(bytes((0x34, len(body))) + body)
    assert raw.read() == (5, 0, b"\x00\x07")          # PUBREC
    raw.send(bytes((0x3C, len(body))) + body)          # the same again, DUP=1, before PUBREL
    assert raw.read() == (5, 0, b"\x00\x07")
    raw.send(b"\x62\x02\x00\x07")                      # PUBREL
    assert raw.read() == (7, 0, b"\x00\x07")           # PUBCOMP
    assert sub.get().payload == b"once"
    sub.none(0.5)
    # after PUBREL the packet id is free again: a new message with it is delivered
    raw.send(bytes((0x34, len(body))) + body)
    assert raw.read() == (5, 0, b"\x00\x07")
    assert sub.get().payload == b"once"
    raw.close()


def test_outgoing_qos2_flow(b):
    sub = RawClient(b.port)
    sub.connect("q2out")
    sub.subscribe("q2out/t", 2)
    pub = Client(b.port, "q2out-pub")
    pub.pub("q2out/t", b"x", qos=2)
    topic, payload, qos, pid, dup, retain = sub.read_publish()
    assert (topic, payload, qos, dup, retain) == ("q2out/t", b"x", 2, False, False)
    sub.send(bytes((0x50, 2)) + pid.to_bytes(2, "big"))   # PUBREC
    assert sub.read() == (6, 2, pid.to_bytes(2, "big"))   # PUBREL
    sub.send(bytes((0x70, 2)) + pid.to_bytes(2, "big"))   # PUBCOMP
    sub.close()


def test_overlapping_subscriptions_delivered_once_at_max_qos(b):
    sub = Client(b.port, "ov-sub")
    sub.sub("ov/#", 1)
    sub.sub("ov/+", 2)
    sub.sub("ov/a", 0)
    pub = Client(b.port, "ov-pub")
    pub.pub("ov/a", b"x", qos=2)
    m = sub.get()
    assert (m.payload, m.qos) == (b"x", 2)
    sub.none(0.4)


def test_unsubscribe(b):
    sub = Client(b.port, "uns-sub")
    sub.sub("uns/t", 1)
    pub = Client(b.port, "uns-pub")
    pub.pub("uns/t", b"1", qos=1)
    assert sub.get().payload == b"1"
    sub.unsub("uns/t")
    pub.pub("uns/t", b"2", qos=1)
    sub.none(0.4)


# ---- retained -------------------------------------------------------------------

def test_retained_set_replay_and_clear(b):
    pub = Client(b.port, "ret-pub")
    pub.pub("ret/a", b"A", qos=1, retain=True)
    pub.pub("ret/b", b"B", qos=0, retain=True)
    s1 = Client(b.port, "ret-s1")
    s1.sub("ret/+", 1)
    got = sorted((m.topic, m.payload, m.qos, m.retain) for m in (s1.get(), s1.get()))
    assert got == [("ret/a", b"A", 1, True), ("ret/b", b"B", 0, True)]
    # a live subscriber gets later retained publishes with retain=0
    pub.pub("ret/a", b"A2", qos=1, retain=True)
    m = s1.get()
    assert (m.payload, m.retain) == (b"A2", False)
    assert b.broker.retained("ret/a") == b"A2"
    pub.pub("ret/a", b"", qos=1, retain=True)   # empty payload clears
    assert s1.get().payload == b""
    s2 = Client(b.port, "ret-s2")
    s2.sub("ret/a", 1)
    s2.none(0.4)
    assert b.broker.retained("ret/a") is None


def test_retained_survive_restart(fresh, tmp_path):
    db = tmp_path / "roost.db"
    x = fresh(db_path=db)
    pub = Client(x.port, "rs-pub")
    pub.pub("rs/keep", b"kept", qos=1, retain=True)
    pub.pub("rs/gone", b"gone", qos=1, retain=True)
    pub.pub("rs/gone", b"", qos=1, retain=True)
    pub.disconnect()
    x.stop()
    y = fresh(db_path=db)
    s = Client(y.port, "rs-sub")
    s.sub("rs/#", 1)
    m = s.get()
    assert (m.topic, m.payload, m.retain) == ("rs/keep", b"kept", True)
    s.none(0.4)


def test_acks_that_wait_for_a_commit_keep_the_publish_order(fresh, tmp_path):
    """A PUBACK that waits for the journal commit (a message kept for a persistent
    session) does not hold the publisher's next packets, and the acks still go out
    in the order of the publishes (MQTT-4.6.0-2): the ack of a publish kept for no
    one, which could go at once, waits behind the one before it."""
    x = fresh(db_path=tmp_path / "roost.db")
    away = Client(x.port, "ord-away", clean=False)
    away.sub("ord/kept", 1)
    away.disconnect()          # its messages are kept in the store from now on
    raw = RawClient(x.port)
    raw.connect("ord-pub")
    topics = ["ord/kept", "ord/none", "ord/kept", "ord/none", "ord/none"]
    raw.send(b"".join(codec.encode_publish(t, b"m%d" % pid, 1, False, pid) for pid, t in enumerate(topics, 1)))
    acks = []
    for _ in topics:
        ptype, _flags, body = raw.read()
        assert ptype == codec.PUBACK
        acks.append(int.from_bytes(body[:2], "big"))
    assert acks == [1, 2, 3, 4, 5]
    raw.close()
    back = Client(x.port, "ord-away", clean=False)
    assert [back.get().payload for _ in range(2)] == [b"m1", b"m3"]
    back.disconnect()


# ---- $ topics, topic validation ---------------------------------------------------

def test_dollar_topics(b):
    hash_ = Client(b.port, "dl-hash")
    hash_.sub("#", 0)
    hash_.drain(0.3)  # retained messages of other tests
    plus = Client(b.port, "dl-plus")
    plus.sub("+/info", 0)
    b.call(b.broker.publish("$SYS/info", b"up"))
    hash_.none(0.3)
    plus.none(0.1)
    # clients may not publish to $ topics
    p = Client(b.port, "dl-pub")
    p.pub("$SYS/info", b"fake", qos=1)
    hash_.none(0.3)
    for c in (hash_, plus, p):
        c.disconnect()


@pytest.mark.parametrize("topic_filter", ["$share/g", "$share//a"])
def test_malformed_shared_filters_are_refused(b, topic_filter):
    """Shared subscriptions are served (tests/test_mqtt5_shared.py); one without
    a group name or a filter is refused, not granted and silent."""
    c = Client(b.port, "unserved")
    assert c.sub(topic_filter, 1) == [0x80]
    assert c.sub("served/x", 1) == [1]
    c.disconnect()


@pytest.mark.parametrize("topic", ["bad/+", "bad/#", ""])
def test_publish_to_invalid_topic_disconnects(b, topic):
    raw = RawClient(b.port)
    raw.connect(f"inv-{len(topic)}-{topic[-1:]}")
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + b"x"
    raw.send(bytes((0x30, len(body))) + body)
    assert raw.closed()


@pytest.mark.parametrize("f", ["a/#/b", "a/b#", "a+/b", ""])
def test_subscribe_to_invalid_filter_disconnects(b, f):
    raw = RawClient(b.port)
    raw.connect("invf")
    t = f.encode()
    body = b"\x00\x01" + len(t).to_bytes(2, "big") + t + b"\x00"
    raw.send(bytes((0x82, len(body))) + body)
    assert raw.closed()


# ---- CONNECT rules ----------------------------------------------------------------

def test_zero_length_client_id(b):
    raw = RawClient(b.port)
    assert raw.connect("", clean=True) == b"\x00\x00"
    raw.send(b"\xc0\x00")
    assert raw.read() == (13, 0, b"")
    raw.close()
    raw = RawClient(b.port)
    assert raw.connect("", clean=False) == b"\x00\x02"
    assert raw.closed()


@pytest.mark.parametrize("name,level", [("MQTT", 3), ("MQTT", 6), ("MQIsdp", 4)])
def test_unsupported_protocol_level_gets_connack_1(b, name, level):
    raw = RawClient(b.port)
    assert raw.connect("lvl", level=level, name=name) == b"\x00\x01"
    assert raw.closed()


def test_first_packet_must_be_connect(b):
    raw = RawClient(b.port)
    raw.send(b"\xc0\x00")  # PINGREQ
    assert raw.closed()


def test_second_connect_closes(b):
    raw = RawClient(b.port)
    raw.connect("twice")
    raw.send(codec.encode_connect("twice", username="u", password="p"))
    assert raw.closed()


def test_garbage_closes_only_that_connection(b):
    good = Client(b.port, "gb-good")
    good.sub("gb/t", 0)
    raw = RawClient(b.port)
    raw.connect("gb-bad")
    raw.send(b"\xff\xff\xff\xff\xff\x01")
    assert raw.closed()
    Client(b.port, "gb-pub").pub("gb/t", b"fine", qos=1)
    assert good.get().payload == b"fine"


def test_wrong_password_gets_connack_4_and_changes_nothing(b):
    bad = Client(b.port, "wp", password="wrong", connect=False)
    assert bad.connect(expect=None) == 4
    assert "u|wp" not in b.broker.engine.sessions


# ---- ACL --------------------------------------------------------------------------

def _acl_checks(port: int) -> None:
    boss = Client(port, "acl-boss", username="boss")
    assert boss.sub("secret/#", 1) == [1]
    boss.pub("secret/r", b"retained secret", qos=1, retain=True)
    assert boss.get().payload == b"retained secret"
    peon = Client(port, "acl-peon", username="peon")
    assert peon.sub("secret/x", 1) == [0x80]
    assert peon.sub("#", 1) == [1]          # allowed, but secret topics are filtered per message
    boss.pub("secret/t", b"hidden", qos=1)
    boss.pub("open/t", b"visible", qos=1)
    got = peon.drain(0.6)
    assert [m.payload for m in got if m.topic.startswith(("secret", "open"))] == [b"visible"]
    # publishing to ro/... is denied: nobody receives it, the publisher stays connected
    peon.pub("ro/x", b"nope", qos=1)
    assert not [m for m in peon.drain(0.4) if m.topic == "ro/x"]
    assert not peon.disconnected.is_set()
    boss.pub("secret/r", b"", qos=1, retain=True)
    for c in (boss, peon):
        c.disconnect()


def test_acl_sync_check_fast_path(b):
    _acl_checks(b.port)


def test_acl_async_topic_filtering_path(fresh):
    x = fresh(plugins={f"{HELPERS}.AllowAuth": {}, f"{HELPERS}.AsyncDenyAcl": {}})
    assert x.broker.engine.acl_async
    _acl_checks(x.port)


def test_refresh_acl_drops_cached_decisions(b):
    sub = Client(b.port, "ra-sub", username="ra")
    sub.sub("ra/#", 0)
    pub = Client(b.port, "ra-pub")
    pub.pub("ra/t", b"1", qos=1)
    assert sub.get().payload == b"1"
    st = b.broker.engine.sessions["ra|ra-sub"]
    assert st.acl_cache  # the RECEIVE decision was cached
    b.sync(b.broker.refresh_acl)
    assert not st.acl_cache


# ---- limits -------------------------------------------------------------------------

def test_max_payload_disconnects(fresh):
    x = fresh({"limits": {"max_payload": 100}})
    sub = Client(x.port, "mp-sub")
    sub.sub("mp/t", 0)
    c = Client(x.port, "mp")
    c.pub("mp/t", b"x" * 100, qos=0)
    assert sub.get().payload == b"x" * 100
    c.pub("mp/t", b"x" * 101, qos=0, wait=False)
    assert c.disconnected.wait(3)
    sub.none(0.3)


def test_max_connections(fresh):
    x = fresh({"limits": {"max_connections": 2}})
    a, c = Client(x.port, "mc1"), Client(x.port, "mc2")
    third = Client(x.port, "mc3", connect=False)
    assert third.connect(expect=None) == 3
    a.disconnect()
    time.sleep(0.2)
    assert Client(x.port, "mc4").connect  # a slot is free again
    c.disconnect()


def test_listener_max_connections(fresh):
    x = fresh({"listeners": {"default": {"bind": "127.0.0.1:0", "max_connections": 1}}})
    Client(x.port, "lm1")
    second = Client(x.port, "lm2", connect=False)
    assert second.connect(expect=None) == 3


def test_max_inflight_window(fresh):
    x = fresh({"limits": {"max_inflight": 2}})
    raw = RawClient(x.port)
    raw.connect("win")
    raw.subscribe("win/t", 1)
    pub = Client(x.port, "win-pub")
    for i in range(5):
        pub.pub("win/t", str(i).encode(), qos=1)
    first = [raw.read_publish() for _ in range(2)]
    assert [m[1] for m in first] == [b"0", b"1"]
    raw.s.settimeout(0.5)
    with pytest.raises((TimeoutError, socket.timeout)):
        raw.read()
    raw.s.settimeout(3)
    raw.send(bytes((0x40, 2)) + first[0][3].to_bytes(2, "big"))   # PUBACK the first
    assert raw.read_publish()[1] == b"2"
    raw.close()


def test_max_subscriptions(fresh):
    x = fresh({"limits": {"max_subscriptions": 2}})
    c = Client(x.port, "ms")
    assert c.sub("ms/1", 0) == [0]
    assert c.sub("ms/2", 1) == [1]
    assert c.sub("ms/3", 1) == [0x80]
    assert c.sub("ms/1", 1) == [1]   # replacing an existing one is fine


def test_online_queue_bounded_when_client_does_not_ack(fresh):
    x = fresh({"limits": {"max_inflight": 1, "max_queued": 3}})
    raw = RawClient(x.port)
    raw.connect("oq")
    raw.subscribe("oq/t", 1)
    pub = Client(x.port, "oq-pub")
    for i in range(10):
        pub.pub("oq/t", str(i).encode(), qos=1)
    st = x.broker.engine.sessions["u|oq"]
    time.sleep(0.3)
    assert (len(st.inflight), len(st.queue), st.dropped) == (1, 3, 6)
    assert x.broker.engine.stats["dropped"] == 6
    raw.close()


# ---- sessions, wills, keepalive -----------------------------------------------------

def test_persistent_session_resumes_subscriptions_and_queue(b):
    s = Client(b.port, "ps", clean=False)
    s.sub("ps/t", 2)
    s.disconnect()
    pub = Client(b.port, "ps-pub")
    pub.pub("ps/t", b"q1", qos=1)
    pub.pub("ps/t", b"q2", qos=2)
    pub.pub("ps/t", b"q0", qos=0)   # QoS 0 is not queued for offline clients
    pub.pub("ps/sync", b"", qos=1)  # acked after q0 was routed (one connection, in order)
    back = Client(b.port, "ps", clean=False)
    got = back.drain(0.6)
    assert [(m.payload, m.qos, m.retain) for m in got] == [(b"q1", 1, False), (b"q2", 2, False)]
    pub.pub("ps/t", b"live", qos=1)
    assert back.get().payload == b"live"
    back.disconnect()
    # clean=1 discards it
    Client(b.port, "ps", clean=True).disconnect()
    assert wait_for(lambda: "u|ps" not in b.broker.engine.sessions)


def test_will_on_connection_loss_not_after_disconnect(b):
    w = Client(b.port, "will-watch")
    w.sub("will/#", 1)
    lost = Client(b.port, "will-lost", will=("will/lost", b"bye", 1, True))
    lost.drop()
    m = w.get()
    assert (m.topic, m.payload) == ("will/lost", b"bye")
    assert b.broker.retained("will/lost") == b"bye"
    polite = Client(b.port, "will-polite", will=("will/polite", b"bye", 1, False))
    polite.disconnect()
    w.none(0.5)
    Client(b.port, "will-clear").pub("will/lost", b"", qos=1, retain=True)


def test_keepalive_zero_means_no_timeout(b):
    raw = RawClient(b.port)
    raw.connect("ka0", keep_alive=0)
    assert not raw.closed(2.0)
    raw.close()


def test_session_expiry(b):
    s = Client(b.port, "exp", clean=False)
    s.sub("exp/t", 1)
    s.disconnect()
    eng = b.broker.engine
    assert "u|exp" in eng.sessions
    assert b.sync(eng.expire_sessions, time.time() + 6 * 86400) == 0
    assert b.sync(eng.expire_sessions, time.time() + 8 * 86400) >= 1
    assert "u|exp" not in eng.sessions


# ---- plugin hooks -------------------------------------------------------------------

def _events(cid_prefix: str) -> list[tuple]:
    return [e for e in H.EVENTS if len(e) > 1 and str(e[1]).startswith(cid_prefix)]


def test_lifecycle_hooks_in_order_with_take_over(b):
    one = Client(b.port, "hk", clean=False)
    one.sub("hk/t", 1)
    two = Client(b.port, "hk", clean=False)
    assert one.disconnected.wait(3)
    two.unsub("hk/t")
    two.disconnect()
    time.sleep(0.3)
    assert _events("hk") == [
        ("connected", "hk"), ("subscribed", "hk", "hk/t", 1),
        ("connected", "hk"), ("disconnected", "hk", "taken_over"),
        ("unsubscribed", "hk", "hk/t"), ("disconnected", "hk", "disconnect"),
    ]


def test_disconnect_reasons(b):
    lost = Client(b.port, "rsn-lost")
    lost.drop()
    raw = RawClient(b.port)
    raw.connect("rsn-ka", keep_alive=1)
    assert raw.closed(4)
    time.sleep(0.3)
    assert ("disconnected", "rsn-lost", "lost") in H.EVENTS
    assert ("disconnected", "rsn-ka", "keepalive") in H.EVENTS


def test_refused_connect_calls_no_hooks(b):
    bad = Client(b.port, "nohook", password="wrong", connect=False)
    assert bad.connect(expect=None) == 4
    time.sleep(0.2)
    assert _events("nohook") == []


def test_interception(b):
    sub = Client(b.port, "ic-sub")
    sub.sub("icpt/#", 1)
    pub = Client(b.port, "ic-pub")
    pub.pub("icpt/eat", b"consumed", qos=1)
    pub.pub("icpt/pass", b"routed", qos=1)
    assert sub.get().payload == b"routed"
    sub.none(0.3)
    assert ("publish", "ic-pub", "icpt/eat", b"consumed") in H.EVENTS


def test_no_auth_plugin_refuses_everyone(fresh):
    x = fresh(plugins={})
    c = Client(x.port, "noauth", connect=False)
    assert c.connect(expect=None) == 5


# ---- BrokerApi ------------------------------------------------------------------------

def test_broker_api(b):
    api = b.broker
    a = Client(b.port, "apiuser.a", username="apiuser")
    a.sub("api/#", 1)
    c = Client(b.port, "apiuser.c", username="apiuser")
    assert sorted(api.client_ids_of("apiuser")) == ["apiuser.a", "apiuser.c"]
    assert b.call(api.publish("api/x", b"pub", 1, True)) == 1
    assert a.get().payload == b"pub"
    assert api.retained("api/x") == b"pub"
    assert b.call(api.deliver("apiuser.a", "api/only-a", b"d", 2)) is True
    m = a.get()
    assert (m.topic, m.payload, m.qos) == ("api/only-a", b"d", 1)   # min(2, granted 1)
    assert b.call(api.deliver("apiuser.c", "api/only-a", b"d", 1)) is False   # no matching subscription
    assert b.call(api.deliver("nobody", "api/x", b"d", 1)) is False
    assert b.call(api.deliver("apiuser.a", "secret/x", b"d", 1)) is False     # ACL RECEIVE
    # What a session's filters grant a topic is remembered per session until they change
    c.sub("api/only-a", 2)
    assert b.call(api.deliver("apiuser.c", "api/only-a", b"d2", 2)) is True
    m = c.get()
    assert (m.topic, m.payload, m.qos) == ("api/only-a", b"d2", 2)
    a.unsub("api/#")
    assert b.call(api.deliver("apiuser.a", "api/only-a", b"d3", 1)) is False
    a.sub("api/only-a", 0)
    assert b.call(api.deliver("apiuser.a", "api/only-a", b"d4", 1)) is True
    m = a.get()
    assert (m.topic, m.payload, m.qos) == ("api/only-a", b"d4", 0)
    with pytest.raises(ValueError):
        b.call(api.publish("api/+", b"bad"))
    assert b.call(api.kick_principal("apiuser")) == 2
    assert a.disconnected.wait(3) and c.disconnected.wait(3)
    time.sleep(0.2)
    assert api.client_ids_of("apiuser") == []
    b.call(api.publish("api/x", b"", 1, True))


def test_amqtt_context_broadcast_routes_through_engine(b):
    s = Client(b.port, "ctx-sub")
    s.sub("ctx/t", 0)
    plugin = b.broker.plugins_manager.plugins[0]
    b.call(plugin.context.broadcast_message("ctx/t", b"via context"))
    assert s.get().payload == b"via context"
    assert plugin.context._broker is b.broker
    assert "ctx-sub" in b.broker.sessions


def test_subscriber_that_never_reads_does_not_stall_others(fresh):
    x = fresh({"limits": {"max_queued": 300}})
    stalled = RawClient(x.port)
    stalled.connect("stalled")
    stalled.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.subscribe("fl/t", 0)   # and never reads again
    ok = Client(x.port, "fl-ok")
    ok.sub("fl/t", 0)
    pub = Client(x.port, "fl-pub")
    payload = b"y" * 10000
    for _ in range(2000):   # 20 MB: more than the kernel buffers hold
        pub.pub("fl/t", payload, qos=1)   # paced by PUBACKs, so the reading subscriber keeps up
    pub.pub("fl/t", b"last", qos=1)
    got = 0
    while True:
        m = ok.get(5)
        if m.payload == b"last":
            break
        got += 1
    assert got == 2000
    st = x.broker.engine.sessions["u|stalled"]
    assert len(st.queue) <= 300 and st.dropped > 0
    assert x.broker.engine.sessions["u|fl-ok"].dropped == 0
    stalled.close()


def test_backpressure_holds_publishers_instead_of_dropping(fresh):
    """Publishers faster than a (live, acknowledging) subscriber are paused, not dropped."""
    x = fresh({"limits": {"max_queued": 100, "max_inflight": 10}})
    sub = RawClient(x.port)
    sub.connect("bp-sub")
    sub.subscribe("bp/#", 1)
    pubs = []
    n = 1500
    for k in range(2):
        p = RawClient(x.port)
        p.connect(f"bp-pub{k}")
        # everything at once, pipelined: far more than the subscriber's queue
        p.send(b"".join(codec.encode_publish(f"bp/{k}", str(i).encode(), 1, False, i % 65535 + 1)
                        for i in range(n)))
        pubs.append(p)
    seen: dict[str, list[int]] = {"bp/0": [], "bp/1": []}
    for _ in range(2 * n):
        topic, payload, qos, pid, dup, retain = sub.read_publish()
        seen[topic].append(int(payload))
        sub.send(bytes((0x40, 2)) + pid.to_bytes(2, "big"))
    assert seen == {"bp/0": list(range(n)), "bp/1": list(range(n))}
    assert x.broker.engine.sessions["u|bp-sub"].dropped == 0
    for p in pubs:
        p.close()
    sub.close()


def test_plain_amqtt_plugins_still_work(fresh):
    """amqtt's own anonymous auth, taboo-topic ACL (awaited topic_filtering) and event logger."""
    x = fresh(plugins={"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                       "amqtt.plugins.topic_checking.TopicTabooPlugin": {},
                       "amqtt.plugins.logging_amqtt.EventLoggerPlugin": {}})
    c = Client(x.port, "plain", username=None, password=None)
    assert c.sub("prohibited", 0) == [0x80]
    assert c.sub("fine/#", 1) == [1]
    c.pub("fine/t", b"ok", qos=1)
    assert c.get().payload == b"ok"
    admin = Client(x.port, "plain-admin", username="admin", password="x")
    assert admin.sub("prohibited", 0) == [0]
    c.disconnect()
    admin.disconnect()


def test_unacked_message_is_not_forgotten_after_5_seconds(b):
    sub = RawClient(b.port)
    sub.connect("slowack", clean=False)
    sub.subscribe("slowack/t", 1)
    Client(b.port, "slowack-pub").pub("slowack/t", b"keep me", qos=1)
    topic, payload, qos, pid, dup, retain = sub.read_publish()
    assert (payload, dup) == (b"keep me", False)
    time.sleep(5.5)
    assert len(b.broker.engine.sessions["u|slowack"].inflight) == 1
    sub.close()
    again = RawClient(b.port)
    assert again.connect("slowack", clean=False) == b"\x01\x00"   # session present
    topic, payload, qos, pid2, dup, retain = again.read_publish()
    assert (payload, dup, pid2) == (b"keep me", True, pid)
    again.send(bytes((0x40, 2)) + pid2.to_bytes(2, "big"))
    time.sleep(0.2)
    assert not b.broker.engine.sessions["u|slowack"].inflight
    again.send(b"\xe0\x00")   # DISCONNECT
    again.close()


def test_deep_wildcard_filter_refused_exact_accepted(b):
    c = Client(b.port, "deep")
    assert c.sub("/".join(["a"] * 80) + "/#", 0) == [0x80]
    assert c.sub("/".join(["a"] * 80), 0) == [0]
    assert c.sub("/".join(["a"] * 10) + "/+", 0) == [0]
    c.disconnect()


def test_retained_topic_count_is_bounded(fresh, monkeypatch):
    from broker.mqtt import retained

    monkeypatch.setattr(retained, "MAX_RETAINED", 3)
    x = fresh()
    p = Client(x.port, "rb-pub")
    for i in range(5):
        p.pub(f"rb/{i}", b"v", qos=1, retain=True)
    p.pub("rb/0", b"updated", qos=1, retain=True)   # an existing topic may still change
    assert sorted(x.broker.engine.retained) == ["rb/0", "rb/1", "rb/2"]
    assert x.broker.retained("rb/0") == b"updated"
    assert x.broker.engine.stats["retained_refused"] == 2


@pytest.mark.parametrize("packet", [
    b"\xe1\x00",        # DISCONNECT with reserved flags
    b"\xe0\x01\x00",    # DISCONNECT with a body
    b"\xc1\x00",        # PINGREQ with reserved flags
    b"\xc0\x01\x00",    # PINGREQ with a body
    b"\x41\x02\x00\x01",  # PUBACK with reserved flags
    b"\x38\x05\x00\x01t\x00\x00",  # QoS 0 PUBLISH with DUP set
])
def test_malformed_packets_close_the_connection_and_publish_the_will(b, packet):
    w = Client(b.port, "bad-watch")
    w.sub("will/bad", 1)
    raw = RawClient(b.port)
    raw.connect("bad-flags", will=("will/bad", b"gone", 1, False))
    raw.send(packet)
    assert raw.closed(3.0)
    m = w.get()
    assert (m.topic, m.payload) == ("will/bad", b"gone")     # a protocol error, not a DISCONNECT


# ---- codec: typed packets -------------------------------------------------------------

def test_codec_decodes_typed_packets():
    raw = codec.encode_connect("tp", clean=False, keep_alive=30, username="u", password="p",
                               will=("w/t", b"bye", 1, True))
    connect = codec.decode_connect(raw[0] & 0x0F, raw[2:])
    assert connect == codec.Connect("tp", False, 30, "u", "p", codec.Will("w/t", b"bye", 1, True), b"p")
    raw = codec.encode_publish("a/b", b"x", 1, True, 7, dup=True)
    assert codec.decode_publish(raw[0] & 0x0F, raw[2:]) == codec.Publish("a/b", 1, 7, True, True, b"x")
    assert codec.decode_publish(0, codec.encode_publish("q0", b"", 0, False)[2:]) == codec.Publish(
        "q0", 0, 0, False, False, b"")   # QoS 0: packet id 0
    assert codec.decode_ack(codec.PUBREL, 0x02, b"\x00\x09") == codec.Ack(9)
    with pytest.raises(codec.ProtocolViolation):
        codec.decode_ack(codec.PUBREL, 0, b"\x00\x09")
    with pytest.raises(codec.ProtocolViolation):
        codec.decode_ack(codec.PUBACK, 0x02, b"\x00\x09")
    sub = codec.decode_subscribe(0x02, b"\x00\x05\x00\x03a/#\x01\x00\x01b\x02")
    assert sub == codec.Subscribe(5, (codec.Subscription("a/#", 1), codec.Subscription("b", 2)))
    assert codec.decode_unsubscribe(0x02, b"\x00\x06\x00\x01b") == codec.Unsubscribe(6, ("b",))
    assert codec.decode_pingreq(0, b"") is codec.PING
    assert codec.decode_disconnect(0, b"") is codec.DISCONNECTED


def test_publish_decisions_are_cached_with_the_session(b):
    from broker.mqtt import acl

    c = Client(b.port, "pc-pub", username="pc")
    c.pub("pc/t", b"1", qos=1)
    st = b.broker.engine.sessions["pc|pc-pub"]
    assert st.acl_cache["pc/t"] & acl.PUBLISH_ALLOWED
    b.sync(b.broker.refresh_acl)
    assert not st.acl_cache
    c.disconnect()
