"""Roost configuration: YAML in, typed dataclasses out, every mistake refused at start.

`load_config(path)` returns a `RoostConfig` or raises `ConfigError` naming the key
path and what is wrong, so the broker never starts half-configured.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "roost.yaml"
CONFIG_ENV = "ROOST_CONFIG"


class ConfigError(ValueError):
    """A configuration problem, with the dotted key path where it was found."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"config error at '{path}': {problem}" if path else f"config error: {problem}")
        self.path = path
        self.problem = problem


@dataclass
class ListenerConfig:
    # http: not MQTT; /metrics, /healthz, /readyz, /status.json (broker/http/)
    type: Literal["tcp", "ws", "http"] = "tcp"
    bind: str = "127.0.0.1:1883"
    ssl: bool = False
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    max_connections: int = 0  # 0: only limits.max_connections applies


@dataclass
class StorageConfig:
    """`backend: sqlite` (the default: one file at `path`) or `backend: postgres`
    (`dsn: postgresql://user:password@host:5432/db`, `pool_size` connections per
    node); docs/STORAGE.md."""
    path: str = "data/roost.db"
    backend: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str = ""
    pool_size: int = 10


@dataclass
class JwtConfig:
    """JWT logins (broker/services/jwt_auth.py checks the keys at start)."""
    secret: str = ""                            # HMAC (HS256/384/512)
    # Accepted `alg`s; empty: HS256 with a secret, plus each public key's own
    # (RS256 for RSA, ES256/384/512 by EC curve, EdDSA, a JWKS key's `alg`).
    algorithms: list[str] = field(default_factory=list)
    algorithm: str | None = None                # older single-algorithm form of `algorithms`
    public_key_file: str | None = None          # PEM public key or certificate
    jwks_file: str | None = None                # JWKS JSON, keys chosen by `kid`; re-read when it changes
    audience: str | None = None                 # required `aud` (e.g. the IdP's client id for Roost)
    issuer: str | None = None                   # required `iss`
    leeway: float = 30.0                        # seconds of issuer clock ahead allowed for `iat`/`nbf`


@dataclass
class AuthConfig:
    allow_anonymous: bool = False
    # Failed CONNECTs from one address are slowed down: each failure adds this
    # much delay, capped; the table of addresses is bounded.
    failure_delay: float = 0.5
    failure_delay_max: float = 5.0
    failure_table_size: int = 10000
    # CONNECTs of one address authenticated at once (the rest wait their turn), so
    # parallel guesses do not multiply the guessing rate.
    max_concurrent_per_address: int = 1
    jwt: JwtConfig | None = None


@dataclass
class AclRule:
    action: Literal["allow", "deny"]
    access: Literal["publish", "subscribe", "all"]
    topic: str
    who: str = "*"


@dataclass
class LimitsConfig:
    max_payload: int = 1024 * 1024          # bytes of one MQTT PUBLISH payload
    max_connections: int = 10000            # across all listeners
    max_inflight: int = 100                 # un-acked QoS 1/2 messages to one client
    max_queued: int = 1000                  # messages queued per session (offline or behind inflight)
    # Byte budgets (issue 10): what one client can make the broker hold
    max_queued_bytes: int = 8 * 1024 * 1024              # payload bytes queued + in flight, per session
    max_queued_bytes_per_principal: int = 32 * 1024 * 1024   # the same over all sessions of one principal
    max_queued_bytes_total: int = 128 * 1024 * 1024      # the same over all sessions
    max_retained_bytes: int = 64 * 1024 * 1024           # retained messages in total (payload + topic + overhead)
    max_retained_bytes_per_principal: int = 16 * 1024 * 1024  # retained messages one principal published
    max_persistent_sessions_per_principal: int = 16      # clean_session=0 sessions kept for one principal
    max_subscription_bytes_total: int = 64 * 1024 * 1024  # estimated index memory of every subscription
    max_pending_bytes: int = 4 * 1024 * 1024             # bytes of packets read but waiting behind an awaited one, per connection
    max_body: int = 64 * 1024               # bytes of a message `body` (too_large beyond)
    max_subscriptions: int = 1000           # topic filters per session
    request_rate: float = 50.0              # requests per second per principal, all its clients (token bucket)
    request_burst: int = 200                # bucket size
    contact_request_cooldown: float = 3600.0  # seconds before a new contact request to the same person
    contact_requests_per_hour: int = 30     # new contact requests one person receives per hour (0: no bound)
    max_pending_requests: int = 100         # requests of one client being processed at once
    # MQTT 5 (issue 13; docs/MQTT5.md)
    session_expiry: float = 7 * 86400.0     # seconds a disconnected MQTT 3.1.1/3.1 persistent session is kept
    max_keepalive: int = 60                 # MQTT 5: a longer (or no) keepalive asked for is lowered (Server Keep Alive)
    topic_alias_maximum: int = 10           # MQTT 5: topic aliases a client may set per connection (0: none)
    # MQTT 5 SUBACK code for a filter the ACL denies: 135 (0x87 not authorized), or 128 (0x80
    # unspecified error: what Paho's interoperability suite insists on, docs/MQTT5.md)
    subscribe_denied_code: int = 0x87


