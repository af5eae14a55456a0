"""`roost simulate`: run simulated devices against a broker (a demo and a load source).

Devices are registered on the broker's store (like `roost device add`) when they
do not exist yet. Their secrets are kept in a small JSON file (mode 0600) next
to the store, so the next run reuses them; a device found in the store without
a known secret gets a new one (a running broker picks that up within a second).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import click

from broker.config import ConfigError, RoostConfig, load_config
from contract import catalog
from contract.ids import is_valid_principal_id

log = logging.getLogger("roost.simulate")

KIND_CHOICES = sorted(catalog.KINDS) + ["mixed"]


def _server_of(cfg: RoostConfig) -> str:
    for lst in cfg.listeners.values():
        if lst.type == "tcp" and not lst.ssl:
            host, _, port = lst.bind.rpartition(":")
            if host in ("", "0.0.0.0", "::", "[::]"):
                host = "127.0.0.1"
            return f"{host}:{port}"
    return "127.0.0.1:1883"


def _plan(count: int, kind: str, prefix: str) -> list[tuple[str, str]]:
    """(device id, kind) for each simulated device; `mixed` cycles through the kinds."""
    kinds = sorted(catalog.KINDS) if kind == "mixed" else [kind]
    plan = []
    for i in range(count):
        k = kinds[i % len(kinds)]
        plan.append((f"{prefix}-{k.replace('_', '')}-{i + 1}", k))
    return plan


def _read_secrets(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_secrets(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def ensure_devices(cfg: RoostConfig, plan: list[tuple[str, str]], secrets_path: Path,
                   room: str | None = None) -> list[dict[str, Any]]:
    """Register what is missing; returns [{id, kind, secret, pairing_code, new}]."""
    from broker.services.identity import IdentityError, IdentityService, new_secret
    from broker.store.factory import open_store

    known = _read_secrets(secrets_path)

    async def one(ids: Any, device_id: str, kind: str) -> dict[str, Any]:
        p = await ids.get(device_id)
        entry = known.get(device_id) if isinstance(known.get(device_id), dict) else None
        if p is not None and p.kind != "device":
            raise click.ClickException(f"{device_id!r} exists and is not a device; use another --prefix")
        if p is None:
            reg = await ids.add(device_id, "device", device_kind=kind, room=room, name=device_id)
            entry = {"kind": kind, "secret": reg.secret, "pairing_code": reg.pairing_code}
            new = True
        else:
            if p.device_kind != kind:
                raise click.ClickException(f"{device_id!r} is a {p.device_kind}, not a {kind}; use another --prefix")
            if entry is None or not entry.get("secret"):
                entry = {"kind": kind, "secret": new_secret()}
                await ids.set_secret(device_id, entry["secret"])
            # The store keeps only a hash: show the remembered code while it is
            # still the device's, else give the device a new one.
            remembered = entry.get("pairing_code")
            if not (isinstance(remembered, str) and await ids.check_pairing_code(device_id, remembered)):
                entry["pairing_code"] = await ids.new_pairing_code(device_id)
            new = False
        known[device_id] = {k: entry[k] for k in ("kind", "secret", "pairing_code")}
        return {"id": device_id, **entry, "new": new}

    async def run() -> list[dict[str, Any]]:
        store = await open_store(cfg.storage, cfg.resolve)
        ids = IdentityService(store.identity)
        # Hashing a new secret costs ~50 ms of CPU (argon2, off the loop): a few
        # at a time use the cores without swamping a small machine.
        gate = asyncio.Semaphore(4)

        async def gated(device_id: str, kind: str) -> dict[str, Any]:
            async with gate:
                return await one(ids, device_id, kind)

        try:
            results = await asyncio.gather(*(gated(d, k) for d, k in plan), return_exceptions=True)
            for r in results:
                if isinstance(r, IdentityError):
                    raise click.ClickException(str(r))
                if isinstance(r, BaseException):
                    raise r
            return list(results)  # type: ignore[arg-type]
        finally:
            _write_secrets(secrets_path, known)
            await store.close()

    return asyncio.run(run())


@click.command("simulate")
@click.option("--count", "-n", default=3, show_default=True, type=click.IntRange(1, 10000),
              help="How many devices to simulate.")
@click.option("--kind", "-k", default="mixed", show_default=True, type=click.Choice(KIND_CHOICES),
              help="Device kind; mixed cycles through all kinds.")
@click.option("--server", default=None, metavar="HOST:PORT",
              help="Broker address (default: the config's first plain TCP listener).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="ROOST_CONFIG",
              help="Broker YAML config whose store the devices are registered in.")
@click.option("--prefix", default="sim", show_default=True, help="Device ids are PREFIX-KIND-N.")
@click.option("--room", default=None, help="Room recorded for newly registered devices.")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(0.05, 3600),
              help="Seconds between telemetry readings of each device.")
@click.option("--door-every", default=60.0, show_default=True, type=click.FloatRange(0, None),
              help="Mean seconds between door movements of a door sensor (0: never).")
@click.option("--duration", default=0.0, type=click.FloatRange(0, None),
              help="Stop after this many seconds (default: run until Ctrl-C).")
@click.option("--secrets", "secrets_file", type=click.Path(dir_okay=False), default=None,
              help="JSON file of the simulated devices' secrets (default: simulate-secrets.json beside the store).")
@click.option("--json", "as_json", is_flag=True, help="Print the device list as JSON.")
def simulate(count: int, kind: str, server: str | None, config_path: str | None, prefix: str, room: str | None,
             interval: float, door_every: float, duration: float, secrets_file: str | None, as_json: bool) -> None:
    """Run simulated devices (thermostat, light, door sensor) against a broker.

    Registers the devices on the broker's store if needed and prints their
    pairing codes, so people can claim them. Then each publishes telemetry
    every --interval seconds, answers commands, and door sensors tell their
    owners when the door opens and closes.

    \b
    Examples:
      roost simulate                              one of each kind
      roost simulate --count 200 --interval 1     a load source
      roost claim sim-light-2 12345678            (as a person) take one
    """
    from client.config import ClientConfigError, parse_server
    from devices.simulators import DoorSensor, Fleet, make

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        addr = parse_server(server or _server_of(cfg))
    except ClientConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None
    plan = _plan(count, kind, prefix)
    for device_id, _ in plan:
        if not is_valid_principal_id(device_id):
            raise click.BadParameter(f"{device_id!r} is not a valid id: use a short prefix of a-z 0-9 _ -",
                                     param_hint="--prefix")
    secrets_path = Path(secrets_file) if secrets_file else \
        cfg.resolve(cfg.storage.path).parent / "simulate-secrets.json"
    devices = ensure_devices(cfg, plan, secrets_path, room)

    if as_json:
        click.echo(json.dumps({"server": str(addr), "devices": [
            {k: d[k] for k in ("id", "kind", "pairing_code", "new")} for d in devices]}))
    else:
        click.echo(f"simulating {len(devices)} device(s) against {addr}")
        for d in devices:
            click.echo(f"  {d['id']:<28} {d['kind']:<12} pairing code {d['pairing_code']}"
                       + ("  (new)" if d["new"] else ""))

    sims = []
    for d in devices:
        sim = make(d["kind"], d["id"], d["secret"], addr.host, addr.port, people_ttl=10.0)
        if isinstance(sim, DoorSensor):
            sim.toggle_every = door_every
        sims.append(sim)
    fleet = Fleet(sims, interval=interval)

    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        fleet.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        fleet.start()
        fleet.run(duration or None)
    finally:
        fleet.stop()
        for s, h in old.items():
            signal.signal(s, h)
        stats = fleet.stats()
        if not as_json:
            click.echo("stopped: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))


def register(group: click.Group) -> None:
    group.add_command(simulate)
