"""`roost user/device/service ...` against the store of a config file."""

from __future__ import annotations

import json

import pytest

from tests.harness import RoostProcess


@pytest.fixture
def store(tmp_path) -> RoostProcess:
    return RoostProcess(tmp_path)  # not started: admin commands work without a broker


def test_user_lifecycle_with_json(store):
    out = store.cli("user", "add", "alice", "--name", "Alice A", "--password-stdin", "--json", input="pw1\n")
    assert json.loads(out.stdout) == {"id": "alice"}
    out = store.cli("user", "add", "bob", "--json")
    doc = json.loads(out.stdout)
    assert doc["id"] == "bob" and len(doc["secret"]) >= 16      # generated, printed once
    users = json.loads(store.cli("user", "list", "--json").stdout)["users"]
    assert [(u["id"], u["name"]) for u in users] == [("alice", "Alice A"), ("bob", "bob")]
    store.cli("user", "passwd", "alice", "--password-stdin", input="pw2\n")
    out = store.cli("user", "remove", "bob", "--json")
    assert json.loads(out.stdout) == {"id": "bob", "removed": True}
    users = json.loads(store.cli("user", "list", "--json").stdout)["users"]
    assert [u["id"] for u in users] == ["alice"]


def test_device_add_prints_secret_and_pairing_code_once(store):
    doc = json.loads(store.cli("device", "add", "therm1", "--kind", "thermostat", "--room", "kitchen",
                               "--json").stdout)
    assert set(doc) == {"id", "secret", "pairing_code"}
    assert doc["pairing_code"].isdigit() and len(doc["pairing_code"]) == 8
    devices = json.loads(store.cli("device", "list", "--json").stdout)["devices"]
    assert devices == [{"id": "therm1", "kind": "thermostat", "name": "therm1", "room": "kitchen"}]
    assert "secret" not in store.cli("device", "list").stdout


def test_service_add(store):
    doc = json.loads(store.cli("service", "add", "homeassistant", "--json").stdout)
    assert doc["id"] == "homeassistant" and doc["secret"]


@pytest.mark.parametrize("args, message", [
    (("user", "add", "Alice"), "invalid id"),
    (("user", "add", "-x"), ""),
    (("device", "add", "d1"), "--kind"),
    (("user", "remove", "nobody"), "no user 'nobody'"),
    (("device", "remove", "nobody"), "no device 'nobody'"),
])
def test_bad_input_is_one_clear_line_and_changes_nothing(store, args, message):
    res = store.cli(*args, check=False)
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads(store.cli("user", "list", "--json").stdout)["users"] == []


def test_ids_are_unique_across_kinds(store):
    store.cli("user", "add", "thing", "--json")
    res = store.cli("device", "add", "thing", "--kind", "light", check=False)
    assert res.returncode != 0 and "already taken" in res.stderr
