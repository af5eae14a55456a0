"""`roost serve` and the admin commands (user, device, service).

Admin commands work directly on the store named by the config, whether the
broker runs or not; a running broker picks the changes up within a second
(removed principals are disconnected).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from broker.config import ConfigError, RoostConfig, load_config
from client.output import EXIT_USAGE, CliError

T = TypeVar("T")

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="ROOST_CONFIG",
    help="YAML config file (default: $ROOST_CONFIG or config/roost.yaml).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def _load(config_path: str | None) -> RoostConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _with_identity(config_path: str | None, fn: Callable[[Any], Awaitable[T]]) -> T:
    from broker.services.identity import IdentityError, IdentityService
    from broker.startup import StartupError, open_store, os_reason
    from broker.store.base import StoreClosed, StoreUnavailable

    cfg = _load(config_path)
    path = cfg.resolve(cfg.storage.path)

    async def run() -> T:
        store = await open_store(path, cfg.storage)   # StartupError: "cannot open store <path>: <why>"
        try:
            return await fn(IdentityService(store.identity))
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (IdentityError, StartupError) as exc:
        raise CliError(str(exc)) from None
    except (StoreUnavailable, StoreClosed, OSError) as exc:   # the store failed after opening (locked, disk full, ...)
        raise CliError(f"store {path}: {os_reason(exc)}") from None


def _emit(as_json: bool, doc: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(doc) if as_json else text)


def _read_password(password: str | None, password_stdin: bool, *, prompt: bool) -> str | None:
    if password is not None and password_stdin:
        raise click.UsageError("use either --password or --password-stdin")
    if password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise click.UsageError("--password-stdin: no password on standard input")
        return line
    if password is None and prompt:
        # Without a terminal getpass would warn (a Python warning on stderr) and
        # echo the password; say what to do instead, as `roost login` does.
        if not sys.stdin.isatty():
            raise CliError("no terminal to ask the password on: use --password-stdin", EXIT_USAGE)
        return click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


# ---- serve ---------------------------------------------------------------------

@click.command()
@config_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Override log.level from the config.")
def serve(config_path: str | None, log_level: str | None) -> None:
    """Run the broker until Ctrl-C / SIGTERM.

    \b
    Example:
      roost serve
      roost serve --config /etc/roost/roost.yaml
    """
    cfg = _load(config_path)
    logging.basicConfig(level=(log_level or cfg.log.level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt's state machine library logs every transition at INFO.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    from broker.app import run as run_broker
    from broker.startup import StartupError

    try:
        run_broker(cfg)
    except StartupError as exc:  # one line: which address, file or store, and what is wrong
        raise CliError(str(exc)) from None
    except OSError as exc:  # e.g. address already in use
        raise CliError(f"cannot start: {exc}") from None
    except KeyboardInterrupt:
        pass


# ---- user ----------------------------------------------------------------------

@click.group()
def user() -> None:
    """Manage people (principals of kind user)."""


@user.command("add")
@click.argument("principal_id", metavar="ID")
@click.option("--name", help="Display name (default: the id).")
@click.option("--password", help="The password (visible in your shell history: prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@config_option
@json_option
def user_add(principal_id: str, name: str | None, password: str | None, password_stdin: bool,
             config_path: str | None, as_json: bool) -> None:
    """Register a person. Without a password option, one is generated and printed once.

    \b
    Example:
      echo 's3cret' | roost user add alice --name "Alice" --password-stdin
    """
    secret = _read_password(password, password_stdin, prompt=False)
    reg = _with_identity(config_path, lambda ids: ids.add(principal_id, "user", secret=secret, name=name))
    doc: dict[str, Any] = {"id": reg.id}
    if reg.secret:
        doc["secret"] = reg.secret
    text = f"user {reg.id} added" + (f"\npassword: {reg.secret}" if reg.secret else "")
    _emit(as_json, doc, text)


@user.command("passwd")
@click.argument("principal_id", metavar="ID")
@click.option("--password", help="The new password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the new password from standard input.")
@config_option
@json_option
def user_passwd(principal_id: str, password: str | None, password_stdin: bool, config_path: str | None,
                as_json: bool) -> None:
    """Set a person's password (prompts when no option is given).

    \b
    Example:
      roost user passwd alice
    """
    secret = _read_password(password, password_stdin, prompt=True)
    assert secret is not None

    async def change(ids: Any) -> bool:
        p = await ids.get(principal_id)
        if p is None or p.kind != "user":
            return False
        return await ids.set_secret(principal_id, secret)

    if not _with_identity(config_path, change):
        raise CliError(f"no user {principal_id!r}")
    _emit(as_json, {"id": principal_id}, f"password of {principal_id} changed")


# ---- device --------------------------------------------------------------------

@click.group()
def device() -> None:
    """Manage devices (on the store), and list a device's commands (as a person)."""


