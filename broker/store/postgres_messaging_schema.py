"""PostgreSQL DDL of conversations, messages, mailboxes, cursors and the social
graph (contacts, requests, blocks): migration 2 of broker/store/postgres_schema.py.

The tables and columns are SQLite's (broker/store/sqlite_messaging.py,
sqlite_social.py), so `roost migrate` copies them row by row. Text keys are
`COLLATE "C"` so ORDER BY matches SQLite's byte order whatever the database's
locale.

Counters that must stay gap-free live in rows: a conversation's `last_seq`
(conversations) and a mailbox's `last_n` (mailbox_state), each advanced by the
transaction that inserts the numbered rows, under that row's lock. No SEQUENCE
object is used for them: a sequence's value is not given back when its
transaction rolls back, which would leave a gap. The one sequence here,
`conversation_activity`, only orders `convs` (most recent first): gaps do not
matter there, and a sequence does not serialise every send on one hot row.
"""

MESSAGING_DDL = """
CREATE SEQUENCE conversation_activity;
CREATE TABLE conversations (
    conv text COLLATE "C" PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('dm','group')),
    name text NOT NULL DEFAULT '',
    created_by text COLLATE "C" NOT NULL,
    created_at double precision NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0,
    last_ts double precision NOT NULL DEFAULT 0,
    activity bigint NOT NULL DEFAULT 0
);
CREATE INDEX conversations_activity ON conversations(activity);
CREATE INDEX conversations_created_by ON conversations(created_by) WHERE kind = 'group';
CREATE TABLE conv_members (
    conv text COLLATE "C" NOT NULL REFERENCES conversations(conv) ON DELETE CASCADE,
    principal text COLLATE "C" NOT NULL,
    read_seq bigint NOT NULL DEFAULT 0,
    joined_at double precision NOT NULL,
    since_seq bigint NOT NULL DEFAULT 0,
    unread bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, principal)
);
CREATE INDEX conv_members_principal ON conv_members(principal, conv);
CREATE TABLE messages (
    conv text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    sender text COLLATE "C" NOT NULL,
    cmid text COLLATE "C" NOT NULL,
    ts double precision NOT NULL,
    body text NOT NULL,
    retired boolean NOT NULL DEFAULT false,
    PRIMARY KEY (conv, seq)
);
-- exactly-once sends: one live message per (sender, cmid), whichever node stores it
CREATE UNIQUE INDEX messages_sender_cmid ON messages(sender, cmid) WHERE NOT retired;
CREATE INDEX messages_conv_sender ON messages(conv, sender, seq);
CREATE TABLE mailbox_state (
    principal text COLLATE "C" PRIMARY KEY,
    last_n bigint NOT NULL DEFAULT 0,
    first_n bigint NOT NULL DEFAULT 1,
    delivered_n bigint NOT NULL DEFAULT 0
);
CREATE TABLE mailbox (
    principal text COLLATE "C" NOT NULL,
    n bigint NOT NULL,
    ts double precision NOT NULL,
    kind text NOT NULL,
    conv text COLLATE "C",
    seq bigint,
    data text,
    PRIMARY KEY (principal, n)
);
CREATE TABLE cursors (
    client_id text COLLATE "C" PRIMARY KEY,
    principal text COLLATE "C" NOT NULL,
    n bigint NOT NULL DEFAULT 0,
    inbox_sub boolean NOT NULL DEFAULT false
);
CREATE INDEX cursors_principal ON cursors(principal);
CREATE TABLE contacts (
    a text COLLATE "C" NOT NULL,
    b text COLLATE "C" NOT NULL,
    since double precision NOT NULL,
    PRIMARY KEY (a, b),
    CHECK (a < b)
);
CREATE INDEX contacts_b ON contacts(b);
CREATE TABLE contact_requests (
    sender text COLLATE "C" NOT NULL,
    recipient text COLLATE "C" NOT NULL,
    note text NOT NULL DEFAULT '',
    ts double precision NOT NULL,
    PRIMARY KEY (sender, recipient)
);
CREATE INDEX contact_requests_recipient ON contact_requests(recipient);
CREATE TABLE blocks (
    blocker text COLLATE "C" NOT NULL,
    blocked text COLLATE "C" NOT NULL,
    ts double precision NOT NULL,
    PRIMARY KEY (blocker, blocked)
);
CREATE INDEX blocks_blocked ON blocks(blocked);
CREATE TABLE contact_request_log (
    recipient text COLLATE "C" NOT NULL,
    sender text COLLATE "C" NOT NULL,
    ts double precision NOT NULL
);
CREATE INDEX contact_request_log_pair ON contact_request_log(recipient, sender, ts);
CREATE INDEX contact_request_log_sender ON contact_request_log(sender);
"""

# For `roost migrate` (broker/store/postgres_import.py), which copies SQLite's
# tables row by row into the same tables and columns here:
# tables whose rows the DDL itself inserts (one-row counters): not checked for
# emptiness and not copied from SQLite (none here: the counters are columns of
# the copied rows) ...
SEEDED_TABLES: tuple[str, ...] = ()
# ... and statements run after the copy, in its transaction, to bring such
# PostgreSQL-only counters up to date with the rows copied.
AFTER_IMPORT: tuple[str, ...] = (
    "SELECT setval('conversation_activity', (SELECT coalesce(max(activity), 0) + 1 FROM conversations), false)",
)
