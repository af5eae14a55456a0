"""The contract is the single registry of ops, event kinds, body types and error
codes (contract/ops.py, events.py, bodies.py, errors.py): the broker serves
exactly the registry's ops, emits only its event kinds with their fields, checks
bodies by its rules, and docs/PROTOCOL.md's tables say the same, both ways."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any

import pytest

from broker.app import build_services
from broker.config import RoostConfig, config_from_dict
from broker.services.base import Caller
from contract.bodies import BODIES, MAX_BODY_DEPTH, check_body, validate_body
from contract.errors import ErrorCode, ProtocolError
from contract.events import ENVELOPE_FIELDS, EVENTS
from contract.ops import ANYONE, OPS, OpSpec
from tests.messaging_env import close_env, open_env

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

# Builds the broker can be configured into, each with the config switches it turns on.
BUILDS: dict[str, dict[str, Any]] = {
    "default": {},
    "homeassistant": {"homeassistant": {"enabled": True, "service_account": "hass"}},
}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def switch_on(config: RoostConfig, dotted: str) -> bool:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return bool(value)


async def served_ops(tmp_path: Path, extra: dict[str, Any]) -> tuple[RoostConfig, dict[str, list[str]]]:
    """Build the services as the broker does and collect who serves which op."""
    config = config_from_dict({"storage": {"path": str(tmp_path / "roost.db")}, **extra}, base_dir=str(tmp_path))
    services = await build_services(config)
    try:
        served: dict[str, list[str]] = {}
        for svc in services.all():
            for op in svc.ops():
                served.setdefault(op, []).append(type(svc).__name__)
        return config, served
    finally:
        await services.store.close()


# ---- (a) the ops the broker serves are the registry's -----------------------------

@pytest.mark.parametrize("build", list(BUILDS))
def test_every_served_op_is_in_the_registry_and_every_registry_op_is_served(tmp_path, build):
    config, served = run(served_ops(tmp_path, BUILDS[build]))
    assert {op: who for op, who in served.items() if len(who) > 1} == {}, "an op served by two services"
    unregistered = sorted(set(served) - set(OPS))
    assert unregistered == [], f"served but missing from contract/ops.py: {unregistered}"
    expected = {name for name, spec in OPS.items() if spec.requires is None or switch_on(config, spec.requires)}
    unserved = sorted(expected - set(served))
    assert unserved == [], f"in contract/ops.py but not served by the {build} build: {unserved}"
    assert set(served) == expected


def test_registry_is_well_formed():
    for name, spec in OPS.items():
        assert spec.name == name
        assert spec.callers and spec.callers <= ANYONE, name
        names = spec.param_names
        assert len(set(names)) == len(names), f"{name}: a parameter twice"
        assert "id" not in names and "op" not in names, f"{name}: parameters never use the name id (or op)"
        for group in (spec.one_of, spec.any_of):
            assert set(group) <= set(names), name
            assert all(not spec.param(p).required for p in group), f"{name}: {group} are given as a group"
        assert len(set(spec.result_keys)) == len(spec.result_keys), name
    for kind, event in EVENTS.items():
        assert event.kind == kind and not set(event.field_names) & set(ENVELOPE_FIELDS)
    for type_name, body in BODIES.items():
        assert body.name == type_name


SOUND: dict[str, Any] = {
    "to": "bob", "from": "bob", "user": "bob", "device": "lamp", "with": "bob", "code": "12345678",
    "conv": "dm:alice:bob", "cmid": "c1", "body": {"type": "text", "text": "hi"}, "n": 0, "seq": 0,
    "q": "bob", "name": "x", "members": ["bob"],
    "media_type": "image/png", "size": 10, "upload": "u1", "offset": 0, "data": "AAAA", "file": "ab" * 32,
}


def sound_params(spec: OpSpec, **override: Any) -> dict[str, Any]:
    """Well-formed parameters for `spec` (the first of a `one_of` group only)."""
    params = {p: SOUND[p] for p in spec.param_names if p in SOUND and p not in spec.one_of[1:]}
    params.update(override)
    return params


class RegistryEnv:
    """The messaging, social and device services on a real store, alice and bob
    contacts (no request cool-down), a device `lamp` (its pairing code in `code`), a service `hass`."""

    async def open(self, tmp_path: Path) -> RegistryEnv:
        from broker.services.devices import DeviceService
        from broker.services.files import FileService
        from broker.services.telemetry import TelemetryService
        from broker.store.blobs import FsBlobStore

        self.env = await open_env(tmp_path, config={"limits": {"contact_request_cooldown": 0}})
        identity = self.env.services.identity
        self.code = (await identity.add("lamp", "device", device_kind="light", name="Lamp")).pairing_code
        await identity.add("hass", "service", name="Hass")
        self.env.services.devices = DeviceService(self.env.services)
        await self.env.services.devices.load()
        self.env.services.telemetry = TelemetryService(self.env.services)
        self.env.services.files = FileService(self.env.services, FsBlobStore(tmp_path / "files"))
        await self.env.services.files.load()
        await self.env.befriend("alice", "bob")
        self.table = {**self.env.messaging.ops(), **self.env.social.ops(), **self.env.services.devices.ops(),
                      **self.env.services.telemetry.ops(), **self.env.services.files.ops()}
        self.callers = {"user": Caller("alice", "user", "alice.phone"), "device": Caller("lamp", "device", "lamp"),
                        "service": Caller("hass", "service", "hass")}
        return self

    async def close(self) -> None:
        await close_env(self.env)

    async def call(self, op: str, params: dict[str, Any], kind: str = "user") -> dict[str, Any]:
        result: dict[str, Any] = await self.table[op](self.callers[kind], params)
        return result


def test_callers_outside_an_ops_callers_are_refused(tmp_path):
    """`OpSpec.callers` is true: a kind it leaves out is refused (forbidden, or
    not_found where the target must not be revealed) even with sound parameters."""

    async def main() -> None:
        renv = await RegistryEnv().open(tmp_path)
        try:
            checked = 0
            for name, spec in OPS.items():
                for kind in sorted(ANYONE - spec.callers):
                    with pytest.raises(ProtocolError) as info:
                        await renv.call(name, sound_params(spec), kind)
                    assert info.value.code in (ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND), (name, kind, info.value)
                    checked += 1
            assert checked > 0
        finally:
            await renv.close()

    run(main())


def test_every_op_answers_with_the_registry_result_keys(tmp_path):
    async def main() -> None:
        renv = await RegistryEnv().open(tmp_path)
        try:
            answered: dict[str, dict[str, Any]] = {}

            async def call(op: str, **params: Any) -> dict[str, Any]:
                answered[op] = await renv.call(op, params)
                return answered[op]

            sent = await call("send", to="bob", cmid="k1", body={"type": "text", "text": "hi"})
            page = await call("sync", after=0)
            await call("ack", n=page["last"])
            await call("read", conv=sent["conv"], seq=sent["seq"])
            await call("history", conv=sent["conv"])
            await call("convs")
            conv = (await call("group.create", name="g", members=["bob"]))["conv"]
            await renv.env.befriend("carol", "alice")
            await call("group.add", conv=conv, members=["carol"])
            await call("group.remove", conv=conv, members=["carol"])
            await call("group.info", conv=conv)
            await call("convs")
            await call("group.leave", conv=conv)
            await call("contact.remove", user="carol")
            await call("contact.request", to="carol")
            await call("contacts")
            await call("user.search", q="bob")
            await call("profile.get", user="bob")
            await call("profile.set", status="here")
            await call("contact.block", user="carol")
            await call("contact.unblock", user="carol")
            await call("contact.remove", user="bob")
            await renv.env.call("bob", "contact.request", to="alice")
            await call("contact.reject", **{"from": "bob"})
            await renv.env.call("bob", "contact.request", to="alice")
            await call("contact.accept", **{"from": "bob"})
            await call("device.claim", device="lamp", code=renv.code)
            await call("device.share", device="lamp", **{"with": "bob"})
            await call("device.unshare", device="lamp", **{"with": "bob"})
            await call("devices")
            assert renv.env.services.telemetry is not None
            renv.env.services.telemetry.accept("lamp", b'{"on": true}')
            await renv.env.services.telemetry.flush()
            await call("device.history", device="lamp")
            png = b"\x89PNG\r\n\x1a\n" + b"0" * 8
            upload = (await call("file.upload", name="a.png", media_type="image/png", size=len(png)))["upload"]
            await call("file.chunk", upload=upload, offset=0, data=base64.b64encode(png).decode())
            ref = await call("file.finish", upload=upload)
            await call("send", to="bob", cmid="f1", body={"type": "file", **ref})
            await call("file.download", file=ref["id"])
            assert set(answered) == set(OPS), "the scenario calls every op"
            for op, result in answered.items():
                assert set(result) == set(OPS[op].result_keys), (op, result)
                for item in OPS[op].items:
                    for obj in result[item.key]:
                        assert set(item.all_fields) - set(item.sometimes) <= set(obj) <= set(item.all_fields), (op, obj)
            listed = {(op, i.key) for op, r in answered.items() for i in OPS[op].items if r[i.key]}
            assert listed == {(op, i.key) for op in answered for i in OPS[op].items} - {("contacts", "incoming")}
        finally:
            await renv.close()

    run(main())


def _too_big(spec: OpSpec, name: str) -> Any:
    p = spec.param(name)
    assert p is not None
    if p.type == "principals" and p.max_len is not None:
        return [f"m{i}" for i in range(p.max_len + 1)]
    if p.max_len is not None:
        return "x" * (p.max_len + 1)
    if p.maximum is not None:
        return p.maximum + 1
    return None


def test_services_refuse_parameters_beyond_the_registry_bounds(tmp_path):
    async def main() -> None:
        renv = await RegistryEnv().open(tmp_path)
        try:
            checked = 0
            for name, spec in OPS.items():
                for p in spec.params:
                    values = [v for v in (_too_big(spec, p.name),) if v is not None]
                    if p.minimum is not None and p.minimum > 0:
                        values.append(p.minimum - 1)
                    if p.min_len == 1:
                        values.append([] if p.type == "principals" else "")
                    for value in values:
                        with pytest.raises(ProtocolError) as info:
                            await renv.call(name, sound_params(spec, **{p.name: value}))
                        assert info.value.code == ErrorCode.BAD_REQUEST, (name, p.name, value, info.value)
                        checked += 1
                    if p.type == "string" and p.max_len is not None:
                        # At the bound the parameter itself is fine: anything refused is for another reason.
                        try:
                            await renv.call(name, sound_params(spec, **{p.name: "7" * p.max_len}))
                        except ProtocolError as err:
                            assert err.code != ErrorCode.BAD_REQUEST, (name, p.name, err)
            assert checked > 10
        finally:
            await renv.close()

    run(main())


# ---- events and bodies as the services produce and check them ---------------------

def test_every_event_the_services_write_is_a_registered_kind_with_its_fields(tmp_path):
    async def main() -> None:
        env = await open_env(tmp_path, config={"mailbox": {"max_events": 5}})
        try:
            await env.befriend("alice", "bob")
            await env.call("carol", "contact.request", to="alice", note="hello")
            await env.call("alice", "contact.reject", **{"from": "carol"})
            await env.call("carol", "contact.request", to="bob")
            await env.call("carol", "contact.remove", user="bob")
            sent = await env.call("alice", "send", to="bob", cmid="m1", body={"type": "text", "text": "hi"})
            box = await env.mailbox("bob")
            await env.call("bob", "ack", n=box[-1]["n"])
            await env.call("bob", "read", conv=sent["conv"], seq=sent["seq"])
            await env.befriend("alice", "carol")
            conv = (await env.call("alice", "group.create", name="home", members=["bob"]))["conv"]
            await env.call("alice", "send", conv=conv, cmid="m2", body={"type": "text", "text": "all"})
            await env.call("alice", "group.add", conv=conv, members=["carol"])
            await env.call("alice", "group.remove", conv=conv, members=["carol"])
            await env.call("bob", "group.leave", conv=conv)
            await env.call("bob", "contact.block", user="carol")
            await env.call("bob", "contact.unblock", user="carol")
            events = [e for who in ("alice", "bob", "carol") for e in await env.mailbox(who)]
            for i in range(8):
                await env.call("alice", "send", to="bob", cmid=f"x{i}", body={"type": "text", "text": str(i)})
            await env.messaging.prune_once()
            events += await env.mailbox("bob")
            seen: dict[str, set[str]] = {}
            for event in events:
                spec = EVENTS.get(event["kind"])
                assert spec is not None, f"event kind {event['kind']!r} missing from contract/events.py"
                fields = set(event) - set(ENVELOPE_FIELDS)
                always = {f.name for f in spec.fields if f.always}
                assert always <= fields <= set(spec.field_names), (event, spec.field_names)
                for f in spec.fields:
                    if f.values and f.name in event:
                        assert event[f.name] in f.values + f.extension_values, (event, f)
                seen.setdefault(event["kind"], set()).add(str(event.get("event", event.get("reason", ""))))
            assert set(seen) == set(EVENTS), "the scenario makes every kind of event"
        finally:
            await close_env(env)

    run(main())


BODY_CASES: list[Any] = [
    None, 1, "text", [], {}, {"type": None}, {"type": 1}, {"type": ["text"]}, {"type": "nope"}, {"type": "TEXT"},
    {"type": "text"}, {"type": "text", "text": 1}, {"type": "text", "text": ""}, {"type": "text", "text": "hi", "x": 1},
    {"type": "command"}, {"type": "command", "name": ""}, {"type": "command", "name": "on"},
    {"type": "command", "name": "on", "args": []}, {"type": "command", "name": "on", "args": {"b": 1}},
    {"type": "result"}, {"type": "result", "for": True, "status": "ok"}, {"type": "result", "for": 0, "status": "ok"},
    {"type": "result", "for": 1.0, "status": "ok"}, {"type": "result", "for": 3, "status": "fine"},
    {"type": "result", "for": 3, "status": "error", "data": 1}, {"type": "result", "for": 3, "status": "ok", "data": {}},
    {"type": "event"}, {"type": "event", "name": "opened"}, {"type": "event", "name": "opened", "data": "x"},
    {"type": "file"}, {"type": "file", "name": "a.png", "size": 3},
    {"type": "text", "text": "x" * 70000}, {"type": "nope", "text": "x" * 70000},
    {"type": "text", "text": "nested", "x": [[[{"y": [1]}]]]},
]


def _nested(levels: int) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "text", "text": "deep"}
    inner: dict[str, Any] = body
    for _ in range(levels - 1):
        inner["x"] = {}
        inner = inner["x"]
    return body


def _outcome(fn: Any) -> tuple[str, str]:
    try:
        fn()
    except ProtocolError as err:
        return str(err.code), err.message
    return "ok", ""


def test_send_checks_bodies_by_the_registry(tmp_path):
    """The broker's answer to every body is contract.bodies.validate_body's."""
    cases = [*BODY_CASES, _nested(MAX_BODY_DEPTH), _nested(MAX_BODY_DEPTH + 1)]

    async def main() -> None:
        env = await open_env(tmp_path)
        try:
            max_body = env.services.config.limits.max_body
            await env.befriend("alice", "bob")
            for i, body in enumerate(cases):
                try:
                    await env.call("alice", "send", to="bob", cmid=f"b{i}", body=body)
                    broker = ("ok", "")
                except ProtocolError as err:
                    broker = (str(err.code), err.message)
                assert broker == _outcome(lambda b=body: validate_body(b, max_body)), body
        finally:
            await close_env(env)

    run(main())


def test_check_body_is_validate_body_without_the_size():
    for body in [*BODY_CASES, _nested(MAX_BODY_DEPTH + 1)]:
        full = _outcome(lambda b=body: validate_body(b, 1 << 30))
        assert _outcome(lambda b=body: check_body(b)) == full, body
    assert _outcome(lambda: validate_body({"type": "nope", "text": "x" * 100}, 10))[0] == "too_large"


# ---- (b) docs/PROTOCOL.md's tables against the registry -----------------------------

def _cells(line: str) -> list[str]:
    """The cells of a markdown table row; `|` inside backticks stays in its cell."""
    cells, cell, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    cells.append(cell.strip())
    return cells


def protocol_tables() -> dict[str, list[dict[str, str]]]:
    """PROTOCOL.md's tables by their first column's header (op, kind, type, code),
    all tables with the same first header together, as rows of {header: cell}."""
    lines = PROTOCOL_MD.read_text(encoding="utf-8").splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            header = _cells(line)
            rows = tables.setdefault(header[0], [])
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, _cells(row), strict=True)))
    return tables


IDENT = re.compile(r"[a-z_][a-z0-9_]*")


def _first_code(cell: str) -> str:
    match = re.search(r"`([^`]+)`", cell)
    assert match, cell
    return match.group(1)


def _params(cell: str) -> dict[str, bool]:
    """Parameter names in a cell -> italic (optional). Backticked text that is no
    identifier (`roost device add`) is prose."""
    return {m.group(2): bool(m.group(1)) for m in re.finditer(r"(\*?)`([^`]+)`", cell) if IDENT.fullmatch(m.group(2))}


def _entries(shape: str) -> list[str]:
    """`{a, b: [{c, d}], e}` -> ["a", "b: [{c, d}]", "e"]: the top level's entries."""
    entries, depth, part = [], 0, ""
    for ch in shape:
        if ch in "{[":
            depth += 1
            if depth == 1:
                continue
        if ch in "}]":
            depth -= 1
        if depth == 1 and ch == ",":
            entries.append(part.strip())
            part = ""
        elif depth >= 1:
            part += ch
    entries.append(part.strip())
    return entries


