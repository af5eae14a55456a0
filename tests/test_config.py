"""Configuration: every mistake refused at start with its key path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from broker.config import ConfigError, config_from_dict, load_config
from tests.harness import ROOT


def test_bundled_default_config_loads_with_embedded_defaults():
    cfg = load_config()
    assert cfg.listeners["default"].bind == "127.0.0.1:1883"
    assert cfg.storage.path == "data/roost.db"
    assert cfg.auth.allow_anonymous is False
    assert cfg.mailbox.max_events == 10000
    assert cfg.mailbox.ttl == 30 * 86400


@pytest.mark.parametrize("data, path", [
    ({"listner": {}}, "listner"),
    ({"listeners": {"a": {"type": "udp"}}}, "listeners.a.type"),
    ({"listeners": {"a": {"bind": "nowhere"}}}, "listeners.a.bind"),
    ({"listeners": {"a": {"ssl": True}}}, "listeners.a.certfile"),
    ({"listeners": {"a": {"ssl": True, "certfile": "/no/cert.pem", "keyfile": "/no/key.pem"}}},
     "listeners.a.certfile"),
    ({"listeners": {"a": {"cafile": "/no/ca.pem"}}}, "listeners.a.cafile"),
    ({"auth": {"allow_anonymous": "yes"}}, "auth.allow_anonymous"),
    ({"limits": {"max_inflight": "many"}}, "limits.max_inflight"),
    ({"limits": {"max_body": -1}}, "limits.max_body"),
    ({"mailbox": {"ttl": "forever"}}, "mailbox.ttl"),
    ({"acl": [{"action": "maybe", "access": "all", "topic": "x"}]}, "acl[0].action"),
    ({"acl": [{"action": "allow", "access": "all", "topic": "x", "whom": "*"}]}, "acl[0].whom"),
    ({"telemetry": {"influxdb": {"url": "http://x"}}}, "telemetry.influxdb.bucket"),
    ({"storage": []}, "storage"),
    ({"acl": [{"action": "allow", "access": "all", "who": "*"}]}, "acl[0].topic"),
    ({"acl": [{"action": "allow", "topic": "x"}]}, "acl[0].access"),
    ({"acl": [{"access": "all", "topic": "x"}]}, "acl[0].action"),
    ({"acl": [{"action": "allow", "access": "all", "topic": "a/#/b"}]}, "acl[0].topic"),
    ({"acl": [{"action": "allow", "access": "all", "topic": "a/b+"}]}, "acl[0].topic"),
    ({"acl": [{"action": "allow", "access": "all", "topic": "x", "who": "kind:"}]}, "acl[0].who"),
    ({"acl": [{"action": "allow", "access": "all", "topic": "x", "who": "kind:robot"}]}, "acl[0].who"),
    ({"acl": [{"action": "allow", "access": "all", "topic": "x", "who": "Bad User!"}]}, "acl[0].who"),
])
def test_bad_config_names_the_key(data, path):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert err.value.path == path
    assert path in str(err.value)


def test_durations_and_acl_rules_parse():
    cfg = config_from_dict({"mailbox": {"ttl": "12h"}, "acl": [
        {"action": "deny", "access": "publish", "topic": "secret/#", "who": "kind:device"},
        {"action": "allow", "access": "all", "topic": "home/%u/+/%c", "who": "anonymous"},
        {"action": "allow", "access": "subscribe", "topic": "#", "who": "alice"}]})
    assert cfg.mailbox.ttl == 12 * 3600
    assert [r.who for r in cfg.acl] == ["kind:device", "anonymous", "alice"]


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client.cli", "serve", *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=30, env=env)


def test_serve_refuses_missing_file():
    res = _serve("--config", "/nonexistent/roost.yaml")
    assert res.returncode != 0
    assert "config file not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_refuses_unknown_key_and_starts_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage:\n  path: {tmp_path}/r.db\nlimits:\n  max_payloadd: 5\n")
    res = _serve("--config", str(cfg))
    assert res.returncode != 0
    assert "limits.max_payloadd" in res.stderr
    assert not (tmp_path / "r.db").exists()


def test_roost_config_env_is_used(tmp_path):
    import os

    cfg = tmp_path / "c.yaml"
    cfg.write_text("bogus: 1\n")
    res = _serve(env=dict(os.environ, ROOST_CONFIG=str(cfg)))
    assert res.returncode != 0 and "'bogus'" in res.stderr
