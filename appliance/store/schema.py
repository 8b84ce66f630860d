"""Schema and forward-only migrations, applied in order at start (PRAGMA user_version)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

# A migration is SQL (statements split on ";") or a function of the connection, run in one transaction.
MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
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


def _to_event_batches(db: sqlite3.Connection) -> None:
    """2: events are stored as columnar batches, one row per acknowledged batch (one insert per batch, not
    per event: the ingest path writes a million events a second). Rows of schema 1 become batches of the
    runs of consecutive rows that one call wrote (same profile, session and store time)."""
    import numpy as np

    db.execute("""
        CREATE TABLE event_batches (
            first_seq INTEGER PRIMARY KEY,   -- events are first_seq .. first_seq + n - 1, in order
            n INTEGER NOT NULL CHECK (n > 0),
            profile_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            stored_ms INTEGER NOT NULL,
            types BLOB NOT NULL,             -- uint8[n], appliance.v1.EventType
            item_ids BLOB NOT NULL,          -- int64[n], little-endian
            client_time_ms BLOB NOT NULL,    -- int64[n]
            event_values BLOB NOT NULL       -- float32[n]
        )""")
    db.execute("CREATE INDEX event_batches_profile ON event_batches(profile_id, first_seq)")
    # gRPC health writes a block here (and deletes it) to learn whether space has come back after a disk error
    db.execute("CREATE TABLE health_probe (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    rows = db.execute("SELECT seq, profile_id, session_id, type, item_id, client_time_ms, value, stored_ms "
                      "FROM events ORDER BY seq").fetchall()
    next_seq = 1
    r = db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
    if r:
        next_seq = int(r[0]) + 1
    start = 0
    while start < len(rows):
        end = start + 1
        while (end < len(rows) and rows[end][0] == rows[end - 1][0] + 1
               and rows[end][1:3] == rows[start][1:3] and rows[end][7] == rows[start][7]):
            end += 1
        run = rows[start:end]
        db.execute("INSERT INTO event_batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (
            run[0][0], len(run), run[0][1], run[0][2], run[0][7],
            np.array([x[3] for x in run], dtype=np.uint8).tobytes(),
            np.array([x[4] for x in run], dtype="<i8").tobytes(),
            np.array([x[5] for x in run], dtype="<i8").tobytes(),
            np.array([x[6] for x in run], dtype="<f4").tobytes()))
        next_seq = max(next_seq, run[-1][0] + 1)
        start = end
    db.execute("DROP TABLE events")
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?)", (str(next_seq),))


MIGRATIONS.append(_to_event_batches)

# 3: experiments (A/B). Which arm a profile saw and when: one row per experiment, profile, arm and UTC day,
# written in batches by the exposure log (never on the Rank path); erased with the profile. The report
# ledger keeps what each experiment's DP reports have spent, so a box never overspends its budget.
MIGRATIONS.append("""
    CREATE TABLE experiment_exposures (
        experiment TEXT NOT NULL,
        profile_id TEXT NOT NULL REFERENCES profiles(profile_id) ON DELETE CASCADE,
        arm TEXT NOT NULL,
        day INTEGER NOT NULL,            -- UTC day number (unix ms // 86400000)
        first_ms INTEGER NOT NULL,       -- first and last ranking served under this arm that day
        last_ms INTEGER NOT NULL,
        ranks INTEGER NOT NULL,
        PRIMARY KEY (experiment, profile_id, arm, day)
    );
    CREATE INDEX experiment_exposures_day ON experiment_exposures(experiment, day);
    CREATE INDEX experiment_exposures_profile ON experiment_exposures(profile_id);
    CREATE TABLE experiment_reports (
        experiment TEXT NOT NULL,
        through_day INTEGER NOT NULL,    -- the report covered the days after the previous one up to this
        epsilon REAL NOT NULL,
        made_ms INTEGER NOT NULL,
        PRIMARY KEY (experiment, through_day)
    );
    """)

SCHEMA_VERSION = len(MIGRATIONS)