def _top_keys(shape: str) -> set[str]:
    """`{device, role: "owner"}` -> {device, role}; `peer or name` is both. Nested
    objects and lists are skipped."""
    names = {n.strip() for e in _entries(shape) for n in e.split(":")[0].split(" or ")}
    return {n for n in names if IDENT.fullmatch(n)}


def _item_keys(shape: str) -> dict[str, set[str]]:
    """`{devices: [{id, kind}]}` -> {"devices": {id, kind}}: lists of objects spelled out."""
    found = {}
    for entry in _entries(shape):
        if m := re.fullmatch(r"(\w+):\s*\[(\{.*\})\]", entry):
            found[m.group(1)] = _top_keys(m.group(2))
    return found


def _result_keys(cell: str) -> set[str]:
    return set().union(*(_top_keys(m) for m in re.findall(r"`(\{[^`]*\})`", cell)))


def _fields(cell: str) -> tuple[set[str], set[str]]:
    """Events' `fields` cell: `a, b, c` (extensions: `d`, `e`; prose) -> shared, extensions."""
    shared_part, _, rest = cell.partition("(")
    shared = {f.strip() for code in re.findall(r"`([^`]+)`", shared_part) for f in code.split(",")}
    ext = set()
    if rest.startswith("extension"):
        listed = rest.split(":", 1)[1].split(";")[0].split(")")[0]
        ext = {f.strip() for code in re.findall(r"`([^`]+)`", listed) for f in code.split(",")}
    return shared, ext


