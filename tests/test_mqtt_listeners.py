"""TLS and WebSocket listeners (self-signed certificate made in the test), and
the whole `roost serve` process with the real auth/ACL plugins."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from tests.test_mqtt_helpers import Client, InProcRoost


def make_cert(tmp_path):
    """A self-signed certificate for localhost/127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make a test certificate (apt-get install openssl)")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(keyfile), "-out", str(certfile)],
                   check=True, capture_output=True)
    return certfile, keyfile


@pytest.fixture
def multi(tmp_path):
    certfile, keyfile = make_cert(tmp_path)
    tls = {"ssl": True, "certfile": certfile.name, "keyfile": keyfile.name}
    b = InProcRoost(config={"listeners": {
        "default": {"bind": "127.0.0.1:0"},
        "tls": {"bind": "127.0.0.1:0", **tls},
        "ws": {"type": "ws", "bind": "127.0.0.1:0"},
        "wss": {"type": "ws", "bind": "127.0.0.1:0", **tls},
    }}, db_path=tmp_path / "roost.db").start()   # relative cert paths resolve from the db's folder
    b.certfile = certfile
    yield b
    b.stop()


def _roundtrip(b, **kw) -> None:
    plain = Client(b.port, f"plain-{kw.get('transport', 'tcp')}-{bool(kw.get('tls'))}")
    plain.sub("lst/t", 1)
    other = Client(kw.pop("port"), f"other-{kw.get('transport', 'tcp')}-{bool(kw.get('tls'))}", **kw)
    assert other.sub("lst/back", 2) == [2]
    other.pub("lst/t", b"from other", qos=1)
    assert plain.get().payload == b"from other"
    plain.pub("lst/back", b"x" * 70000, qos=2)   # larger than one frame / TLS record
    m = other.get()
    assert (len(m.payload), m.qos) == (70000, 2)
    other.pub("lst/t", b"qos0", qos=0)
    assert plain.get().payload == b"qos0"
    other.disconnect()
    plain.disconnect()


def test_tls_listener(multi):
    assert set(multi.ports) == {"default", "tls", "ws", "wss"} and all(multi.ports.values())
    _roundtrip(multi, port=multi.ports["tls"], tls={"ca_certs": str(multi.certfile)})


def test_tls_refuses_untrusted_client(multi):
    c = Client(multi.ports["tls"], "untrusting", connect=False)
    c.c.tls_set()  # system CAs only: our self-signed certificate is not trusted
    with pytest.raises(ssl.SSLError):
        c.connect()


def test_websocket_listener(multi):
    _roundtrip(multi, port=multi.ports["ws"], transport="websockets", ws_path="/mqtt")


def test_secure_websocket_listener(multi):
    _roundtrip(multi, port=multi.ports["wss"], transport="websockets", tls={"ca_certs": str(multi.certfile)})


def test_websocket_keepalive_and_will(multi):
    w = Client(multi.port, "ws-watch")
    w.sub("wsw/#", 1)
    c = Client(multi.ports["ws"], "ws-will", transport="websockets", keepalive=1,
               will=("wsw/gone", b"bye", 1, False))
    c.c.loop_stop()   # silent from now on, socket still open
    m = w.get(5)
    assert (m.topic, m.payload) == ("wsw/gone", b"bye")


def test_roost_serve_with_real_plugins(roost):
    """The composition root (broker/app.py) with the lead's auth/ACL plugins."""
    pw = roost.add_user("alice", password="alice-pw")
    a = Client(roost.port, "alice.phone", username="alice", password=pw)
    assert a.sub("roost/resp/alice.phone", 1) == [1]
    bad = Client(roost.port, "alice.x", username="alice", password="nope", connect=False)
    assert bad.connect(expect=None) == 4
    intruder = Client(roost.port, "alice.y", username=None, password=None, connect=False)
    assert intruder.connect(expect=None) != 0
    # a zero-length client id (clean session) gets "<user>.auto-<hex>", which the binding accepts
    anon_id = Client(roost.port, "", username="alice", password=pw)
    assert anon_id.sub("roost/inbox/alice", 1) == [1]
    anon_id.disconnect()
    a.disconnect()


def test_websocket_serves_the_mqttv31_subprotocol(multi):
    """MQTT 3.1 clients (and older MQTT.js/Paho builds) offer `mqttv3.1`; Mosquitto serves it."""
    from websockets.sync.client import connect

    from broker.mqtt import codec

    with connect(f"ws://127.0.0.1:{multi.ports['ws']}/mqtt", subprotocols=["mqttv3.1"]) as ws:
        assert ws.subprotocol == "mqttv3.1"
        ws.send(codec.encode_connect("ws31", username="u", password="p"))
        assert ws.recv(timeout=5) == b"\x20\x02\x00\x00"


def test_a_failed_websocket_handshake_is_one_info_line(multi, caplog):
    import logging
    import socket
    import time

    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", multi.ports["ws"])) as s:
        s.sendall(b"not a websocket request\r\n\r\n")
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while not any("websocket handshake from" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the failed handshake was not logged"
        time.sleep(0.02)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]
