"""PostgreSQL DDL of conversations, messages, mailboxes, cursors and the social
graph (contacts, requests, blocks): migration 2 of broker/store/postgres_schema.py;
the send function (SEND_FUNCTION_DDL): migration 8.

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

# Migration 8: a send in one server-side function, so it costs one round trip
# (one statement, its own transaction) instead of BEGIN, five statements and
# COMMIT. It does what PgMessagingStore.send did statement by statement, in the
# same lock order (the conversation, then the receivers' mailboxes sorted by
# principal, then the rows they guard) and with the same numbers: `seq` from the
# locked conversation row, each mailbox's `n` from its locked mailbox_state row,
# so both stay gap-free whichever node sends. Each statement in it sees what
# committed before it started (READ COMMITTED, a VOLATILE function), as the
# separate statements did: a concurrent identical send has committed by the time
# the conversation's lock is granted, and the dup check after it finds it.
#
# status: 'sent', 'dup' (the first message of (sender, cmid): m_conv, m_seq,
# m_ts, m_body; nothing changed) or 'not_member' (nothing changed). For 'sent':
# `receivers` sorted by principal (the sender among them), `first_n` the n of
# each one's `msg` event; each recipient's `unread` event is n + 1 with its
# count and total in `counts` / `totals` (NULL for the sender). The same cmid
# committed meanwhile in another conversation surfaces as the unique violation
# of messages_sender_cmid, as before: the statement rolls back whole.
SEND_FUNCTION_DDL = r"""
CREATE FUNCTION roost_send(p_sender text, p_conv text, p_dm text[], p_cmid text, p_body text,
                           p_now double precision, p_skip text[],
                           OUT status text, OUT m_conv text, OUT m_seq bigint, OUT m_ts double precision,
                           OUT m_body text, OUT receivers text[], OUT first_n bigint[], OUT counts bigint[],
                           OUT totals bigint[])
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_last_seq bigint;
    v_last_ts double precision;
    v_members text[];
    v_joins text[];
    v_recipients text[];
    v_found text[];
    v_missing text[];
    v_counted integer;
