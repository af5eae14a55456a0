"""PostgreSQL DDL of conversations, messages, mailboxes, cursors and the social
graph (contacts, requests, blocks): migration 2 of broker/store/postgres_schema.py.

Owned by the engineer writing postgres_messaging.py / postgres_social.py; empty
until they fill it (an empty migration is not recorded as applied, so filling it
later still runs it). Text keys are `COLLATE "C"` so ORDER BY matches SQLite's
byte order whatever the database's locale.
"""

MESSAGING_DDL = ""
