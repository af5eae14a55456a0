"""The person's CLI configuration: which server, who they are, and their secret.

One small JSON file, `${XDG_CONFIG_HOME:-~/.config}/roost/client.json`, written by
`roost login` with mode 0600 (it holds a secret) and removed by `roost logout`.
Every value can be overridden per command: flags first, then `ROOST_*`
environment variables, then the file. Per-label inbox cursors live apart from it,
in the state directory (`${XDG_STATE_HOME:-~/.local/state}/roost`), because they
change all the time and are not configuration.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
FILE_NAME = "client.json"

# Environment variables (documented in docs/CLI.md).
ENV_SERVER = "ROOST_SERVER"
ENV_USER = "ROOST_USER"
ENV_PASSWORD = "ROOST_PASSWORD"
ENV_SECRET = "ROOST_SECRET"          # same as ROOST_PASSWORD (a device-style name)
ENV_TLS = "ROOST_TLS"
ENV_CA = "ROOST_CA"
ENV_CLIENT_CONFIG = "ROOST_CLIENT_CONFIG"  # another config file (ROOST_CONFIG is the broker's)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$|^\[[0-9A-Fa-f:.]+\]$")


class ClientConfigError(ValueError):
    """The config file or an override is unusable; the message says which and why."""


@dataclass
class ClientConfig:
    """What `roost login` stores."""

    server: str = DEFAULT_SERVER
    user: str | None = None
    secret: str | None = None
    tls: bool = False
    ca_file: str | None = None


@dataclass(frozen=True)
class Server:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything a network command needs, after flags, environment and file are merged."""

    server: Server
    user: str | None
    secret: str | None = field(repr=False)
    tls: bool
    ca_file: str | None
    source: dict[str, str] = field(default_factory=dict)  # where each value came from


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "roost"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    override = env.get(ENV_CLIENT_CONFIG)
    return Path(override) if override else config_dir(env) / FILE_NAME


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "roost"


def parse_server(text: str, *, tls: bool = False) -> Server:
    """`host`, `host:port`, `[::1]:port` -> Server; a clear error for anything else."""
    text = text.strip()
    if text.startswith("mqtt://") or text.startswith("mqtts://"):
        tls = tls or text.startswith("mqtts://")
        text = text.split("://", 1)[1]
    default_port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host or port_text is None or not _HOST_RE.match(host if ":" not in host else f"[{host}]"):
        raise ClientConfigError(f"server '{text}' is not HOST or HOST:PORT")
    if port_text == "":
        return Server(host, default_port)
    if not port_text.isdigit() or not (1 <= int(port_text) <= 65535):
        raise ClientConfigError(f"server port '{port_text}' is not a number from 1 to 65535")
    return Server(host, int(port_text))


def server_tls(text: str, tls: bool) -> bool:
    """Whether to use TLS for the address `text`: an `mqtts://` URL says so by itself;
    anything else leaves `tls` (from --tls, ROOST_TLS or the stored login) as it is."""
    return tls or text.strip().startswith("mqtts://")


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ClientConfigError(f"{name}='{value}' is not a yes/no value (use 1/0, true/false, yes/no, on/off)")


def load(path: Path | None = None) -> ClientConfig | None:
    """The stored config, None when there is none; ClientConfigError when it is damaged."""
    path = path or config_path()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ClientConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ClientConfigError(f"{path} is not valid JSON ({e}); fix it or run `roost logout`") from None
    if not isinstance(doc, dict):
        raise ClientConfigError(f"{path} must hold a JSON object; fix it or run `roost logout`")
    known = {f for f in ClientConfig.__dataclass_fields__}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ClientConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    for key in ("server", "user", "secret", "ca_file"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise ClientConfigError(f"{path}: '{key}' must be a string")
    if not isinstance(doc.get("tls", False), bool):
        raise ClientConfigError(f"{path}: 'tls' must be true or false")
    return ClientConfig(**doc)


def save(cfg: ClientConfig, path: Path | None = None) -> Path:
    """Write atomically with mode 0600 from the first byte (the file holds a secret)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".client-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(cfg), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def remove(path: Path | None = None) -> bool:
    path = path or config_path()
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def resolve(
    *,
    server: str | None = None,
    user: str | None = None,
    password: str | None = None,
    tls: bool | None = None,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> Settings:
    """Merge flags > environment > config file into Settings.

    A stored secret belongs to the stored user only: `--user bob` with a file for
    alice does not send alice's secret (a password must come from elsewhere).
    """
    env = os.environ if env is None else env
    stored = load(path or config_path(env)) or ClientConfig()
    source: dict[str, str] = {}

    def pick(name: str, flag, env_names: tuple[str, ...], file_value):
        if flag is not None:
            source[name] = "option"
            return flag
        for en in env_names:
            if env.get(en):
                source[name] = en
                return env[en]
        if file_value is not None:
            source[name] = "config"
        return file_value

    tls_env = env.get(ENV_TLS)
    if tls is not None:
        use_tls = tls
    elif tls_env is not None and tls_env != "":
        use_tls = parse_bool(ENV_TLS, tls_env)
    else:
        use_tls = stored.tls
    server_text = pick("server", server, (ENV_SERVER,), stored.server) or DEFAULT_SERVER
    who = pick("user", user, (ENV_USER,), stored.user)
    if who is not None and not re.match(r"^[a-z0-9][a-z0-9_-]{0,31}$", who):
        raise ClientConfigError(f"user id '{who}' is not valid (lowercase letters, digits, '_' and '-', at most 32)")
    file_secret = stored.secret if (stored.user is not None and stored.user == who) else None
    secret = pick("secret", password, (ENV_PASSWORD, ENV_SECRET), file_secret)
    use_tls = server_tls(server_text, use_tls)
    ca_file = env.get(ENV_CA) or stored.ca_file
    return Settings(
        server=parse_server(server_text, tls=use_tls),
        user=who,
        secret=secret,
        tls=use_tls,
        ca_file=ca_file,
        source=source,
    )
