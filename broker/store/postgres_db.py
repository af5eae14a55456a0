"""PostgreSQL plumbing: one asyncpg pool, transactions, the store's own errors, health figures.

Every sub-store of the PostgreSQL engine goes through `PgDatabase`:

    rows = await db.read(lambda conn: conn.fetch("SELECT ..."))      # one statement, no transaction
    value = await db.write(job)          # async def job(conn): ... in one transaction, retried on
                                         # serialization failures and deadlocks
    await db.autocommit(job)             # a job of ONE statement (atomic by itself): no BEGIN/COMMIT
    async with db.transaction() as conn: # the same transaction, for code that is not a function
        ...

`write` and `transaction` return only after COMMIT. asyncpg prepares each
statement once per connection and reuses it (its statement cache), so the same
SQL text is parsed once per pooled connection.

Errors: callers see the store's own (broker.store.base), never asyncpg's, for
what is the store's fault rather than the request's: the server unreachable,
restarting, or out of connections -> StoreUnavailable; out of disk -> StoreFull;
no connection free within `acquire_timeout`, too many waiting, or a transaction
that keeps losing serialization -> StoreBusy; after `close()` -> StoreClosed.
Errors of the statement itself (a unique key taken, a foreign key missing) pass
through unchanged for the sub-store to turn into AlreadyExists / NotFoundError.

Health (broker.store.base.StoreHealth): commits, write failures, the time since
when commits fail, transactions waiting for a connection. After an outage the
pool reconnects by itself on the next acquire: nothing to do but retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg import Connection

from broker.store.base import StoreBusy, StoreCannotOpen, StoreClosed, StoreFull, StoreUnavailable

log = logging.getLogger("roost.store")

T = TypeVar("T")

# SQLSTATE classes and codes that mean "the store cannot work now", not "this statement is wrong".
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58", "XX")   # connection, resources, operator intervention, system, internal
_UNAVAILABLE_CODES = {"25006"}                           # read-only transaction (a standby, or default_transaction_read_only)
_DISK_FULL = "53100"
_TOO_MANY_CONNECTIONS = "53300"
SIZE_TIMEOUT = 2.0                                       # seconds for the monitor's pg_database_size
_RETRYABLE = {"40001", "40P01"}                          # serialization failure, deadlock: run the transaction again


class _Retryable(StoreBusy):
    """A serialization failure or deadlock: `write` runs its job again; when it keeps
    failing the caller sees StoreBusy."""


def redacted_dsn(dsn: str) -> str:
    """The dsn without its password (for logs, errors and StoreHealth.location)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "postgresql://?"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.username:
        host = f"{parts.username}@{host}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def as_store_error(exc: BaseException) -> BaseException:
    """`exc` as the store's own error when it says the store cannot work now;
    `exc` itself otherwise (the caller's statement was wrong, or it is ours)."""
    unchanged: BaseException = exc
    if isinstance(exc, (StoreUnavailable, StoreClosed, StoreCannotOpen)):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        code = str(getattr(exc, "sqlstate", "") or "")
        if code in _RETRYABLE:
            return _wrap(_Retryable, f"store transaction conflicted: {_one_line(exc)}", exc)
        if code == _DISK_FULL:
            return _wrap(StoreFull, f"store cannot write: {_one_line(exc)}", exc)
        if code == _TOO_MANY_CONNECTIONS:
            return _wrap(StoreBusy, f"store has no connection free: {_one_line(exc)}", exc)
        if code[:2] in _UNAVAILABLE_CLASSES or code in _UNAVAILABLE_CODES:
            return _wrap(StoreUnavailable, f"store unavailable: {_one_line(exc)}", exc)
        return unchanged
    if isinstance(exc, asyncpg.InterfaceError):
        # a connection lost mid-use, or one the pool closed under us
        text = str(exc)
        if "closed" in text or "lost" in text or "connection" in text:
            return _wrap(StoreUnavailable, f"store unavailable: {_one_line(exc)}", exc)
        return unchanged
    if isinstance(exc, asyncpg.InternalClientError):
        # asyncpg's protocol state after the server died under a statement
        # ("cannot switch to state ...; another operation is in progress"): the
        # connection is broken, not the request; seen when PostgreSQL is killed
        return _wrap(StoreUnavailable, f"store unavailable: {_one_line(exc)}", exc)
    if isinstance(exc, (OSError, TimeoutError, ConnectionError, EOFError)):
        return _wrap(StoreUnavailable, f"store unavailable: {_one_line(exc) or type(exc).__name__}", exc)
    return exc


