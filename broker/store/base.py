"""The storage interface: small, typed, engine-neutral.

Services, plugins, the engine and the CLI depend on these Protocols and errors
only. `Store` (at the end) is the whole store: one repository object per domain
(identity, retained, sessions, messaging, social, devices, presence, telemetry, files,
web sessions), so the domains can grow independently. `broker/store/sqlite.py` implements it on
SQLite; another engine (PostgreSQL) implements the same Protocols, passes
tests/test_store_contract.py and is chosen in `broker/store/factory.py`.

Every method is async; writes return only after their transaction committed.
How an engine allocates counters (a conversation's `seq`, a mailbox's `n`) is
its own business; what it must guarantee is said on the methods: numbers are
allocated in the committing transaction, strictly increasing, without gaps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# ---- errors ------------------------------------------------------------------

class StoreUnavailable(Exception):
    """The store cannot take writes right now (disk full, read-only, I/O error,
    writer queue full). Nothing of the failed write was committed; the caller
    answers `unavailable` (or holds its ack) and may retry: the store recovers by
    itself when the cause goes away."""


class StoreFull(StoreUnavailable):
    """The disk (or the file system's quota) is full."""


class StoreBusy(StoreUnavailable):
    """The writer queue is full: the caller should answer `unavailable`."""


class StoreClosed(Exception):
    """The store was closed (the broker is stopping): nothing more is read or written."""


class StoreCannotOpen(Exception):
    """`Store.open()` failed for a reason of the engine's (not a database, a schema
    it cannot migrate); str() is that reason in one line. A file the process may
    not create or read raises OSError instead."""


class AlreadyExists(Exception):
    """A unique key is already taken."""


class NotFoundError(Exception):
    """A referenced row does not exist."""


class NotMember(Exception):
    """The principal is not a member of the conversation (or it does not exist)."""


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    kind: str              # user | device | service
    name: str
    status: str
    secret_hash: str
    created_at: float
    device_kind: str | None = None   # devices: thermostat, light, door_sensor, ...
    room: str | None = None          # devices: where it is
    pairing_code: str | None = None  # devices: argon2 hash of the code shown once at registration
    secret_set_at: float = 0.0       # when the secret was last set (added, passwd): older JWTs are refused


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    topic: str
    payload: bytes
    qos: int
    # MQTT 5: the properties forwarded with it (encoded, no length prefix; None:
    # none) and when its Message Expiry Interval ends (epoch s; None: never)
    properties: bytes | None = None
    expires_at: float | None = None


class IdentityStore(Protocol):
    async def add_principal(self, p: Principal) -> None:
        """Raises `AlreadyExists` when the id is taken (by any kind)."""

    async def get_principal(self, principal_id: str) -> Principal | None: ...

    async def list_principals(self, kind: str | None = None) -> list[Principal]: ...

    async def remove_principal(self, principal_id: str) -> bool: ...

    async def set_secret(self, principal_id: str, secret_hash: str) -> bool: ...

    async def set_pairing_code(self, principal_id: str, code: str) -> bool:
        """Devices only; False when there is no such device."""

    async def set_profile(self, principal_id: str, *, name: str | None, status: str | None) -> Principal | None: ...

    async def search_users(self, query: str, limit: int) -> list[Principal]:
        """Users (kind user) whose id equals `query` or whose name starts with it."""

    async def log_admin(self, principal_id: str, action: str) -> None:
        """Record an admin change (added/removed/passwd) for a running broker to apply."""

    async def admin_log_after(self, seq: int) -> list[tuple[int, str, str]]:
        """(seq, principal, action) rows after `seq`, oldest first."""

    async def admin_log_head(self) -> int: ...


class RetainedStore(Protocol):
    async def load_all(self) -> list[RetainedMessage]: ...

    async def put(self, msg: RetainedMessage) -> None: ...

    async def delete(self, topic: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SavedMessage:
    """A message of a saved MQTT session; `seq` orders a session's messages. `pid`
    is set for a message that was in flight (sent, not acknowledged) when the
    broker stopped; `stage` 1 means PUBREC was received for it (QoS 2), so only
    PUBREL is still owed and the payload is empty."""
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    pid: int | None = None
    stage: int = 0
    properties: bytes | None = None   # MQTT 5, as RetainedMessage
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class SavedSession:
    """A persistent (clean_session=0) MQTT session while its client is away."""
    client_id: str
    principal: str | None      # None: an anonymous client
    kind: str | None
    subscriptions: dict[str, int]
    messages: list[SavedMessage]
    incoming_qos2: list[int]   # QoS 2 publishes from the client awaiting its PUBREL
    last_pid: int
    disconnected_at: float
    # MQTT 5: the Session Expiry Interval (s; None: limits.session_expiry) and
    # filter -> (subscription options byte, subscription identifier or 0)
    expiry: float | None = None
    subscription_options: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionUpsert:
    """Journal: a persistent session exists (or changed its subscriptions)."""
    client_id: str
    principal: str | None
    kind: str | None
    subscriptions: dict[str, int]
    disconnected_at: float
    expiry: float | None = None      # MQTT 5, as SavedSession
    subscription_options: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionDrop:
    """Journal: a persistent session ended (clean connect, expiry, removal)."""
    client_id: str


@dataclass(frozen=True, slots=True)
class MessageKept:
    """Journal: a QoS 1/2 message is now owed to a persistent session."""
    client_id: str
    message: SavedMessage


@dataclass(frozen=True, slots=True)
class MessageDone:
    """Journal: the client acknowledged it (PUBACK, or PUBREC for QoS 2)."""
    client_id: str
    seq: int


JournalOp = SessionUpsert | SessionDrop | MessageKept | MessageDone


class SessionStore(Protocol):
    async def apply(self, ops: list[JournalOp]) -> None:
        """Apply journal operations in order, in one transaction."""

    async def save_sessions(self, sessions: list[SavedSession]) -> None:
        """Replace every saved session with these (one transaction): the exact
        state at a clean stop, in-flight packet ids included."""

    async def load_sessions(self) -> list[SavedSession]: ...


# ---- devices and presence (issue 5 ownership, issue 4 presence) -------------

DEVICE_ROLES = ("owner", "sharee")


@dataclass(frozen=True, slots=True)
class DeviceUser:
    """One person (or integration) allowed to use a device."""

    device: str
    principal: str
    role: str                # owner | sharee
    granted_by: str | None   # who shared it; None for a claim
    created_at: float


class DeviceStore(Protocol):
    async def list_device_users(self) -> list[DeviceUser]: ...

    async def put_device_user(self, du: DeviceUser) -> None:
        """Insert, or change the role of an existing (device, principal) row.
        Raises `NotFoundError` when the device or the principal does not exist."""

    async def remove_device_user(self, device: str, principal: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    principal: str
    state: str               # online | offline
    since: float
    last_seen: float


class PresenceStore(Protocol):
    async def load_presence(self) -> list[PresenceRecord]: ...

    async def save_presence(self, records: list[PresenceRecord], alive_at: float | None = None) -> int:
        """Upsert in one transaction; rows of principals that no longer exist
        are skipped. `alive_at`: the broker was still running then (kept once).
        Returns how many records were written."""

    async def last_alive(self) -> float | None:
        """The latest `alive_at` saved: when a broker that died was last known running."""


# ---- telemetry (issue 5 item 4) ------------------------------------------------

@dataclass(frozen=True, slots=True)
class LatestReading:
    """The newest value of each field a device reported, and when (unix seconds)."""

    device: str
    ts: float
    fields: dict[str, float | int | bool | str]


class TelemetryStore(Protocol):
    async def load_latest(self) -> list[LatestReading]: ...

    async def get_latest(self, device: str) -> LatestReading | None: ...

    async def put_latest(self, readings: list[LatestReading]) -> int:
        """Upsert in one transaction; readings of devices that no longer exist are
        skipped. Returns how many were written."""

    async def delete_latest(self, device: str) -> None: ...

    async def put_history(self, points: list[HistoryPoint], *, keep: int, expire_before: float) -> int:
        """Append recent-history points in one transaction (a point at the same
        (device, ts) as a kept one replaces it); points of devices that no longer
        exist are skipped. In the same transaction each device written keeps only
        its newest `keep` points and every point older than `expire_before` (any
        device) goes: the history stays bounded in rows. A removed device's points
        go with it. Returns how many points were written."""

    async def history(self, device: str, *, metric: str | None, since: float, limit: int) -> list[HistoryPoint]:
        """The newest `limit` points of `device` with `ts > since`, oldest first.
        With `metric`: only the points that have that field, reduced to it."""


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """What a device reported at `ts` (numbers and bools only: what a chart draws)."""

    device: str
    ts: float
    fields: dict[str, float | int | bool]


# ---- files (issue 14 item 4) ----------------------------------------------------

@dataclass(frozen=True, slots=True)
class FileRecord:
    """One principal's upload of some content. `id` is the content's SHA-256 (hex):
    the bytes themselves are in the blob store, once per content however many
    principals uploaded them."""

    id: str
    owner: str
    name: str
    size: int
    type: str                # media type, e.g. image/png
    created_at: float


class FileStore(Protocol):
    async def add_upload(self, rec: FileRecord, *, quota: int) -> bool:
        """Record that `rec.owner` uploaded the content `rec.id`, if the owner's
        usage (the sizes of the distinct contents they uploaded) plus `rec.size`
        stays within `quota`; False (nothing written) otherwise. Uploading the same
        content again costs no quota and keeps the first record. The check and the
        write are one transaction. NotFoundError when the owner does not exist."""

    async def get_upload(self, file_id: str, owner: str) -> FileRecord | None: ...

    async def find(self, file_id: str) -> FileRecord | None:
        """The first upload of the content (any owner); when every uploader was
        removed, the content's own record (owner and name ""): a file sent stays
        with the messages that carry it. None for content never uploaded."""

    async def usage(self, owner: str) -> int:
        """Bytes counted against the owner's quota."""

    async def add_conv(self, file_id: str, conv: str) -> None:
        """Note that the content was sent in `conv` (idempotent)."""

    async def convs_of(self, file_id: str) -> list[str]:
        """The conversations the content was sent in, sorted."""


class BlobStore(Protocol):
    """The bytes of files, by content hash (broker/store/blobs.py keeps them in a
    folder, beside SQLite; broker/store/postgres_files.py in PostgreSQL, where
    every node reads them). Uploads in progress are staged under an upload id
    until `commit` makes them a blob, atomically. A blob is never deleted: another
    upload of the same content, on any node, may be recording it at any moment
    (broker/services/files.py records first, commits the bytes second).
    broker/store/factory.py `create_blob_store` picks the one that goes with the store."""

    async def begin(self, upload: str) -> None:
        """An empty staging area for `upload` (an id of [0-9a-f])."""

    async def append(self, upload: str, data: bytes) -> None: ...

    async def commit(self, upload: str, digest: str) -> bool:
        """Make the staged bytes the blob `digest` (durably: on disk before this
        returns). False when that blob existed already (the staged copy is dropped)."""

    async def discard(self, upload: str) -> None:
        """Drop a staged upload (nothing if there is none)."""

    async def read(self, digest: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset`; NotFoundError when there is no such blob."""

    async def clear_staging(self) -> int:
        """Drop the staged uploads no one can still be writing (at start: uploads of a
        previous run are abandoned): in a folder of this node's, every one; in a
        store shared by nodes, those untouched for a day."""


# ---- web sign-in sessions (issue 12: shared by every node) -----------------------

@dataclass(frozen=True, slots=True)
class WebSessionRecord:
    """A browser signed in to the web app (broker/web/sessions.py). `key` is the
    SHA-256 (hex) of the cookie's token, never the token: these rows alone do not
    let anyone act as the person. Times are epoch seconds."""

    key: str
    principal: str
    kind: str
    csrf: str                      # the page sends it with every state-changing request
    created: float
    used: float                    # written at most about once a minute (WebSessions.touch_every)
    expires_at: float | None = None   # the end of a sign-in by token (a JWT's exp)


class WebSessionStore(Protocol):
    async def create(self, rec: WebSessionRecord, *, max_sessions: int) -> tuple[int, int]:
        """Add `rec`, then evict the least recently used sessions beyond
        `max_sessions`, in one transaction; returns (sessions now, evicted).
        NotFoundError when the principal does not exist. A principal's removal
        ends its sessions with it."""

    async def get(self, key: str) -> WebSessionRecord | None: ...

    async def existing(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` are still sessions (one read for a node's open pages)."""

    async def touch(self, key: str, used: float) -> None:
        """Note a use (nothing if the session is gone)."""

    async def delete(self, key: str) -> bool: ...

    async def delete_principal(self, principal: str) -> int:
        """End every session of `principal` (signed out everywhere); how many."""

    async def expire(self, *, used_before: float, created_before: float, now: float) -> int:
        """Delete sessions last used before `used_before`, created before
        `created_before`, or whose `expires_at` is at or before `now`; how many."""

    async def count(self) -> int: ...


# ---- messaging (conversations, messages, mailboxes) --------------------------

# The three value types below are made per message on the store's writer thread
# (several per send): not frozen, since a frozen dataclass sets each field through
# object.__setattr__ (measured: 6,100 instructions per object, 13 % of the
# writer's work per durable send). Treat them as immutable all the same.
@dataclass(slots=True, unsafe_hash=True)   # hashable by value, as a frozen one would be
class StoredMessage:
    conv: str
    seq: int
    sender: str
    cmid: str
    ts: float
    body: str                        # JSON text of the `body` object

    def to_wire(self) -> dict[str, Any]:
        import json

        return {"conv": self.conv, "seq": self.seq, "from": self.sender, "cmid": self.cmid,
                "ts": self.ts, "body": json.loads(self.body)}


class MailboxEvent:
    """One numbered event of a principal's mailbox.

    `doc` is the wire event ({"n", "kind", "ts", ...}); `wire` the same as compact
    JSON bytes when the store built them already (SQLite's send batch encodes a
    message once for all its members' events), None: encode `doc`. Given `wire`
    and its `kind` without `doc`, the dict is decoded from the bytes on first use:
    a pushed event needs only its bytes, and building a dict per member's event
    on the store's writer cost 5 % of its work per send. Equal by principal, n
    and document, like the dataclass it was."""

    __slots__ = ("principal", "n", "kind", "wire", "_doc")

    def __init__(self, principal: str, n: int, doc: dict[str, Any] | None = None, wire: bytes | None = None,
                 kind: str | None = None) -> None:
        if doc is not None:
            kind = str(doc.get("kind", "?")) if kind is None else kind
        elif wire is None or kind is None:
            raise ValueError("a mailbox event needs its document, or its encoding and kind")
        self.principal = principal
        self.n = n
        self.kind: str = kind
        self.wire = wire
        self._doc = doc

    @property
    def doc(self) -> dict[str, Any]:
        doc = self._doc
        if doc is None:
            import json

            assert self.wire is not None   # (__init__)
            doc = self._doc = json.loads(self.wire)
        return doc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MailboxEvent):
            return NotImplemented
        return (self.principal, self.n, self.doc) == (other.principal, other.n, other.doc)

    __hash__ = None   # type: ignore[assignment]   # (its document is a dict)

    def __repr__(self) -> str:
        return f"MailboxEvent(principal={self.principal!r}, n={self.n!r}, doc={self.doc!r})"


@dataclass(slots=True)
class SendOutcome:
    message: StoredMessage
    dup: bool
    events: list[MailboxEvent]       # new mailbox events (empty for a duplicate)


@dataclass(frozen=True, slots=True)
class ReadOutcome:
    conv: str
    seq: int
    unread: int
    total_unread: int
    events: list[MailboxEvent]


@dataclass(frozen=True, slots=True)
class ConvSummary:
    conv: str
    kind: str                        # dm | group
    name: str
    peer: str | None
    last_seq: int
    last: StoredMessage | None
    read_seq: int
    unread: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    conv: str
    name: str
    created_by: str
    members: list[str]


class MessagingStore(Protocol):
    """Conversations, messages, per-principal mailboxes and per-client cursors.
    Counters (a conversation's seq, a mailbox's n) are allocated inside the
    committing transaction: each strictly increasing from 1, without gaps,
    however many writers send at once."""

    async def send(self, *, sender: str, conv: str, dm_members: tuple[str, str] | None, cmid: str,
                   body: str, now: float, skip: frozenset[str] = frozenset()) -> SendOutcome:
        """Store one message and its `msg` events in every member's mailbox, atomically.
        `dm_members` is given for a direct conversation (created on first use); for
        a group the sender must be a member (else NotMember). Members in `skip` get
        no event. A second send with the sender's same `cmid` stores nothing and
        returns the first message with `dup` set."""

    async def find_sent(self, sender: str, cmid: str) -> StoredMessage | None:
        """The message `sender` already sent with this cmid, if any."""

    async def sync(self, principal: str, after: int, limit: int) -> tuple[list[MailboxEvent], int]:
        """Events with n > after (oldest first, at most `limit`) and the mailbox's last n."""

    async def head(self, principal: str) -> int:
        """The mailbox's last n (0 when empty)."""

    async def client_cursor(self, client_id: str, principal: str) -> tuple[int, bool, int]:
        """(acked n, persistent inbox subscription recorded, mailbox last n)."""

    async def set_inbox_sub(self, client_id: str, principal: str, on: bool) -> None: ...

    async def ack(self, client_id: str, principal: str, n: int, now: float) -> tuple[int, list[MailboxEvent]]:
        """Advance the client's cursor to n (never back); the first ack of a `msg`
        event by any client of the principal sends its sender a `delivered` event.
        Raises ValueError when n is beyond the mailbox's last event."""

    async def read(self, principal: str, conv: str, seq: int, now: float) -> ReadOutcome:
        """Mark messages up to `seq` read (never back). NotMember; ValueError beyond the last seq."""

    async def convs(self, principal: str) -> tuple[list[ConvSummary], int]:
        """The principal's conversations, most recently active first, and its total unread."""

    async def history(self, conv: str, before: int | None, limit: int,
                      viewer: str | None = None) -> tuple[list[StoredMessage], bool]:
        """Up to `limit` messages with seq < before (all when None), oldest first, and
        whether older ones exist. With `viewer`: only what that member may see (from
        when it joined; nothing when it is not a member)."""

    async def is_member(self, conv: str, principal: str) -> bool: ...

    async def create_group(self, conv: str, name: str, creator: str, members: Sequence[str],
                           now: float) -> list[MailboxEvent]: ...

    async def group_info(self, conv: str) -> GroupInfo | None: ...

    async def change_group(self, conv: str, by: str, *, add: Iterable[str] = ..., remove: Iterable[str] = ...,
                           event: str, now: float) -> tuple[list[MailboxEvent], list[str]]:
        """Add and/or remove members (`by` must be one, else NotMember); `event` is
        added|removed|left. Returns the events and the members afterwards. Removing
        one who is not a member raises KeyError(those, sorted) and changes nothing."""

    async def load_groups(self) -> dict[str, list[str]]:
        """Every group and its members (sorted)."""

    async def forget_principal(self, principal: str) -> list[str]:
        """A principal was removed: drop its mailbox, cursors and memberships (the
        messages it sent stay). Returns the groups it was a member of."""

    async def purge_orphans(self, limit: int) -> dict[str, list[str]]:
        """One bounded round: forget up to `limit` principals that have rows here but
        are no longer registered. Returns {principal: groups it was in}; empty when
        there is nothing left to do."""

    async def needs_prune(self, *, now: float, max_events: int, ttl: float) -> bool:
        """Is any mailbox over `max_events` or holding an event older than `ttl`?"""

    async def prune(self, *, now: float, max_events: int, ttl: float, max_mailboxes: int,
                    max_rows: int) -> tuple[list[MailboxEvent], int]:
        """One bounded round of enforcing max_events and ttl: discards the oldest events
        of at most `max_mailboxes` mailboxes (at most `max_rows` each), announcing each
        discard with a `dropped` event. Returns the new events and how many were discarded."""


# ---- social (contacts, requests, blocks) ------------------------------------

@dataclass(frozen=True, slots=True)
class ContactRequest:
    sender: str
    to: str
    note: str
    ts: float


@dataclass(frozen=True, slots=True)
class SocialState:
    contacts: list[tuple[str, str]]          # accepted pairs (a < b)
    requests: list[ContactRequest]           # pending
    blocks: list[tuple[str, str]]            # (blocker, blocked)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on new contact requests (0 turns one off)."""
    cooldown: float = 0.0       # seconds before the same requester may ask the same person again
    per_target_hour: int = 0    # new requests one person receives per hour


class SocialStore(Protocol):
    async def load(self) -> SocialState: ...

    async def pending(self, me: str) -> tuple[list[ContactRequest], list[ContactRequest]]:
        """(requests to me, requests from me), oldest first."""

    async def request(self, sender: str, to: str, note: str, now: float,
                      limits: RequestLimits = ...) -> tuple[str, list[MailboxEvent]]:
        """Returns (outcome, events): outcome is 'requested', 'pending' (asked already:
        nothing new), 'accepted' (the other side had asked too), 'contact' (already
        one), or refused by `limits`: 'too_soon' (asked this person within the
        cool-down) / 'too_many' (their hour's budget is spent)."""

    async def respond(self, me: str, sender: str, accept: bool, now: float) -> list[MailboxEvent]:
        """Accept or reject sender's pending request to me; KeyError when there is none."""

    async def remove(self, me: str, other: str, now: float) -> list[MailboxEvent]:
        """Remove a contact or a pending request either way; KeyError when there is none."""

    async def block(self, me: str, other: str, now: float) -> tuple[bool, list[MailboxEvent]]:
        """Block (also ends a contact and pending requests). Returns (was a contact, events)."""

    async def unblock(self, me: str, other: str, now: float) -> list[MailboxEvent]:
        """KeyError when `other` was not blocked."""

    async def forget_principal(self, principal: str) -> None:
        """A principal was removed: its contacts, requests and blocks go with it."""

    async def purge_orphans(self, limit: int) -> list[str]:
        """One bounded round: forget up to `limit` ids that have rows here but are no
        longer registered principals. Returns them; empty when nothing is left."""


# ---- the whole store ---------------------------------------------------------

class StoreHealth(Protocol):
    """How the store's writes are going, read by broker/monitor.py ($SYS, /metrics,
    `roost status`). Plain figures, updated by the store itself."""

    @property
    def engine(self) -> str:
        """`sqlite` or `postgres` (how `roost status` names the store)."""

    @property
    def location(self) -> str:
        """Where the data is: the SQLite file, or the PostgreSQL dsn without its password."""

    async def size(self) -> int | None:
        """Bytes the data takes now (SQLite: the file and its WAL; PostgreSQL:
        pg_database_size), None when that cannot be told (server unreachable).
        Cheap and quick: the monitor asks every few seconds."""

    @property
    def unavailable_since(self) -> float | None:
        """Unix time since when commits fail (disk full, read-only); None while they work."""

    @property
    def commits(self) -> int: ...

    @property
    def write_failures(self) -> int:
        """Batches whose commit failed."""

    @property
    def pending_writes(self) -> int:
        """Writes waiting for the writer."""

    # Called with each commit's seconds (the monitor's histogram), possibly on
    # another thread; must be quick and must not raise.
    on_commit: Callable[[float], None] | None


class Store(Protocol):
    """The whole store, as the composition root builds it (broker/store/factory.py)
    and hands it to services, plugins and the engine. Opened once before use,
    closed once at the end; after `close()` every method raises StoreClosed."""

    @property
    def identity(self) -> IdentityStore: ...

    @property
    def retained(self) -> RetainedStore: ...

    @property
    def sessions(self) -> SessionStore: ...

    @property
    def messaging(self) -> MessagingStore: ...

    @property
    def social(self) -> SocialStore: ...

    @property
    def devices(self) -> DeviceStore: ...

    @property
    def presence(self) -> PresenceStore: ...

    @property
    def telemetry(self) -> TelemetryStore: ...

    @property
    def files(self) -> FileStore: ...

    @property
    def web_sessions(self) -> WebSessionStore: ...

    @property
    def health(self) -> StoreHealth: ...

    async def open(self) -> None:
        """Create or migrate the schema and start serving reads and writes."""

    async def close(self) -> None:
        """Finish (or fail) what is queued, then stop; closing twice is harmless."""
