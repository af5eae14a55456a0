"""SQLite plumbing: one writer thread with group commit, one reader thread, migrations.

Every write is a function `fn(conn) -> result` run on the writer thread. The
writer takes every job waiting in its queue (up to `batch_max`), runs each in its
own SAVEPOINT inside one transaction, commits once (one fsync for the batch) and
only then resolves the callers' futures: an awaited `write()` means committed.
A job that raises rolls back its own savepoint only; the others still commit.

Reads run on a separate thread and connection (WAL lets them proceed while the
writer writes). Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from broker.store.base import StoreBusy, StoreClosed, StoreFull, StoreUnavailable

log = logging.getLogger("roost.store")

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]


class ResultSink(Protocol):
    """Where a job's outcome goes, on its event loop, after COMMIT: an asyncio.Future,
    or (submit_to) an object that answers its own waiters without a future's extra
    turn of the loop (the messaging batch)."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...

# A migration is (unique name, SQL script). Names are recorded once applied.
# A step that needs Python (hashing existing rows) is a function of the
# connection instead of a script; it runs inside the migration's transaction.
Migration = tuple[str, str | Callable[[sqlite3.Connection], None]]


# Background WAL checkpoints: after this many commits (or this many seconds), and
# on the writer itself when none has completed for CHECKPOINT_BEHIND commits.
CHECKPOINT_EVERY = 20
CHECKPOINT_INTERVAL = 1.0
CHECKPOINT_BEHIND = 2000


# SQLite primary result codes that mean "the store cannot write now" rather than
# "this job is wrong": the disk is full, the file became read-only, I/O failed.
_UNAVAILABLE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR,
                      sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
                      sqlite3.SQLITE_PROTOCOL}


def _as_unavailable(exc: BaseException) -> BaseException:
    """`exc` as StoreUnavailable (StoreFull for a full disk) when it says the store
    cannot write now: callers see the store's own errors, never sqlite3's."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF) in _UNAVAILABLE_CODES:
            kind = StoreFull if (code & 0xFF) == sqlite3.SQLITE_FULL else StoreUnavailable
            err = kind(f"store cannot write: {exc}")
            err.__cause__ = exc
            return err
    return exc


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    # Every write job runs in its own SAVEPOINT, and SQLite keeps the original of
    # each page a savepoint changes in a sub-journal: a temp *file* once it passes
    # 64 KiB, i.e. two pwrite() calls per page per job. In memory, that costs a
    # memcpy. Durability is unchanged: the sub-journal only serves ROLLBACK TO
    # within an open transaction; commits and crash recovery go through the WAL.
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.create_function("roost_digest", 1, payload_digest, deterministic=True)
    return conn


def payload_digest(payload: bytes) -> bytes:
    """The key under which a payload is stored once however many rows refer to
    it (available to SQL as roost_digest(x), for migrations)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