def test_protocol_md_ops_tables_match_the_registry():
    rows = protocol_tables()["op"]
    documented: dict[str, dict[str, str]] = {}
    for row in rows:
        name = _first_code(row["op"])
        assert name not in documented, f"{name} documented twice"
        documented[name] = row
    assert sorted(set(OPS) - set(documented)) == [], "registry ops missing from PROTOCOL.md"
    assert sorted(set(documented) - set(OPS)) == [], "PROTOCOL.md ops missing from the registry"
    for name, row in documented.items():
        spec: OpSpec = OPS[name]
        assert ("extension" in row["op"]) == spec.extension, f"{name}: extension marks differ"
        params = _params(row["parameters"])
        assert set(params) == set(spec.param_names), f"{name}: parameters {sorted(params)} vs {spec.param_names}"
        for pname, italic in params.items():
            p = spec.param(pname)
            assert p is not None
            if p.required:
                assert not italic, f"{name}.{pname} is required: not in italics"
            else:
                assert italic or pname in spec.one_of, f"{name}.{pname} is optional: in italics"
        assert _result_keys(row["result"]) == set(spec.result_keys), f"{name}: result keys"
        for shape in re.findall(r"`(\{[^`]*\})`", row["result"]):
            for key, documented_keys in _item_keys(shape).items():
                item = spec.item(key)
                assert item is not None, f"{name}.{key}: documented objects the registry does not describe"
                assert set(item.fields) <= documented_keys <= set(item.all_fields), f"{name}.{key}: {documented_keys}"
        for pname, bounds in _bounds(row["parameters"]).items():
            assert bounds == _spec_bounds(spec, pname, bounds), f"{name}.{pname}: documented bounds {bounds}"


