"""A private PostgreSQL server for tests: Debian's binaries, a temp folder, a free port.

`PostgresServer` runs initdb and postgres from /usr/lib/postgresql/<version>/bin
(the newest installed) with its data directory and unix socket in a temp folder
and TCP on 127.0.0.1 only, trust authentication for the superuser `roost`.
PostgreSQL refuses to run as root: when this process is root, both run as
`nobody` (the temp folder is handed to it), otherwise as the current user.

`fsync=False` (the default) trades durability for speed: right for the store
contract suite, wrong for a test that kills the server and checks what survived
(pass `fsync=True` there). Everything waits on conditions (pg_isready answering,
the process gone), never on fixed sleeps.

    server = PostgresServer().start()
    server.create_database("t1")              # empty; or template="..." to copy one
    dsn = server.dsn("t1")                     # postgresql://roost@127.0.0.1:PORT/t1
    server.kill(); server.start()              # an outage (SIGKILL) and the recovery
    server.stop()                              # and remove() deletes the folder
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "roost"


def postgres_bin_dir() -> Path:
    """The bin folder of the newest PostgreSQL installed (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/postgres); "
                           "scripts/test installs Debian's postgresql")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self, root: Path | None = None, *, fsync: bool = False, port: int | None = None,
                 max_connections: int = 300) -> None:
        self.bin = postgres_bin_dir()
        # as root the server runs as nobody, who must reach the folder: /tmp rather
        # than a $TMPDIR that may sit in root's private home
        default_parent = "/tmp" if os.geteuid() == 0 and os.path.isdir("/tmp") else None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="roost-pg-", dir=default_parent))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.port = port or free_port()
        self.fsync = fsync
        self.max_connections = max_connections
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: int | None = None
        # root may not run PostgreSQL: run it as nobody, in a folder nobody owns
        self._user: pwd.struct_passwd | None = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    # ---- lifecycle -----------------------------------------------------------
    def _run_as(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=str(self.root), LC_ALL="C", LANG="C")
        return env

    def _initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self._user is not None:
            for p in (self.root, self.sockets):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.root, 0o700)
        out = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            capture_output=True, env=self._env(), cwd=self.root, timeout=120, **self._run_as())  # type: ignore[call-overload]
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr.decode(errors='replace').strip()}")

    def start(self, timeout: float = 30.0) -> PostgresServer:
        """Start (initdb on first start) and return once it accepts connections."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.sockets),
            "max_connections": str(self.max_connections),
            "shared_buffers": "32MB",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        args = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        if self._log is None:
            self._log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
                                      env=self._env(), cwd=self.root, start_new_session=True,
                                      **self._run_as())  # type: ignore[call-overload]
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._proc.returncode}: {self.log_tail()}")
            ready = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                                    "-U", SUPERUSER, "-d", "postgres", "-t", "1"], env=self._env())
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept connections within {timeout} s: {self.log_tail()}")
            time.sleep(0.05)   # pg_isready answered "starting": ask again

    def stop(self, timeout: float = 30.0) -> None:
        """A fast shutdown (SIGINT: open sessions are ended, the data is flushed)."""
        self._signal(signal.SIGINT, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (an outage; recovery runs at the next start)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: the backends go too
        except ProcessLookupError:
            pass
        proc.wait(10)
        # backends may outlive the postmaster for a moment: wait until none holds the port
        deadline = time.monotonic() + 10
        while self._port_in_use() and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self, timeout: float = 30.0) -> PostgresServer:
        self.stop(timeout)
        return self.start(timeout)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def _port_in_use(self) -> bool:
        """Something still listens on the port (SO_REUSEADDR as postgres: connections
        in TIME_WAIT do not count)."""
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                return True
        return False

    def remove(self) -> None:
        """Stop (if running) and delete the folder."""
        self.stop()
        if self._log is not None:
            os.close(self._log)
            self._log = None
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- databases -----------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql (blocking; fine in fixtures and outside an event loop's hot path)."""
        out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                              "-p", str(self.port), "-U", SUPERUSER, "-d", dbname, "-c", sql],
                             capture_output=True, env=self._env(), timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.decode(errors='replace').strip()}")
        return out.stdout.decode()

    def create_database(self, name: str, template: str = "template0", *, replace: bool = False) -> str:
        """A new database, a copy of `template` (template0 is empty); `replace` drops
        one of that name first. Returns its dsn. FILE_COPY: with fsync off, copying
        the files is about twice as fast as WAL-logging a small template."""
        if replace:
            self.drop_database(name)
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PostgresDatabases:
    """Fresh databases on one server, one per test: `fresh()` copies a template
    that already has Roost's schema migrated (made once, on first use; CREATE
    DATABASE from it takes a few milliseconds), `fresh(migrated=False)` is empty."""

    TEMPLATE = "roost_template"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._made = 0
        self._template_ready = False

    def _name(self, prefix: str) -> str:
        self._made += 1
        return f"{prefix}_{os.getpid()}_{self._made}"

    def fresh(self, *, migrated: bool = True, prefix: str = "t") -> str:
        """The dsn of a new database (migrated: Roost's current schema, no rows)."""
        if not migrated:
            return self.server.create_database(self._name(prefix))
        if not self._template_ready:
            self._make_template()
        return self.server.create_database(self._name(prefix), template=self.TEMPLATE)

    def _make_template(self) -> None:
        import asyncio
        import threading

        dsn = self.server.create_database(self.TEMPLATE)
        failure: list[BaseException] = []

        async def migrate() -> None:
            from broker.store.postgres import PgStore

            store = PgStore(dsn, pool_size=1)
            try:
                await store.open()
            finally:
                await store.close()

        def run() -> None:   # a thread of its own: the caller may be inside an event loop
            try:
                asyncio.run(migrate())
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if failure:
            raise failure[0]
        self._template_ready = True