@dataclass
class MailboxConfig:
    max_events: int = 10000
    ttl: float = 30 * 86400.0  # seconds; YAML may say "30d", "12h", "15m", "45s"


@dataclass
class MessagingConfig:
    # Until contacts are accepted, direct messages need this switch (issue 3).
    allow_dm_without_contact: bool = False


@dataclass
class InfluxConfig:
    url: str = ""
    org: str = ""
    bucket: str = ""
    token: str = ""
    batch_size: int = 500
    flush_interval: float = 1.0
    buffer_size: int = 100000
    max_retry_delay: float = 30.0
    # Seconds one write request may take before it counts as failed. Long: a
    # server that is only slow (or paused) may still store a timed-out batch, and
    # a server without InfluxDB's overwrite semantics (VictoriaMetrics) would then
    # keep the retry's copy too.
    timeout: float = 30.0


@dataclass
class TelemetryConfig:
    influxdb: InfluxConfig | None = None
    max_fields: int = 64
    # The recent history `device.history` answers from (charts without InfluxDB):
    # at most one point per device every history_interval, history_points per device, none older than history_ttl.
    history_interval: float = 10.0
    history_points: int = 2880
    history_ttl: float = 86400.0


@dataclass
class FilesConfig:
    """Pictures and files sent in messages (docs/PROTOCOL.md, "Files")."""
    # Content-addressed blobs and uploads in progress; "": a `files` folder beside storage.path.
    path: str = ""
    max_size: int = 10 * 1024 * 1024        # bytes of one file (too_large beyond)
    quota: int = 1024 * 1024 * 1024         # bytes one principal may have uploaded (quota_exceeded beyond)
    max_uploading: int = 256 * 1024 * 1024  # bytes of uploads in progress, all principals together
    upload_ttl: float = 600.0               # an upload idle this long is abandoned and its bytes deleted


@dataclass
class HomeAssistantConfig:
    enabled: bool = False
    service_account: str = "homeassistant"
    discovery_prefix: str = "homeassistant"
    # Seconds between checks for devices added or removed by `roost device add/remove`
    # (another process): their discovery is published or removed within this time.
    resync_interval: float = 10.0


@dataclass
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass
class NatsConfig:
    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])


@dataclass
class ClusterConfig:
    """One node of a cluster (docs/CLUSTER.md): nodes meet on NATS; without a
    `cluster:` section Roost is one node exactly as before."""
    node: str = ""                      # unique name of this node (letters, digits, - and _)
    nats: NatsConfig = field(default_factory=NatsConfig)
    node_timeout: float = 15.0          # a node not heard from for this long is dead
    max_pending_bytes: int = 8 * 1024 * 1024   # bytes waiting for NATS; beyond that dropped, counted
    # per destination node: publishes sent to it kept until it acks them (resent if lost); beyond, the oldest
    # is given up, counted (roost_dropped_total{reason="cluster_resend_full"})
    resend_buffer_bytes: int = 8 * 1024 * 1024