class Database:
    def __init__(self, path: str | Path, *, queue_size: int = 20000, batch_max: int = 1000) -> None:
        self.path = Path(path)
        self._queue_size = queue_size
        self._batch_max = batch_max
        self._jobs: queue.Queue[tuple[Job, ResultSink, asyncio.AbstractEventLoop] | None] = queue.Queue(queue_size)
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roost-sqlite-read")
        self._rconn: sqlite3.Connection | None = None
        self._closed = False
        self.commits = 0
        self.jobs_committed = 0
        self.submitted = 0   # jobs queued so far: tells a caller whether anything was queued after its job
        self.checkpoints = 0
        self.write_failures = 0                  # batches whose commit failed
        self.unavailable_since: float | None = None   # set while commits fail for want of space/rights
        # called on the writer thread with each successful batch's BEGIN-to-COMMIT
        # seconds (the monitor's histogram); must be quick and must not raise
        self.on_commit: Callable[[float], None] | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_wake = threading.Event()
        self._checkpoint_stop = False
        self._checkpointed_at = 0        # commit count when the checkpoint thread was last woken
        self._checkpoint_done_at = 0     # commit count before the last checkpoint that ran
        self._checkpoint_failing = False

    # ---- StoreHealth (with the counters above) ---------------------------
    @property
    def engine(self) -> str:
        return "sqlite"

    @property
    def location(self) -> str:
        return str(self.path)

    async def size(self) -> int:
        """The database file and its WAL (a stat each, off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(None, _file_bytes, self.path)

    # ---- lifecycle -------------------------------------------------------
    def open_sync(self, migrations: Sequence[Migration]) -> None:
        """Open, apply pending migrations, start the writer. Blocking: call before
        the event loop serves clients, or through `open()`."""
        prepare_private_file(self.path)
        self._wconn = _connect(self.path)
        apply_migrations(self._wconn, migrations)
        # Checkpoints (copying the WAL back into the database file, with fsyncs of
        # both) run on a thread of their own instead of inside whichever COMMIT
        # crosses the WAL size threshold: a commit then costs its own WAL write and
        # fsync only. Durability is unchanged (a commit is durable once its WAL
        # frames are synced; synchronous=FULL).
        self._wconn.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="roost-sqlite-checkpoint",
                                              daemon=True)
        self._checkpointer.start()
        self._writer = threading.Thread(target=self._write_loop, name="roost-sqlite-writer", daemon=True)
        self._writer.start()

    async def open(self, migrations: Sequence[Migration]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.open_sync, migrations)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        if self._checkpointer is not None:
            self._checkpoint_stop = True
            self._checkpoint_wake.set()
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
        if self._wconn is not None:
            self._wconn.close()   # the last connection to close checkpoints what is left
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    # ---- writes ----------------------------------------------------------
    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in the next group-committed transaction; returns after COMMIT."""
        return await self.submit(fn)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn` now (from the event loop) and return the future that `write`
        awaits: settled after COMMIT. Raises StoreBusy/StoreClosed at once."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.submit_to(fn, fut)
        return fut

    def submit_to(self, fn: Job, sink: ResultSink) -> None:
        """Queue `fn` now (from the event loop); `sink` gets its outcome on this loop
        after COMMIT. Raises StoreBusy/StoreClosed at once."""
        if self._closed:
            raise StoreClosed("store is closed")
        try:
            self._jobs.put_nowait((fn, sink, asyncio.get_running_loop()))
        except queue.Full:
            raise StoreBusy("storage writer queue is full") from None
        self.submitted += 1

    @property
    def pending_writes(self) -> int:
        return self._jobs.qsize()

    def _write_loop(self) -> None:
        conn = self._wconn
        assert conn is not None
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._batch_max:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            outcomes: list[tuple[bool, Any]] = []
            began = time.perf_counter()
            try:
                conn.execute("BEGIN IMMEDIATE")
                if len(batch) == 1:
                    # Alone in its transaction (the usual case: the messaging batch is
                    # one job), a job needs no savepoint: a failure rolls back the
                    # transaction, which holds nothing else. Two statements fewer per
                    # commit, each a release of the GIL.
                    try:
                        outcomes.append((True, batch[0][0](conn)))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        conn.execute("ROLLBACK")
                        self._settle_batch(batch, [(False, _as_unavailable(exc))])
                        continue
                else:
                    for fn, _fut, _loop in batch:
                        conn.execute("SAVEPOINT job")
                        try:
                            outcomes.append((True, fn(conn)))
                            conn.execute("RELEASE job")
                        except BaseException as exc:  # noqa: BLE001 - handed to the caller
                            conn.execute("ROLLBACK TO job")
                            conn.execute("RELEASE job")
                            outcomes.append((False, _as_unavailable(exc)))
                conn.execute("COMMIT")
                if self.on_commit is not None:
                    self.on_commit(time.perf_counter() - began)
                self._writable_again()
                self.commits += 1
                if self.commits - self._checkpointed_at >= CHECKPOINT_EVERY:
                    self._checkpointed_at = self.commits
                    self._checkpoint_wake.set()
                    if self.commits - self._checkpoint_done_at > CHECKPOINT_BEHIND:
                        # The checkpoint thread is far behind (long readers, slow
                        # disk): checkpoint here rather than let the WAL grow on.
                        self._checkpoint(conn)
                self.jobs_committed += len(batch)
            except BaseException as exc:  # the commit itself failed: nobody's write landed
                failure = _as_unavailable(exc)
                self.write_failures += 1
                if not isinstance(failure, StoreUnavailable):
                    log.exception("group commit failed")
                elif self.unavailable_since is None:
                    # once per outage, not once per batch: callers hold their acks
                    # (or answer `unavailable`) until a commit succeeds again
                    self.unavailable_since = time.time()
                    log.error("store %s cannot write (%s): holding acknowledgements and answering "
                              "`unavailable` until it can", self.path, exc)
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                outcomes = [(False, failure)] * len(batch)
            self._settle_batch(batch, outcomes)
        # Fail whatever is left so no caller waits forever.
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[2].call_soon_threadsafe(_settle, item[1], False, StoreClosed("store is closed"))

    @staticmethod
    def _settle_batch(batch: list[tuple[Job, ResultSink, asyncio.AbstractEventLoop]],
                      outcomes: list[tuple[bool, Any]]) -> None:
        # One wake-up per event loop per batch, not one per job: each
        # call_soon_threadsafe writes to the loop's self-pipe (a syscall).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[ResultSink, bool, Any]]] = {}
        for (ok, value), (_fn, fut, loop) in zip(outcomes, batch):
            settled = by_loop.get(loop)
            if settled is None:
                settled = by_loop[loop] = []
            settled.append((fut, ok, value))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:  # that loop is closed: nobody is left to wait
                log.warning("event loop closed before %d write(s) could be answered", len(settled))

    def _writable_again(self) -> None:
        if self.unavailable_since is not None:
            log.warning("store %s writes again after %.1f s (%d failed batches)", self.path,
                        time.time() - self.unavailable_since, self.write_failures)
            self.unavailable_since = None

    # ---- checkpoints -------------------------------------------------------
    def _checkpoint_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._checkpoint_wake.wait(CHECKPOINT_INTERVAL)
                self._checkpoint_wake.clear()
                if self._checkpoint_stop:
                    return
                if conn is None:
                    conn = _connect(self.path)
                self._checkpoint(conn)
        except Exception:  # noqa: BLE001 - the writer checkpoints itself when this falls behind
            log.exception("checkpoint thread stopped")
        finally:
            if conn is not None:
                conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """PASSIVE: copies what it can without waiting for readers or the writer."""
        done_at = self.commits
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            # retried every second: said once per outage, without a traceback
            if not self._checkpoint_failing:
                self._checkpoint_failing = True
                log.warning("WAL checkpoints of %s fail (%s); retried every %.0f s", self.path, exc,
                            CHECKPOINT_INTERVAL)
            return
        if self._checkpoint_failing:
            self._checkpoint_failing = False
            log.warning("WAL checkpoints of %s work again", self.path)
        self._checkpoint_done_at = max(self._checkpoint_done_at, done_at)
        self.checkpoints += 1

    # ---- reads -----------------------------------------------------------
    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the reader thread. SQLite errors that mean "the store cannot be
        used now" (I/O error, locked) come out as StoreUnavailable, as for writes."""
        if self._closed:
            raise StoreClosed("store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, self._run_read, fn)
        except sqlite3.Error as exc:
            mapped = _as_unavailable(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._rconn is None:
            self._rconn = _connect(self.path)
        self._rconn.execute("BEGIN")
        try:
            return fn(self._rconn)
        finally:
            self._rconn.execute("COMMIT")


def _file_bytes(path: Path) -> int:
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def prepare_private_file(path: Path) -> None:
    """The store holds password hashes and every message: its folder is created
    0700 and its files (database, -wal, -shm; SQLite gives the last two the
    database's mode) are 0600, whatever the umask. An existing folder that others
    can read is left as it is (it may be shared) but named in the log."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)      # mkdir's mode is filtered by the umask
    elif parent.stat().st_mode & 0o077:
        log.warning("the store's folder %s can be read by other local users; consider chmod 700", parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


def _settle_all(settled: list[tuple[ResultSink, bool, Any]]) -> None:
    for fut, ok, value in settled:
        _settle(fut, ok, value)


def _settle(fut: ResultSink, ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> list[str]:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    applied = []
    for name, sql in migrations:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if callable(sql):
                sql(conn)
            else:
                for statement in _split_sql(sql):
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations(name, applied_at) VALUES (?, strftime('%s','now'))", (name,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
        log.info("applied migration %s", name)
    return applied


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