def _wrap(kind: type[Exception], text: str, cause: BaseException) -> Exception:
    err = kind(text)
    err.__cause__ = cause
    return err


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


async def _keep_session(conn: Connection) -> None:
    """The pool's reset between uses: nothing beyond asyncpg's own rollback of an open
    transaction. The store never changes session state (no SET, LISTEN, cursors or
    session-level advisory locks; its locks are transaction-scoped), so the default
    reset (RESET ALL; UNLISTEN *; ...) would be a round trip per use for nothing."""


class PgDatabase:
    """One asyncpg pool on `dsn`, with the store's error mapping and health figures.

    `pool_size` bounds the connections this node holds; `max_waiting` bounds the
    transactions waiting for one (beyond it: StoreBusy at once)."""

    def __init__(self, dsn: str, *, pool_size: int = 10, min_size: int = 0, acquire_timeout: float = 10.0,
                 connect_timeout: float = 5.0, command_timeout: float = 30.0, max_waiting: int = 10000,
                 write_retries: int = 20) -> None:
        self.dsn = dsn
        self.pool_size = max(1, pool_size)
        self._min_size = max(0, min(min_size, self.pool_size))
        self._acquire_timeout = acquire_timeout
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._max_waiting = max_waiting
        self._write_retries = max(1, write_retries)
        self._pool: Any = None
        self._closed = False
        self._waiting = 0
        self.commits = 0
        self.write_failures = 0                       # write transactions that failed for the store's sake
        self.retries = 0                              # write transactions run again after a conflict
        self.unavailable_since: float | None = None   # set while the server cannot be used
        # called with each write transaction's seconds (the monitor's histogram); must be quick and not raise
        self.on_commit: Callable[[float], None] | None = None

    # ---- StoreHealth -------------------------------------------------------
    @property
    def engine(self) -> str:
        return "postgres"

    @property
    def location(self) -> str:
        """The server and database (no password)."""
        return redacted_dsn(self.dsn)

    async def size(self) -> int | None:
        """pg_database_size of this database (a stat of its files on the server);
        None while the server cannot answer within SIZE_TIMEOUT."""
        if self._pool is None:
            return None
        try:
            async with self._pool.acquire(timeout=SIZE_TIMEOUT) as conn:
                size = await conn.fetchval("SELECT pg_database_size(current_database())", timeout=SIZE_TIMEOUT)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            return None
        return int(size)

    @property
    def pending_writes(self) -> int:
        """Transactions waiting for a connection of the pool."""
        return self._waiting

    # ---- lifecycle -----------------------------------------------------------
    @property
    def pool(self) -> Any:
        """The asyncpg.Pool (after `open()`)."""
        if self._pool is None:
            raise StoreClosed("store is closed") if self._closed else RuntimeError("PgDatabase is not open")
        return self._pool

    async def open(self) -> None:
        """Create the pool (its first connection proves the server is there).
        Raises StoreCannotOpen with one line saying why not."""
        if self._closed:
            raise StoreClosed("store is closed")
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self._min_size, max_size=self.pool_size, timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": "roost", "jit": "off"}, reset=_keep_session)
            # No floor of idle connections by default (min_size 0): asyncpg would
            # restore one in the background during an outage, logging a traceback
            # per attempt. One connection now proves the server is there.
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                await conn.fetchval("SELECT 1")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, ValueError) as exc:
            raise StoreCannotOpen(f"cannot connect to {redacted_dsn(self.dsn)}: "
                                  f"{_one_line(exc) or type(exc).__name__}") from None

    async def close(self) -> None:
        """Wait (a while) for transactions in progress, then close every connection;
        closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), 10.0)
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            pool.terminate()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- connections and transactions -----------------------------------------
    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection (no transaction), errors mapped."""
        if self._closed:
            raise StoreClosed("store is closed")
        if self._waiting >= self._max_waiting:
            raise StoreBusy(f"{self._waiting} store transactions are waiting for a connection")
        pool = self.pool
        self._waiting += 1
        try:
            conn = await pool.acquire(timeout=self._acquire_timeout)
        except TimeoutError:
            raise StoreBusy(f"no store connection free within {self._acquire_timeout:g} s") from None
        except BaseException as exc:
            mapped = self._failed(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            self._waiting -= 1
        try:
            yield conn
        except BaseException as exc:
            mapped = self._failed(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            try:
                await pool.release(conn)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                pass   # the connection is gone: the pool makes a new one when needed

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False,
                          isolation: str = "read_committed") -> AsyncIterator[Connection]:
        """`async with db.transaction() as conn:` one transaction, committed when the
        block ends (rolled back when it raises), errors mapped. Not retried: use
        `write` for work that may conflict."""
        began = time.perf_counter()
        async with self.connection() as conn:
            async with conn.transaction(isolation=isolation, readonly=readonly):
                yield conn
        if not readonly:
            self._committed(time.perf_counter() - began)

    async def write(self, job: Callable[[Connection], Awaitable[T]], *, isolation: str = "read_committed") -> T:
        """Run `await job(conn)` in one transaction; returns after COMMIT. Run again
        (a bounded number of times) after a serialization failure or deadlock, so
        a job must change nothing but the database (its result is what counts)."""
        for attempt in range(self._write_retries):
            try:
                async with self.transaction(isolation=isolation) as conn:
                    result = await job(conn)
                return result
            except _Retryable:
                if attempt + 1 >= self._write_retries:
                    raise
                self.retries += 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def autocommit(self, job: Callable[[Connection], Awaitable[T]]) -> T:
        """`write` for a job of exactly one statement, which is atomic by itself: no
        BEGIN and COMMIT round trips. Returns after it committed; re-run as `write`."""
        for attempt in range(self._write_retries):
            began = time.perf_counter()
            try:
                async with self.connection() as conn:
                    result = await job(conn)
                self._committed(time.perf_counter() - began)
                return result
            except _Retryable:
                if attempt + 1 >= self._write_retries:
                    raise
                self.retries += 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def read(self, job: Callable[[Connection], Awaitable[T]], *, snapshot: bool = False) -> T:
        """Run `await job(conn)` on a pooled connection: outside a transaction (each
        statement sees what is committed when it starts), or with `snapshot` in one
        read-only REPEATABLE READ transaction (every statement sees the same state)."""
        if snapshot:
            async with self.transaction(readonly=True, isolation="repeatable_read") as conn:
                return await job(conn)
        async with self.connection() as conn:
            return await job(conn)

    # ---- health ----------------------------------------------------------------
    def _committed(self, seconds: float) -> None:
        self.commits += 1
        if self.unavailable_since is not None:
            log.warning("store %s works again after %.1f s (%d failed writes)", redacted_dsn(self.dsn),
                        time.time() - self.unavailable_since, self.write_failures)
            self.unavailable_since = None
        if self.on_commit is not None:
            self.on_commit(seconds)

    def _failed(self, exc: BaseException) -> BaseException:
        """Map `exc` and account for a failure of the store (not of the statement)."""
        if self._closed and isinstance(exc, (asyncpg.InterfaceError, OSError)):
            return _wrap(StoreClosed, "store is closed", exc)
        mapped = as_store_error(exc)
        if isinstance(mapped, StoreUnavailable) and not isinstance(mapped, (StoreBusy, StoreClosed)):
            self.write_failures += 1
            if self.unavailable_since is None:
                # once per outage, not once per failed transaction
                self.unavailable_since = time.time()
                log.error("store %s cannot be used (%s): answering `unavailable` until it can",
                          redacted_dsn(self.dsn), mapped)
        return mapped