@dataclass
class RoostConfig:
    listeners: dict[str, ListenerConfig] = field(default_factory=lambda: {"default": ListenerConfig()})
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    acl: list[AclRule] = field(default_factory=list)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)
    messaging: MessagingConfig = field(default_factory=MessagingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig | None = None
    # Seconds between $SYS publications (Mosquitto's sys_interval); 0: no $SYS at all
    sys_interval: float = 10.0
    # Where relative paths (storage.path, certificates) are resolved from.
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def files_dir(self) -> Path:
        """Where files are kept (files.path, by default beside the SQLite store)."""
        return self.resolve(self.files.path) if self.files.path else self.resolve(self.storage.path).parent / "files"


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_FIELDS = {("MailboxConfig", "ttl"), ("LimitsConfig", "contact_request_cooldown"), ("JwtConfig", "leeway"),
                    ("LimitsConfig", "session_expiry"),
                    ("ClusterConfig", "node_timeout"), ("TelemetryConfig", "history_interval"),
                    ("TelemetryConfig", "history_ttl"), ("FilesConfig", "upload_ttl")}


def parse_duration(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(path, "expected a duration such as 30d, 12h or 3600")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(path, "must not be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION_RE.match(value)):
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(path, f"expected a duration such as 30d, 12h or 3600, got {value!r}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, "expected a mapping")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, "expected a list")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected a whole number, got {value!r}")
        if value < 0:
            raise ConfigError(path, "must not be negative")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(path, "must not be negative")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise ConfigError(path, f"unsupported type {tp}")  # pragma: no cover


def _build(cls: Any, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, "expected a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known or key == "base_dir":
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known - {'base_dir'}))})")
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data:
            raise ConfigError(f"{path}.{f.name}" if path else f.name, "required")
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if (cls.__name__, key) in _DURATION_FIELDS:
            kwargs[key] = parse_duration(value, where)
        else:
            kwargs[key] = _convert(hints[key], value, where)
    return cls(**kwargs)


def _check_cluster(cluster: ClusterConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cluster.node):
        raise ConfigError("cluster.node", f"expected a unique node name of letters, digits, - and _, got {cluster.node!r}")
    if not cluster.nats.servers:
        raise ConfigError("cluster.nats.servers", "at least one nats://host:port is needed")
    for i, url in enumerate(cluster.nats.servers):
        if not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"cluster.nats.servers[{i}]", f"expected nats://host:port, got {url!r}")
    if cluster.node_timeout < 1:
        raise ConfigError("cluster.node_timeout", "must be at least 1s")
    if cluster.max_pending_bytes < 65536:
        raise ConfigError("cluster.max_pending_bytes", "must be at least 65536")
    if cluster.resend_buffer_bytes < 65536:
        raise ConfigError("cluster.resend_buffer_bytes", "must be at least 65536")


