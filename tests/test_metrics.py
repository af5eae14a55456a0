"""Prometheus metrics, health and readiness on an http listener, and `roost
status` (issue 15, item 2): a real broker subprocess, real HTTP requests."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import ConfigError, config_from_dict
from broker.monitor import Monitor
from broker.services.opstats import Histogram, RequestStats
from tests.clients import ConnectFailed, ImClient, MqttClient
from tests.harness import RoostProcess, free_port
from tests.test_mqtt_listeners import make_cert


def with_http(extra: dict[str, Any] | None = None, **http: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"listeners": {"web": {"type": "http", "bind": f"127.0.0.1:{free_port()}", **http}}}
    cfg.update(extra or {})
    return cfg


def base_url(broker: RoostProcess, scheme: str = "http") -> str:
    return f"{scheme}://{broker.config['listeners']['web']['bind']}"


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(fn: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll `fn` until it returns something truthy (or raise after `timeout`)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (OSError, urllib.error.URLError) as exc:   # not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: still {last!r} after {timeout}s")


def scrape(broker: RoostProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus-client's own parser."""
    status, text = get(base_url(broker) + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(broker: RoostProcess, name: str, **labels: str) -> float | None:
    return scrape(broker).get((name, tuple(sorted(labels.items()))))


def connect(broker: RoostProcess, client_id: str, username: str, password: str) -> MqttClient:
    return MqttClient(client_id).connect(broker.host, broker.port, username=username, password=password)


@pytest.fixture
def web(roost_factory) -> RoostProcess:
    broker = roost_factory(with_http())
    wait_for(lambda: get(base_url(broker) + "/healthz")[0] == 200, "healthz")
    return broker


def test_health_and_readiness(web):
    assert get(base_url(web) + "/healthz") == (200, "ok\n")
    assert wait_for(lambda: get(base_url(web) + "/readyz")[0] == 200, "readyz")
    assert get(base_url(web) + "/nosuch")[0] == 404


def test_metrics_follow_the_traffic(web):
    apw = web.add_user("alice")
    bpw = web.add_user("bob")
    bob = connect(web, "bob", "bob", bpw)
    bob.subscribe("home/#", 2)
    alice = connect(web, "alice", "alice", apw)
    for qos, n in ((0, 2), (1, 3), (2, 1)):
        for i in range(n):
            alice.publish(f"home/q{qos}/{i}", b"x", qos=qos)
    for _ in range(6):
        bob.wait_message("home/#")
    wait_for(lambda: sample(web, "roost_messages_received_total", qos="1") == 3, "QoS 1 received")
    m = scrape(web)
    assert m[("roost_messages_received_total", (("qos", "0"),))] == 2
    assert m[("roost_messages_received_total", (("qos", "2"),))] == 1
    assert m[("roost_messages_sent_total", (("qos", "1"),))] >= 3
    assert m[("roost_connections", (("listener", "default"), ("tls", "false"), ("transport", "tcp")))] == 2
    assert m[("roost_listener_bound", (("listener", "web"), ("transport", "http")))] == 1
    assert m[("roost_connections_max", ())] == 2
    assert m[("roost_limit", (("name", "max_connections"),))] == 10000
    assert m[("roost_store_writable", ())] == 1
    assert m[("roost_ready", ())] == 1
    assert m[("roost_queued_bytes", ())] >= 0
    assert m[("roost_dropped_total", (("reason", "queue_full"),))] == 0
    assert m[("roost_refused_total", (("reason", "publish_denied"),))] == 0
    assert m[("roost_bytes_received_total", ())] > 0
    bob.disconnect()
    wait_for(lambda: sample(web, "roost_connections", listener="default", tls="false", transport="tcp") == 1,
             "bob gone")


def test_request_latency_commits_and_failed_logins(web):
    apw = web.add_user("alice")
    web.add_user("bob")
    alice = ImClient("alice").open(web, apw)
    alice.call("convs")
    alice.request("group.info", conv="grp:nosuch")
    with pytest.raises(ConnectFailed):
        connect(web, "alice.x", "alice", "wrong")
    wait_for(lambda: sample(web, "roost_im_request_seconds_count", op="convs") == 1, "convs latency")
    m = scrape(web)
    assert m[("roost_im_requests_total", (("op", "convs"), ("outcome", "ok")))] == 1
    assert m[("roost_im_requests_total", (("op", "group.info"), ("outcome", "not_found")))] == 1
    assert m[("roost_im_request_seconds_bucket", (("le", "+Inf"), ("op", "convs")))] == 1
    assert m[("roost_logins_failed_total", (("reason", "bad_credentials"),))] == 1
    # the store commits (the inbox cursor, the session, ...), each measured
    assert m[("roost_store_commit_seconds_count", ())] >= 1
    assert m[("roost_store_commit_seconds_sum", ())] > 0
    assert m[("roost_store_commits_total", ())] >= m[("roost_store_commit_seconds_count", ())] - 1
    assert m[("roost_mailbox_pruned_events_total", ())] == 0
    assert m[("roost_telemetry_buffered", ())] == 0
    assert m[("roost_influxdb_write_errors_total", (("kind", "retried"),))] == 0


def test_roost_status_for_a_person_and_as_json(web):
    pw = web.add_user("alice")
    connect(web, "alice", "alice", pw)
    wait_for(lambda: json.loads(get(base_url(web) + "/status.json")[1])["connections"]["current"] == 1, "status")
    res = web.cli("status")
    assert res.stdout.startswith("roost ")
    assert "(ready)" in res.stdout.splitlines()[0]
    assert "1 now" in res.stdout and "max_connections 10000" in res.stdout and "writable" in res.stdout
    doc = json.loads(web.cli("status", "--json").stdout)
    assert doc["ready"] is True and doc["connections"]["current"] == 1
    assert {lst["name"] for lst in doc["listeners"]} == {"default", "web"}
    assert doc["limits"]["max_payload"] == 1048576
    assert doc["store"]["writable"] is True and doc["store"]["bytes"] > 0
    with pytest.raises(ConnectFailed):
        connect(web, "alice.x", "alice", "wrong")
    wait_for(lambda: "login/bad_credentials 1" in web.cli("status").stdout, "recent refusal")
    web.stop()
    res = web.cli("status", check=False)
    assert res.returncode != 0
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1 and "no broker answers" in res.stderr


def test_roost_status_without_an_http_listener(roost):
    res = roost.cli("status", check=False)
    assert res.returncode != 0 and "no http listener" in res.stderr


def test_https_listener(roost_factory, tmp_path):
    certfile, keyfile = make_cert(tmp_path)
    broker = roost_factory(with_http(ssl=True, certfile=str(certfile), keyfile=str(keyfile)))
    ctx = ssl.create_default_context(cafile=str(certfile))
    wait_for(lambda: get(base_url(broker, "https") + "/readyz", ctx)[0] == 200, "https readyz")
    assert "roost_build_info" in get(base_url(broker, "https") + "/metrics", ctx)[1]
    assert json.loads(broker.cli("status", "--json").stdout)["ready"] is True


def test_an_http_listener_alone_is_not_enough():
    with pytest.raises(ConfigError, match="MQTT listener"):
        config_from_dict({"listeners": {"web": {"type": "http", "bind": "127.0.0.1:0"}}})
    with pytest.raises(ConfigError, match="sys_interval"):
        config_from_dict({"sys_interval": -1})


def test_not_ready_while_the_store_cannot_write_or_a_listener_is_down():
    """Monitor.problems on stand-ins: what /readyz answers 503 with."""
    cfg = config_from_dict({"listeners": {"default": {"bind": "127.0.0.1:0"},
                                          "web": {"type": "http", "bind": "127.0.0.1:0"}}})
    db = SimpleNamespace(unavailable_since=None, on_commit=None, path="x.db")
    services = SimpleNamespace(store=SimpleNamespace(health=db), messaging=None, telemetry=None,
                               homeassistant=None, request_stats=RequestStats())
    bound = {"default": 1883, "web": 9883}
    broker = SimpleNamespace(bound_ports=lambda: dict(bound), plugins_manager=SimpleNamespace(plugins=[]))
    monitor = Monitor(cfg, services)  # type: ignore[arg-type]
    monitor.attach(broker)  # type: ignore[arg-type]
    assert db.on_commit == monitor.commit_seconds.observe
    assert monitor.problems() == ["starting"]
    monitor.started = True
    assert monitor.problems() == []
    db.unavailable_since = time.time()
    del bound["web"]
    problems = monitor.problems()
    assert problems[0].startswith("store cannot write since ") and problems[1:] == ["listener web not bound"]


def test_histogram_buckets_are_cumulative_and_le():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert h.count == 4 and h.sum == pytest.approx(3.65)
    assert h.quantile(0.5) == 0.1 and h.quantile(0.75) == 1.0
