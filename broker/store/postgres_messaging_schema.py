"""PostgreSQL DDL of conversations, messages, mailboxes, cursors and the social
graph (contacts, requests, blocks): migration 2 of broker/store/postgres_schema.py.

Owned by the engineer writing postgres_messaging.py / postgres_social.py; empty
until they fill it (an empty migration is not recorded as applied, so filling it
later still runs it). Text keys are `COLLATE "C"` so ORDER BY matches SQLite's
byte order whatever the database's locale.
"""

MESSAGING_DDL = ""

# For `roost migrate` (broker/store/postgres_import.py), which copies SQLite's
# tables row by row into the same tables and columns here:
# tables whose rows the DDL itself inserts (one-row counters): not checked for
# emptiness and not copied from SQLite ...
SEEDED_TABLES: tuple[str, ...] = ()
# ... and statements run after the copy, in its transaction, to bring such
# PostgreSQL-only counters up to date with the rows copied.
AFTER_IMPORT: tuple[str, ...] = ()