BEGIN
    SELECT c.last_seq, c.last_ts INTO v_last_seq, v_last_ts FROM conversations c WHERE c.conv = p_conv FOR UPDATE;
    IF NOT FOUND THEN
        IF p_dm IS NULL OR NOT (p_sender = ANY(p_dm)) THEN
            status := 'not_member';
            RETURN;
        END IF;
        -- Created by whichever node comes first; the other waits for it, then locks it.
        INSERT INTO conversations(conv, kind, name, created_by, created_at, activity)
            VALUES (p_conv, 'dm', '', p_sender, p_now, 0) ON CONFLICT DO NOTHING;
        SELECT c.last_seq, c.last_ts INTO v_last_seq, v_last_ts FROM conversations c WHERE c.conv = p_conv FOR UPDATE;
    END IF;
    -- Under the conversation's lock: a concurrent identical send has committed by now.
    SELECT m.conv, m.seq, m.ts, m.body INTO m_conv, m_seq, m_ts, m_body FROM messages m
        WHERE m.sender = p_sender AND m.cmid = p_cmid AND NOT m.retired;
    IF FOUND THEN
        status := 'dup';
        RETURN;
    END IF;
    v_members := ARRAY(SELECT cm.principal FROM conv_members cm WHERE cm.conv = p_conv ORDER BY cm.principal);
    IF NOT (p_sender = ANY(v_members)) AND (p_dm IS NULL OR NOT (p_sender = ANY(p_dm))) THEN
        status := 'not_member';
        RETURN;
    END IF;
    IF p_dm IS NOT NULL THEN
        -- New conversation, or a member dropped by purge_principal whose id was
        -- registered again: the new owner's view starts after what is there.
        v_joins := ARRAY(SELECT u.p FROM unnest(p_dm) WITH ORDINALITY AS u(p, i)
                         WHERE NOT (u.p = ANY(v_members)) ORDER BY u.i);
        IF cardinality(v_joins) > 0 THEN
            INSERT INTO conv_members(conv, principal, joined_at, read_seq, since_seq, unread)
                SELECT p_conv, u.p, p_now, v_last_seq, v_last_seq, 0 FROM unnest(v_joins) AS u(p);
            v_members := ARRAY(SELECT u.p FROM unnest(v_members || v_joins) AS u(p) ORDER BY u.p COLLATE "C");
        END IF;
    END IF;
    m_conv := p_conv;
    m_seq := v_last_seq + 1;
    m_ts := greatest(p_now, v_last_ts);   -- commit order and time order agree within a conversation
    receivers := ARRAY(SELECT u.p FROM unnest(v_members) AS u(p)
                       WHERE u.p = p_sender OR NOT (u.p = ANY(coalesce(p_skip, '{}'))) ORDER BY u.p COLLATE "C");
    v_recipients := array_remove(receivers, p_sender);
    -- The receivers' mailboxes locked (created when missing) before any of their unread counters changes.
    SELECT coalesce(array_agg(s.principal), '{}') INTO v_found FROM (SELECT ms.principal FROM mailbox_state ms
        WHERE ms.principal = ANY(receivers) ORDER BY ms.principal FOR UPDATE) AS s;
    v_missing := ARRAY(SELECT u.p FROM unnest(receivers) AS u(p) WHERE NOT (u.p = ANY(v_found)) ORDER BY u.p COLLATE "C");
    IF cardinality(v_missing) > 0 THEN
        INSERT INTO mailbox_state(principal) SELECT u.p FROM unnest(v_missing) AS u(p) ORDER BY u.p COLLATE "C"
            ON CONFLICT DO NOTHING;
        PERFORM 1 FROM mailbox_state ms WHERE ms.principal = ANY(v_missing) ORDER BY ms.principal FOR UPDATE;
    END IF;
    UPDATE conversations SET last_seq = m_seq, last_ts = m_ts, activity = nextval('conversation_activity')
        WHERE conv = p_conv;
    INSERT INTO messages(conv, seq, sender, cmid, ts, body) VALUES (p_conv, m_seq, p_sender, p_cmid, m_ts, p_body);
    -- Each recipient's count moves with the message; its parts see the state before
    -- it, so a total is the sum before plus this message.
    WITH bumped AS (UPDATE conv_members SET unread = unread + 1
                    WHERE conv = p_conv AND principal = ANY(v_recipients) RETURNING principal, unread)
    SELECT count(*),
           array_agg(CASE WHEN r.p = p_sender THEN NULL ELSE b.unread END ORDER BY r.i),
           array_agg(CASE WHEN r.p = p_sender THEN NULL
                     ELSE (SELECT sum(t.unread) FROM conv_members t WHERE t.principal = r.p) + 1 END ORDER BY r.i)
      INTO v_counted, counts, totals
      FROM unnest(receivers) WITH ORDINALITY AS r(p, i) LEFT JOIN bumped b ON b.principal = r.p
     WHERE r.p = p_sender OR b.principal IS NOT NULL;
    IF v_counted <> cardinality(receivers) THEN
        -- A recipient's membership went away after the members were read (a purge
        -- of that principal): run the whole send again, on the members as they are.
        RAISE EXCEPTION 'a member of % left during a send', p_conv USING ERRCODE = 'serialization_failure';
    END IF;
    -- Each receiver's `msg` event, then (a recipient) its `unread` event.
    WITH numbered AS (UPDATE mailbox_state ms SET last_n = ms.last_n + CASE WHEN ms.principal = p_sender THEN 1 ELSE 2 END
                      WHERE ms.principal = ANY(receivers) RETURNING ms.principal, ms.last_n)
    SELECT array_agg(nb.last_n - CASE WHEN r.p = p_sender THEN 0 ELSE 1 END ORDER BY r.i) INTO first_n
      FROM unnest(receivers) WITH ORDINALITY AS r(p, i) JOIN numbered nb ON nb.principal = r.p;
    INSERT INTO mailbox(principal, n, ts, kind, conv, seq, data)
        SELECT r.p, r.n, m_ts, 'msg', p_conv, m_seq, NULL FROM unnest(receivers, first_n) AS r(p, n)
        UNION ALL
        SELECT r.p, r.n + 1, m_ts, 'unread', NULL, NULL,
               '{"conv":' || to_json(p_conv)::text || ',"count":' || r.c || ',"total":' || r.t || '}'
          FROM unnest(receivers, first_n, counts, totals) AS r(p, n, c, t) WHERE r.p <> p_sender;
    status := 'sent';
END
$fn$;
"""
