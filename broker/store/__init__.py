"""Storage behind a small interface (base.py); SQLite is the default engine."""
