"""SQLite store. Every write that the player will be told about is committed with fsync first.

One connection guarded by a lock: the box has one writer process (the ranker) and SQLite serialises
writers anyway. WAL + synchronous=FULL makes each commit durable across power loss and `kill -9`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import StoreError
from appliance.store.schema import MIGRATIONS, SCHEMA_VERSION


@dataclass(frozen=True)
class ProfileRow:
    profile_id: str
    created_ms: int
    camera_consent: bool
    consent_updated_ms: int


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    profile_id: str
    device: int
    started_ms: int
    ended_ms: int | None


@dataclass(frozen=True)
class EventRow:
    seq: int
    profile_id: str
    session_id: str
    type: int
    item_id: int
    client_time_ms: int
    value: float


def _store_error(action: str, exc: sqlite3.Error) -> StoreError:
    msg = str(exc)
    if "full" in msg or "disk I/O" in msg:
        return StoreError(f"store: {action} failed: disk full or unwritable ({msg}); nothing was written")
    return StoreError(f"store: {action} failed: {msg}")


class Store:
    """The box's durable state. Methods are thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store: cannot open {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self._check_integrity()
        self._migrate()

    # -- start-up ---------------------------------------------------------------------------------
    def _check_integrity(self) -> None:
        row = self._db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise StoreError(f"store: integrity check failed for {self.path}: {row[0] if row else '?'}")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store: {self.path} has schema {version}, newer than this build ({SCHEMA_VERSION}); "
                "refusing to touch it (roll the appliance forward, or restore a backup)")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx(f"migration to schema {target}") as db:
                for statement in _split_sql(MIGRATIONS[target - 1]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={target}")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def ping(self) -> bool:
        """True when the database answers (used by gRPC health)."""
        try:
            with self._lock:
                self._db.execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes -----------------------------------------------------------------------------------
    @contextmanager
    def _tx(self, action: str) -> Iterator[sqlite3.Connection]:
        """One durable transaction: committed (fsync) on exit, rolled back on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise _store_error(action, exc) from None

    _NEW_PROFILE = ("INSERT OR IGNORE INTO profiles(profile_id, created_ms, camera_consent, consent_updated_ms) "
                    "VALUES (?, ?, 0, ?)")

    def ensure_profile(self, profile_id: str, now_ms: int) -> ProfileRow:
        with self._tx("create profile") as db:
            db.execute(self._NEW_PROFILE, (profile_id, now_ms, now_ms))
        row = self.get_profile(profile_id)
        assert row is not None
        return row

    def set_consent(self, profile_id: str, camera: bool, now_ms: int) -> ProfileRow:
        with self._tx("set consent") as db:
            db.execute(self._NEW_PROFILE, (profile_id, now_ms, now_ms))
            db.execute("UPDATE profiles SET camera_consent=?, consent_updated_ms=? WHERE profile_id=?",
                       (int(camera), now_ms, profile_id))
        row = self.get_profile(profile_id)
        assert row is not None
        return row

    def start_session(self, session_id: str, profile_id: str, device: int, now_ms: int) -> SessionRow:
        with self._tx("start session") as db:
            db.execute(self._NEW_PROFILE, (profile_id, now_ms, now_ms))
            db.execute("INSERT INTO sessions(session_id, profile_id, device, started_ms) VALUES (?, ?, ?, ?)",
                       (session_id, profile_id, device, now_ms))
        return SessionRow(session_id, profile_id, device, now_ms, None)

    def end_session(self, session_id: str, now_ms: int) -> None:
        with self._tx("end session") as db:
            db.execute("UPDATE sessions SET ended_ms=? WHERE session_id=? AND ended_ms IS NULL",
                       (now_ms, session_id))

    def append_events(self, profile_id: str, session_id: str,
                      rows: Sequence[tuple[int, int, int, float]], now_ms: int) -> int:
        """Append (type, item_id, client_time_ms, value) rows in one durable transaction; last seq."""
        with self._tx("append events") as db:
            db.executemany(
                "INSERT INTO events(profile_id, session_id, type, item_id, client_time_ms, value, stored_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(profile_id, session_id, t, i, c, v, now_ms) for t, i, c, v in rows])
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
        return int(seq[0]) if seq else 0

    def forget_profile(self, profile_id: str) -> tuple[int, int]:
        """Erase a profile, its sessions and events. Returns (events, sessions) deleted."""
        with self._tx("forget profile") as db:
            ev = db.execute("DELETE FROM events WHERE profile_id=?", (profile_id,)).rowcount
            se = db.execute("DELETE FROM sessions WHERE profile_id=?", (profile_id,)).rowcount
            db.execute("DELETE FROM profiles WHERE profile_id=?", (profile_id,))
        return int(ev), int(se)

    def import_catalog(self, rows: Iterable[tuple[int, str, str, int | None, int]], replace: bool = False) -> int:
        """Insert or update (item_id, title, genres, year, maturity) rows atomically; returns how many."""
        rows = list(rows)
        with self._tx("import catalog") as db:
            if replace:
                db.execute("DELETE FROM catalog")
            db.executemany(
                "INSERT INTO catalog(item_id, title, genres, year, maturity) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(item_id) DO UPDATE SET title=excluded.title, genres=excluded.genres, "
                "year=excluded.year, maturity=excluded.maturity", rows)
        return len(rows)

    # -- reads ------------------------------------------------------------------------------------
    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _store_error("read", exc) from None

    def get_profile(self, profile_id: str) -> ProfileRow | None:
        rows = self._read("SELECT profile_id, created_ms, camera_consent, consent_updated_ms FROM profiles "
                          "WHERE profile_id=?", (profile_id,))
        return ProfileRow(rows[0][0], rows[0][1], bool(rows[0][2]), rows[0][3]) if rows else None

    def profiles(self) -> list[ProfileRow]:
        return [ProfileRow(r[0], r[1], bool(r[2]), r[3]) for r in
                self._read("SELECT profile_id, created_ms, camera_consent, consent_updated_ms FROM profiles")]

    def get_session(self, session_id: str) -> SessionRow | None:
        rows = self._read("SELECT session_id, profile_id, device, started_ms, ended_ms FROM sessions "
                          "WHERE session_id=?", (session_id,))
        return SessionRow(*rows[0]) if rows else None

    def open_sessions(self) -> list[SessionRow]:
        return [SessionRow(*r) for r in self._read(
            "SELECT session_id, profile_id, device, started_ms, ended_ms FROM sessions WHERE ended_ms IS NULL")]

    def count_sessions(self, profile_id: str) -> int:
        return int(self._read("SELECT COUNT(*) FROM sessions WHERE profile_id=?", (profile_id,))[0][0])

    def iter_events(self, profile_id: str | None = None, batch: int = 10_000) -> Iterator[EventRow]:
        """Events in durable order (for replaying state at start)."""
        last = 0
        while True:
            if profile_id is None:
                rows = self._read("SELECT seq, profile_id, session_id, type, item_id, client_time_ms, value "
                                  "FROM events WHERE seq>? ORDER BY seq LIMIT ?", (last, batch))
            else:
                rows = self._read("SELECT seq, profile_id, session_id, type, item_id, client_time_ms, value "
                                  "FROM events WHERE profile_id=? AND seq>? ORDER BY seq LIMIT ?",
                                  (profile_id, last, batch))
            if not rows:
                return
            for r in rows:
                yield EventRow(*r)
            last = rows[-1][0]

    def event_stats(self, profile_id: str) -> tuple[int, int | None]:
        """(count, oldest stored_ms) of a profile's events."""
        r = self._read("SELECT COUNT(*), MIN(stored_ms) FROM events WHERE profile_id=?", (profile_id,))[0]
        return int(r[0]), (int(r[1]) if r[1] is not None else None)

    def last_seq(self) -> int:
        r = self._read("SELECT seq FROM sqlite_sequence WHERE name='events'")
        return int(r[0][0]) if r else 0

    def catalog_rows(self) -> list[tuple[int, str, str, int | None, int]]:
        return [tuple(r) for r in self._read(
            "SELECT item_id, title, genres, year, maturity FROM catalog ORDER BY item_id")]

    def catalog_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM catalog")[0][0])


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