def _check(cfg: RoostConfig) -> None:
    if not cfg.listeners:
        raise ConfigError("listeners", "at least one listener is needed")
    if all(lst.type == "http" for lst in cfg.listeners.values()):
        raise ConfigError("listeners", "at least one MQTT listener (type tcp or ws) is needed")
    for name, lst in cfg.listeners.items():
        host, _, port = lst.bind.rpartition(":")
        if not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listeners.{name}.bind", f"expected HOST:PORT, got {lst.bind!r}")
        if lst.ssl:
            for key in ("certfile", "keyfile"):
                if not getattr(lst, key):
                    raise ConfigError(f"listeners.{name}.{key}", "required when ssl is true")
        for key in ("certfile", "keyfile", "cafile"):
            value = getattr(lst, key)
            if value and not cfg.resolve(value).is_file():
                raise ConfigError(f"listeners.{name}.{key}", f"file not found: {value}")
    if cfg.storage.backend == "postgres":
        if not cfg.storage.dsn:
            raise ConfigError("storage.dsn", "required when storage.backend is postgres (postgresql://user@host:5432/db)")
        if not cfg.storage.dsn.startswith(("postgresql://", "postgres://")):
            raise ConfigError("storage.dsn", "expected a postgresql://user@host:5432/db URL")
        if cfg.storage.pool_size < 1:
            raise ConfigError("storage.pool_size", "must be at least 1")
    if cfg.cluster is not None:
        _check_cluster(cfg.cluster)
    if cfg.limits.max_inflight < 1:
        raise ConfigError("limits.max_inflight", "must be at least 1")
    if not 1 <= cfg.limits.max_keepalive <= 65535:
        raise ConfigError("limits.max_keepalive", "must be between 1 and 65535 seconds")
    if cfg.limits.topic_alias_maximum > 65535:
        raise ConfigError("limits.topic_alias_maximum", "must be at most 65535")
    if cfg.limits.subscribe_denied_code not in (0x80, 0x87):
        raise ConfigError("limits.subscribe_denied_code", "must be 135 (0x87 not authorized) or 128 (0x80)")
    if cfg.mailbox.max_events < 1:
        raise ConfigError("mailbox.max_events", "must be at least 1")
    if cfg.auth.max_concurrent_per_address < 1:
        raise ConfigError("auth.max_concurrent_per_address", "must be at least 1")
    if cfg.auth.jwt is not None:
        from broker.services.jwt_auth import build_verifier

        build_verifier(cfg.auth.jwt, cfg.resolve)   # reads the key files: a bad one stops the start here
    influx = cfg.telemetry.influxdb
    if influx is not None:
        for key in ("url", "bucket"):
            if not getattr(influx, key):
                raise ConfigError(f"telemetry.influxdb.{key}", "required when telemetry.influxdb is set")
    from contract.ids import PRINCIPAL_KINDS, is_valid_principal_id

    if cfg.homeassistant.enabled and not is_valid_principal_id(cfg.homeassistant.service_account):
        raise ConfigError("homeassistant.service_account", "not a valid principal id")
    prefix = cfg.homeassistant.discovery_prefix
    if not prefix or prefix.startswith(("/", "$")) or prefix.endswith("/") or any(c in prefix for c in "+#\0") \
            or prefix == "roost" or prefix.startswith("roost/"):
        raise ConfigError("homeassistant.discovery_prefix", f"not a usable topic prefix: {prefix!r}")
    from broker.mqtt.topics import valid_topic_filter

    for i, rule in enumerate(cfg.acl):
        if not rule.topic:
            raise ConfigError(f"acl[{i}].topic", "must not be empty")
        if not valid_topic_filter(rule.topic.replace("%u", "u").replace("%c", "c")):
            raise ConfigError(f"acl[{i}].topic", f"not a valid MQTT topic filter: {rule.topic!r}")
        who = rule.who
        if not (who in ("*", "anonymous") or is_valid_principal_id(who)
                or (who.startswith("kind:") and who[5:] in PRINCIPAL_KINDS)):
            raise ConfigError(f"acl[{i}].who", f"expected \"*\", anonymous, a principal id or "
                                               f"kind:user|device|service, got {who!r}")


def config_from_dict(data: Any, base_dir: str = ".") -> RoostConfig:
    cfg: RoostConfig = _build(RoostConfig, data, "")
    cfg.base_dir = base_dir
    _check(cfg)
    return cfg


def default_config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str] | None = None) -> RoostConfig:
    """Read and validate the YAML file (default: $ROOST_CONFIG or config/roost.yaml).

    Relative paths inside are resolved from the current directory for the
    bundled default file, and from the file's own folder otherwise.
    """
    p = Path(path) if path is not None else default_config_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {p}") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # One line (PyYAML's own text spans several, with a caret drawing): where and what.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError("", f"{p} is not valid YAML{where}: {what}") from None
    base = "." if p.resolve() == DEFAULT_CONFIG_PATH else str(p.resolve().parent)
    return config_from_dict(data or {}, base_dir=base)