@device.command("add")
@click.argument("principal_id", metavar="ID")
@click.option("--kind", "device_kind", required=True, help="Device kind, e.g. thermostat, light, door_sensor.")
@click.option("--name", help="Display name (default: the id).")
@click.option("--room", help="Where it is, e.g. kitchen (becomes a telemetry tag).")
@config_option
@json_option
def device_add(principal_id: str, device_kind: str, name: str | None, room: str | None, config_path: str | None,
               as_json: bool) -> None:
    """Register a device; prints its secret and pairing code once.

    \b
    Example:
      roost device add thermo1 --kind thermostat --room kitchen
    """
    reg = _with_identity(config_path, lambda ids: ids.add(principal_id, "device", name=name,
                                                          device_kind=device_kind, room=room))
    _emit(as_json, {"id": reg.id, "secret": reg.secret, "pairing_code": reg.pairing_code},
          f"device {reg.id} added\nsecret: {reg.secret}\npairing code: {reg.pairing_code}")


@device.command("pairing")
@click.argument("principal_id", metavar="ID")
@config_option
@json_option
def device_pairing(principal_id: str, config_path: str | None, as_json: bool) -> None:
    """Give a device a new pairing code (the old one stops working); prints it once.

    For a lost code, or to stop more people from claiming it. Owners stay owners.

    \b
    Example:
      roost device pairing thermo1
    """
    code = _with_identity(config_path, lambda ids: ids.new_pairing_code(principal_id))
    if code is None:
        raise CliError(f"no device {principal_id!r}")
    _emit(as_json, {"id": principal_id, "pairing_code": code}, f"pairing code of {principal_id}: {code}")


# ---- service -------------------------------------------------------------------

@click.group()
def service() -> None:
    """Manage integration accounts (e.g. a Home Assistant bridge)."""


@service.command("add")
@click.argument("principal_id", metavar="ID")
@click.option("--name", help="Display name (default: the id).")
@config_option
@json_option
def service_add(principal_id: str, name: str | None, config_path: str | None, as_json: bool) -> None:
    """Register an integration account; prints its secret once.

    \b
    Example:
      roost service add homeassistant
    """
    reg = _with_identity(config_path, lambda ids: ids.add(principal_id, "service", name=name))
    _emit(as_json, {"id": reg.id, "secret": reg.secret}, f"service {reg.id} added\nsecret: {reg.secret}")


# ---- shared --------------------------------------------------------------------

def _list(kind: str, config_path: str | None, as_json: bool) -> None:
    rows = _with_identity(config_path, lambda ids: ids.list(kind))
    docs = [_list_doc(p) for p in rows]
    if as_json:
        click.echo(json.dumps({f"{kind}s": docs}))
        return
    if not docs:
        click.echo(f"no {kind}s")
        return
    for d in docs:
        extra = f"  {d['kind']}" + (f"  {d['room']}" if d.get("room") else "") if kind == "device" else ""
        click.echo(f"{d['id']:<32} {d['name']}{extra}")


def _list_doc(p: Any) -> dict[str, Any]:
    """One principal of `<kind> list --json`. A device's `kind` is its device kind
    (thermostat, ...), as in `roost devices --json` and the `devices` op: every
    device listing has one shape (the list itself says they are devices)."""
    if p.kind == "device":
        return {"id": p.id, "kind": p.device_kind, "name": p.name, "room": p.room}
    return {"id": p.id, "kind": p.kind, "name": p.name}


def _remove(kind: str, principal_id: str, config_path: str | None, as_json: bool) -> None:
    async def remove(ids: Any) -> bool:
        p = await ids.get(principal_id)
        if p is None or p.kind != kind:
            return False
        return await ids.remove(principal_id)

    if not _with_identity(config_path, remove):
        raise CliError(f"no {kind} {principal_id!r}")
    _emit(as_json, {"id": principal_id, "removed": True}, f"{kind} {principal_id} removed")


def _add_list_and_remove(group: click.Group, kind: str, noun: str, example_id: str) -> None:
    """`<kind> list` and `<kind> remove ID`: the same for every kind of principal."""

    @group.command("list", help=f"List {noun}s.\n\n\b\nExample:\n  roost {kind} list --json")
    @config_option
    @json_option
    def list_cmd(config_path: str | None, as_json: bool) -> None:
        _list(kind, config_path, as_json)

    @group.command("remove", help=f"Remove a {noun}; its live connections are closed.\n\n"
                                  f"\b\nExample:\n  roost {kind} remove {example_id}")
    @click.argument("principal_id", metavar="ID")
    @config_option
    @json_option
    def remove_cmd(principal_id: str, config_path: str | None, as_json: bool) -> None:
        _remove(kind, principal_id, config_path, as_json)


_add_list_and_remove(user, "user", "person", "alice")
_add_list_and_remove(device, "device", "device", "thermo1")
_add_list_and_remove(service, "service", "integration account", "homeassistant")


def register(group: click.Group) -> None:
    for cmd in (serve, user, device, service):
        group.add_command(cmd)
