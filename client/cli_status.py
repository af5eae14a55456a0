"""`roost status`: the running broker's figures for a person (or `--json`).

It asks the broker's http listener (`listeners.<name>.type: http` in the same
config; the bundled config has one on 127.0.0.1:8080) for /status.json: no
credentials needed, and it works whatever the store or the ACL say. $SYS would
need a service account's secret; the store alone cannot tell what the broker
holds in memory.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import click

from broker.config import ConfigError, ListenerConfig, RoostConfig, load_config
from client.output import EXIT_CONNECT, CliError

TIMEOUT = 5.0


def status_url(cfg: RoostConfig) -> tuple[str, ListenerConfig]:
    """The /status.json URL of the config's first http listener."""
    for lst in cfg.listeners.values():
        if lst.type == "http":
            host, _, port = lst.bind.rpartition(":")
            host = host.strip("[]")
            if host in ("", "0.0.0.0"):
                host = "127.0.0.1"     # listening on every address: ask the local one
            elif host == "::":
                host = "::1"
            if ":" in host:
                host = f"[{host}]"
            scheme = "https" if lst.ssl else "http"
            return f"{scheme}://{host}:{port}/status.json", lst
    raise CliError("the config has no http listener to ask; add one, e.g. "
                   "listeners: {http: {type: http, bind: \"127.0.0.1:8080\"}}")


def fetch_status(url: str, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise CliError(f"{url} answered {exc.code} {exc.reason}: is that a Roost broker?", EXIT_CONNECT) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason)
        raise CliError(f"no broker answers at {url} ({str(text).lower()}): is `roost serve` running?",
                       EXIT_CONNECT) from None
    except ValueError:
        raise CliError(f"{url} did not answer JSON: is that a Roost broker?", EXIT_CONNECT) from None
    if not isinstance(doc, dict):
        raise CliError(f"{url} did not answer a status document", EXIT_CONNECT)
    return doc


def _tls_context(cfg: RoostConfig, lst: ListenerConfig) -> ssl.SSLContext | None:
    if not lst.ssl:
        return None
    # The listener's own certificate as the trust anchor (often self-signed); the
    # address asked is a loopback one, not the name in the certificate.
    ctx = ssl.create_default_context(cafile=str(cfg.resolve(lst.cafile or lst.certfile or "")))
    ctx.check_hostname = False
    return ctx


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    parts.append(f"{minutes}m" if days or hours or minutes else f"{s}s")
    return " ".join(parts)


def render(doc: dict[str, Any]) -> str:
    """The status document as lines for a person."""
    c, ses, msg, ret, st = doc["connections"], doc["sessions"], doc["messages"], doc["retained"], doc["store"]
    state = "ready" if doc.get("ready") else "NOT READY: " + "; ".join(doc.get("problems", []))
    lines = [f"roost {doc['version']}, up {_duration(doc['uptime'])} ({state})"]
    for lst in doc["listeners"]:
        kind = lst["type"] + ("+tls" if lst["tls"] else "")
        where = f"{lst['name']} ({kind}) {lst['bind']}" + ("" if lst["bound"] else " NOT BOUND")
        if lst["type"] != "http":
            where += f": {lst['connections']} connected"
        lines.append(f"  listener     {where}")
    lines.append(f"  connections  {c['current']} now, {c['maximum']} at most, {c['accepted']} accepted since start")
    lines.append(f"  sessions     {ses['total']} ({ses['disconnected']} persistent, client away), "
                 f"{ses['subscriptions']} subscriptions")
    lines.append(f"  messages     {msg['received']} received, {msg['sent']} sent; {msg['inflight']} in flight, "
                 f"{msg['queued']} queued ({_bytes(msg['queued_bytes'])} held)")
    lines.append(f"  retained     {ret['count']} ({_bytes(ret['bytes'])})")
    engine = st.get("engine", "sqlite")
    store = st["path"] if engine == "sqlite" else f"{engine} {st['location']}"   # SQLite: the file alone
    if st.get("bytes") is not None:
        store += f", {_bytes(st['bytes'])}"
    store += ", " + ("writable" if st["writable"] else "CANNOT WRITE")
    if st.get("pending_writes"):
        store += f", {st['pending_writes']} writes waiting"
    lines.append(f"  store        {store}")
    cl = doc.get("cluster")
    if cl:
        peers = ", ".join(cl["peers"]) or "none"
        nats = "NATS connected" if cl["nats_connected"] else "NATS NOT CONNECTED"
        lines.append(f"  cluster      node {cl['node']}, {cl['nodes_alive']} nodes alive (others: {peers}); {nats}, "
                     f"{cl['nats_reconnects']} reconnects")
        lines.append(f"               {cl['sent']} sent, {cl['received']} received over NATS; "
                     f"{_bytes(cl['queued_bytes'])} queued, {cl['dropped']} dropped "
                     f"({_bytes(cl['dropped_bytes'])}), {cl['slow_consumer']} slow-consumer losses")
        lines.append(f"               {cl['nodes_dead']} dead nodes, {cl['wills_published']} wills published "
                     f"for them, {cl['sessions_adopted']} sessions adopted")
    recent = doc.get("recent_refusals", {})
    counts = recent.get("counts", {})
    window = _duration(recent.get("window", 0))
    if counts:
        lines.append(f"  refusals     last {window}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    else:
        lines.append(f"  refusals     none in the last {window}")
    limits = doc.get("limits", {})
    if limits:
        line = "  limits       "
        for i, (k, v) in enumerate(limits.items()):
            pair = f"{k} {_number(v)}" + ("," if i < len(limits) - 1 else "")
            if len(line) + len(pair) > 100 and line.strip() != "limits":
                lines.append(line.rstrip())
                line = " " * 15
            line += pair + " "
        lines.append(line.rstrip())
    return "\n".join(lines)


def _number(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


@click.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="ROOST_CONFIG",
              help="YAML config file of the broker (default: $ROOST_CONFIG or config/roost.yaml).")
@click.option("--url", default=None, help="Ask this /status.json instead of the config's http listener.")
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
def status(config_path: str | None, url: str | None, as_json: bool) -> None:
    """How the running broker is doing: uptime, connections, sessions, store,
    limits in force, recent refusals.

    \b
    Asks /status.json on the config's http listener (no credentials needed):
      roost status
      roost status --json | jq .connections
      roost status --url http://127.0.0.1:8080/status.json
    """
    context = None
    if url is None:
        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        url, lst = status_url(cfg)
        context = _tls_context(cfg, lst)
    doc = fetch_status(url, context)
    click.echo(json.dumps(doc) if as_json else render(doc))


def register(main: click.Group) -> None:
    main.add_command(status)