def _bounds(cell: str) -> dict[str, dict[str, int]]:
    """`limit` (1..1000, default 100), `note` (≤ 500 chars) -> the numbers documented."""
    out: dict[str, dict[str, int]] = {}
    for name, note in re.findall(r"`(\w+)`\*? \(([^)]*)\)", cell):
        found: dict[str, int] = {}
        if m := re.search(r"(\d+)\.\.(\d+)", note):
            found["low"], found["high"] = int(m.group(1)), int(m.group(2))
        if m := re.search(r"≤ (\d+)", note):
            found["high"] = int(m.group(1))
        if m := re.search(r"default (\d+)", note):
            found["default"] = int(m.group(1))
        if found:
            out[name] = found
    return out


def _spec_bounds(spec: OpSpec, name: str, documented: dict[str, int]) -> dict[str, int | str | None]:
    """The registry's numbers for what the documentation states (a bound it leaves
    out, such as 2^62 for every number, is said once elsewhere)."""
    p = spec.param(name)
    assert p is not None
    low, high = (p.min_len, p.max_len) if p.type == "string" else (p.minimum, p.maximum)
    found = {"low": low, "high": high, "default": p.default}
    return {k: found[k] for k in documented}


def test_protocol_md_event_table_matches_the_registry():
    documented = {_first_code(row["kind"]): row for row in protocol_tables()["kind"]}
    assert set(documented) == set(EVENTS)
    for kind, row in documented.items():
        shared, ext = _fields(row["fields"])
        spec = EVENTS[kind]
        assert shared == {f.name for f in spec.fields if not f.extension}, kind
        assert ext == {f.name for f in spec.fields if f.extension}, kind


