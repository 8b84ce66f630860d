"""Schema and forward-only migrations, applied in order at start (PRAGMA user_version)."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: first schema
    """
    CREATE TABLE profiles (
        profile_id TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL,
        camera_consent INTEGER NOT NULL DEFAULT 0,
        consent_updated_ms INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        profile_id TEXT NOT NULL REFERENCES profiles(profile_id) ON DELETE CASCADE,
        device INTEGER NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER
    );
    CREATE INDEX sessions_profile ON sessions(profile_id);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        profile_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        type INTEGER NOT NULL,
        item_id INTEGER NOT NULL,
        client_time_ms INTEGER NOT NULL,
        value REAL NOT NULL,
        stored_ms INTEGER NOT NULL
    );
    CREATE INDEX events_profile ON events(profile_id, seq);
    CREATE TABLE catalog (
        item_id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        genres TEXT NOT NULL,
        year INTEGER,
        maturity INTEGER NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