def test_protocol_md_body_table_matches_the_registry():
    documented = {_first_code(row["`type`"]): row for row in protocol_tables()["`type`"]}
    assert set(documented) == set(BODIES)
    for type_name, row in documented.items():
        spec = BODIES[type_name]
        fields = _params(row["fields"])
        assert fields == {f.name: not f.required for f in spec.fields}, type_name
        assert ("reserved" in row["rules"]) == spec.reserved, type_name


def test_protocol_md_error_codes_match_the_registry():
    documented = [_first_code(row["code"]) for row in protocol_tables()["code"]]
    assert sorted(documented) == sorted(str(c) for c in ErrorCode)
    assert len(documented) == len(set(documented))


def test_registry_extends_the_shared_contract_without_breaking_it():
    """../shared/PROTOCOL.md's ops are all served, each with at least its parameters
    and exactly its result keys (Roost's extra keys are marked as extensions)."""
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "PROTOCOL.md"
    if not shared.exists():
        pytest.skip("the shared contract is not checked out next to this repo")
    section = shared.read_text(encoding="utf-8").split("## Operations", 1)[1].split("\n\n", 1)[0]
    header, *rows = [line for line in section.splitlines() if line.startswith("|") and "---" not in line]
    names_seen: set[str] = set()
    for line in rows:
        row = dict(zip(_cells(header), _cells(line), strict=True))
        names = re.findall(r"`([a-z][a-z.]*)`", row["op"])
        params = _split_per_op(row["parameters"], len(names))
        results = re.findall(r"`(\{[^`]*\})`", row["result"])
        results = results if len(results) == len(names) else results[:1] * len(names)
        for name, cell, result in zip(names, params, results, strict=True):
            spec = OPS[name]
            assert not spec.extension, name
            assert set(_params(cell)) <= set(spec.param_names), name
            assert _top_keys(result) == set(spec.result), name
            for key, keys in _item_keys(result).items():
                item = spec.item(key)
                assert item is not None and keys == set(item.fields), (name, key, keys)
        names_seen |= set(names)
    assert names_seen == {n for n, s in OPS.items() if not s.extension}


def _split_per_op(cell: str, count: int) -> list[str]:
    """`user` / `name`, `status` for `profile.get` / `profile.set`: one part per op."""
    parts = cell.split(" / ")
    return parts if len(parts) == count else [cell] * count


def test_registry_keys_are_plain_strings_on_the_wire():
    from contract.events import EventKind

    assert set(EVENTS) == {str(k) for k in EventKind}
    assert EVENTS["msg"].kind == EventKind.MSG == "msg"
    assert all(type(name) is str for name in OPS) and all(type(name) is str for name in BODIES)
