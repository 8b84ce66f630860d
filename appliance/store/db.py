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

import numpy as np

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
class EventBatch:
    """Columns of events of one session: uint8 types, int64 item ids and client times, float32 values."""
    profile_id: str
    session_id: str
    types: np.ndarray
    item_ids: np.ndarray
    client_time_ms: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class StoredBatch:
    first_seq: int
    profile_id: str
    session_id: str
    stored_ms: int
    types: np.ndarray
    item_ids: np.ndarray
    client_time_ms: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class EventRow:
    seq: int
    profile_id: str
    session_id: str
    type: int
    item_id: int
    client_time_ms: int
    value: float


@dataclass(frozen=True)
class ExposureRow:
    """A profile saw an experiment's arm on a UTC day: first and last ranking then, and how many."""
    experiment: str
    profile_id: str
    arm: str
    day: int
    first_ms: int
    last_ms: int
    ranks: int


SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY, SQLITE_CANTOPEN = 13, 10, 8, 14


def _is_disk_error(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY, SQLITE_CANTOPEN):
        return True
    msg = str(exc)
    return "full" in msg or "disk I/O" in msg or "readonly" in msg


def _store_error(action: str, exc: sqlite3.Error) -> StoreError:
    msg = str(exc)
    if _is_disk_error(exc):
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
            # Deleted rows are overwritten with zeros, not just unlinked: Forget leaves nothing to recover.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store: cannot open {self.path}: {exc}") from None
        self._lock = threading.RLock()
        self.healthy_read = True   # the last read (or ping) worked
        self.writable = True       # the last write worked (False after disk full / I/O error until one does)
        self._failed_bytes = 0     # size of the last write that failed for lack of space (for probe_write)
        self._tx_bytes = 0         # size of the write in progress
        # (events, oldest stored_ms) per profile, read from the table once and then kept by the writes that
        # change it: Explain would otherwise sum a profile's batches on every call, O(its history) under
        # the store's lock, and the soak showed Explain's p50 growing 1.5 -> 13 ms over 10 minutes.
        self._stats: dict[str, tuple[int, int | None]] = {}
        self._check_integrity()
        self._migrate()
        self._next_seq = self._load_next_seq()

    def _load_next_seq(self) -> int:
        """Sequence numbers are never reused, not even after Forget erased the newest events."""
        meta = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        top = self._db.execute("SELECT MAX(first_seq + n) FROM event_batches").fetchone()
        return max(int(meta[0]) if meta else 1, int(top[0]) if top and top[0] is not None else 1)

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
            step = MIGRATIONS[target - 1]
            with self._tx(f"migration to schema {target}") as db:
                if callable(step):
                    step(db)
                else:
                    for statement in _split_sql(step):
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={target}")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def ping(self) -> bool:
        """True when the database answers a read (used by gRPC health)."""
        try:
            with self._lock:
                self._db.execute("SELECT COUNT(*) FROM meta").fetchone()
            self.healthy_read = True
        except sqlite3.Error:
            self.healthy_read = False
        return self.healthy_read

    def probe_write(self) -> bool:
        """After a disk error: has space come back? Commits a block as large as the write that failed
        (a tiny write may fit where a batch does not), then deletes it. Updates `writable`."""
        size = min(max(self._failed_bytes, 4096), 8 << 20)
        try:
            with self._tx("health probe") as db:
                db.execute("INSERT OR REPLACE INTO health_probe(id, data) VALUES (1, zeroblob(?))", (size,))
            with self._tx("health probe") as db:
                db.execute("DELETE FROM health_probe")
        except StoreError:
            self.writable = False
            return False
        self._failed_bytes = 0
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes -----------------------------------------------------------------------------------
    @contextmanager
    def _tx(self, action: str) -> Iterator[sqlite3.Connection]:
        """One durable transaction: committed (fsync) on exit, rolled back on any error."""
        with self._lock, self._tx_locked(action) as db:
            yield db

    @contextmanager
    def _tx_locked(self, action: str) -> Iterator[sqlite3.Connection]:
        """`_tx` for a caller that already holds the lock."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if _is_disk_error(exc):
                self.writable = False
                self._failed_bytes = max(self._failed_bytes, self._tx_bytes)
            raise _store_error(action, exc) from None
        finally:
            self._tx_bytes = 0
        self.writable = True

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

    def append_batches(self, batches: Sequence[EventBatch], now_ms: int) -> list[int]:
        """Append columnar batches in ONE durable transaction (one fsync for all: group commit).

        Returns each batch's last sequence number; its events are `last - n + 1 .. last`, in order. On any
        error nothing is written and no sequence number is used up."""
        blobs = [(len(b.types), b.profile_id, b.session_id, now_ms, b.types.astype(np.uint8, copy=False).tobytes(),
                  b.item_ids.astype("<i8", copy=False).tobytes(), b.client_time_ms.astype("<i8", copy=False).tobytes(),
                  b.values.astype("<f4", copy=False).tobytes()) for b in batches]
        with self._lock:
            seq = self._next_seq
            params, lasts = [], []
            for blob in blobs:
                params.append((seq, *blob))
                seq += blob[0]
                lasts.append(seq - 1)
            self._tx_bytes = sum(len(p[5]) + len(p[6]) + len(p[7]) + len(p[8]) for p in params)
            with self._tx_locked("append events") as db:
                db.executemany("INSERT INTO event_batches(first_seq, n, profile_id, session_id, stored_ms, types, "
                               "item_ids, client_time_ms, event_values) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", params)
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?)", (str(seq),))
            self._next_seq = seq  # only once the commit is durable
            stats = self._stats
            for n, profile_id, *_ in blobs:
                st = stats.get(profile_id)
                if st is not None:  # a profile not read yet is read from the table when asked
                    stats[profile_id] = (st[0] + n, now_ms if st[1] is None else min(st[1], now_ms))
        return lasts

    def append_events(self, profile_id: str, session_id: str,
                      rows: Sequence[tuple[int, int, int, float]], now_ms: int) -> int:
        """Append (type, item_id, client_time_ms, value) rows in one durable transaction; last seq."""
        try:
            cols = list(zip(*rows)) if rows else [(), (), (), ()]
            batch = EventBatch(profile_id, session_id, np.array(cols[0], dtype=np.uint8),
                               np.array(cols[1], dtype=np.int64), np.array(cols[2], dtype=np.int64),
                               np.array(cols[3], dtype=np.float32))
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(f"store: append events failed: not a valid event row ({exc}); nothing was written") \
                from None
        if not len(batch.types):
            return self.last_seq()
        return self.append_batches([batch], now_ms)[0]

    def purge_before(self, cutoff_ms: int) -> tuple[int, set[str]]:
        """Retention: delete the event batches stored before `cutoff_ms`, the sessions that ended before it
        and the experiment exposures last seen before it. Returns (events deleted, profiles that lost
        events), so their in-memory state can be rebuilt."""
        with self._lock:
            with self._tx_locked("retention purge") as db:
                touched = {r[0] for r in db.execute(
                    "SELECT DISTINCT profile_id FROM event_batches WHERE stored_ms < ?", (cutoff_ms,))}
                ev = 0
                if touched:
                    ev = db.execute("SELECT COALESCE(SUM(n), 0) FROM event_batches WHERE stored_ms < ?",
                                    (cutoff_ms,)).fetchone()[0]
                    db.execute("DELETE FROM event_batches WHERE stored_ms < ?", (cutoff_ms,))
                db.execute("DELETE FROM sessions WHERE ended_ms IS NOT NULL AND ended_ms < ?", (cutoff_ms,))
                db.execute("DELETE FROM experiment_exposures WHERE last_ms < ?", (cutoff_ms,))
            self._stats.clear()  # hourly: the profiles asked about next are read again
            return int(ev), touched

    def forget_profile(self, profile_id: str) -> tuple[int, int]:
        """Erase a profile, its sessions, events and experiment exposures. Returns (events, sessions) deleted.

        The rows are overwritten (secure_delete), and the WAL, which still holds the old page images, is
        checkpointed into the database and truncated to zero bytes, so the profile is gone from the files
        too (best effort: a reader holding an old snapshot open delays the truncation to a later Forget)."""
        with self._lock:
            with self._tx_locked("forget profile") as db:
                ev = db.execute("SELECT COALESCE(SUM(n), 0) FROM event_batches WHERE profile_id=?",
                                (profile_id,)).fetchone()[0]
                db.execute("DELETE FROM event_batches WHERE profile_id=?", (profile_id,))
                db.execute("DELETE FROM experiment_exposures WHERE profile_id=?", (profile_id,))
                se = db.execute("DELETE FROM sessions WHERE profile_id=?", (profile_id,)).rowcount
                db.execute("DELETE FROM profiles WHERE profile_id=?", (profile_id,))
            self._stats.pop(profile_id, None)
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error:
                pass  # the erase itself is committed; the WAL is scrubbed at the next checkpoint
        return int(ev), int(se)

    _UPSERT_EXPOSURE = (
        "INSERT INTO experiment_exposures(experiment, profile_id, arm, day, first_ms, last_ms, ranks) "
        "SELECT ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM profiles WHERE profile_id=?) "
        "ON CONFLICT(experiment, profile_id, arm, day) DO UPDATE SET first_ms=min(first_ms, excluded.first_ms), "
        "last_ms=max(last_ms, excluded.last_ms), ranks=ranks + excluded.ranks")

    def record_exposures(self, rows: Sequence[ExposureRow]) -> None:
        """Add buffered exposures in ONE durable transaction. Rows of a profile that is no longer stored
        (forgotten while they waited in memory) are dropped, not written."""
        if not rows:
            return
        with self._tx("record exposures") as db:
            db.executemany(self._UPSERT_EXPOSURE, [(r.experiment, r.profile_id, r.arm, r.day, r.first_ms, r.last_ms,
                                                    r.ranks, r.profile_id) for r in rows])

    def exposures(self, experiment: str | None = None, profile_id: str | None = None,
                  after_day: int | None = None, through_day: int | None = None) -> list[ExposureRow]:
        """Stored exposures, filtered; ordered by experiment, day, profile, arm."""
        where, params = [], []
        for clause, value in (("experiment=?", experiment), ("profile_id=?", profile_id), ("day>?", after_day),
                              ("day<=?", through_day)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = ("SELECT experiment, profile_id, arm, day, first_ms, last_ms, ranks FROM experiment_exposures"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY experiment, day, profile_id, arm")
        return [ExposureRow(*r) for r in self._read(sql, params)]

    def event_type_counts(self, profile_id: str, from_ms: int, to_ms: int, n_types: int) -> np.ndarray:
        """How many events of each type a profile's batches stored in [from_ms, to_ms) hold (int64[n_types])."""
        out = np.zeros(n_types, dtype=np.int64)
        for (types,) in self._read("SELECT types FROM event_batches WHERE profile_id=? AND stored_ms>=? "
                                   "AND stored_ms<?", (profile_id, from_ms, to_ms)):
            t = np.frombuffer(types, dtype=np.uint8)
            out += np.bincount(t[t < n_types], minlength=n_types)
        return out

    def last_report_day(self, experiment: str) -> int | None:
        r = self._read("SELECT MAX(through_day) FROM experiment_reports WHERE experiment=?", (experiment,))[0][0]
        return int(r) if r is not None else None

    def report_spent(self, experiment: str) -> float:
        return float(self._read("SELECT COALESCE(SUM(epsilon), 0) FROM experiment_reports WHERE experiment=?",
                                (experiment,))[0][0])

    def spend_report(self, experiment: str, through_day: int, epsilon: float, budget: float, now_ms: int) -> bool:
        """Record a report's privacy spend, atomically with the check: False (nothing written) when it would
        take the experiment past `budget` or the days up to `through_day` were already reported."""
        with self._tx("record experiment report") as db:
            spent, last = db.execute("SELECT COALESCE(SUM(epsilon), 0), MAX(through_day) FROM experiment_reports "
                                     "WHERE experiment=?", (experiment,)).fetchone()
            if spent + epsilon > budget + 1e-12 or (last is not None and through_day <= last):
                return False
            db.execute("INSERT INTO experiment_reports(experiment, through_day, epsilon, made_ms) VALUES (?, ?, ?, ?)",
                       (experiment, through_day, epsilon, now_ms))
        return True

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
                self.healthy_read = False
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

    def iter_batches(self, profile_id: str | None = None, chunk: int = 256) -> Iterator[StoredBatch]:
        """Stored batches in durable order (for replaying state at start), columns as numpy arrays."""
        last = 0
        cols = "first_seq, n, profile_id, session_id, stored_ms, types, item_ids, client_time_ms, event_values"
        while True:
            if profile_id is None:
                rows = self._read(f"SELECT {cols} FROM event_batches WHERE first_seq>? ORDER BY first_seq LIMIT ?",
                                  (last, chunk))
            else:
                rows = self._read(f"SELECT {cols} FROM event_batches WHERE profile_id=? AND first_seq>? "
                                  "ORDER BY first_seq LIMIT ?", (profile_id, last, chunk))
            if not rows:
                return
            for r in rows:
                yield StoredBatch(r[0], r[2], r[3], r[4], np.frombuffer(r[5], dtype=np.uint8),
                                  np.frombuffer(r[6], dtype="<i8"), np.frombuffer(r[7], dtype="<i8"),
                                  np.frombuffer(r[8], dtype="<f4"))
            last = rows[-1][0]

    def iter_events(self, profile_id: str | None = None) -> Iterator[EventRow]:
        """Events one by one in durable order (tests, tools; the ranker replays `iter_batches`)."""
        for b in self.iter_batches(profile_id):
            for k, (t, i, c, v) in enumerate(zip(b.types.tolist(), b.item_ids.tolist(), b.client_time_ms.tolist(),
                                                 b.values.tolist())):
                yield EventRow(b.first_seq + k, b.profile_id, b.session_id, t, i, c, v)

    def event_stats(self, profile_id: str) -> tuple[int, int | None]:
        """(count, oldest stored_ms) of a profile's events: from the table on first use, then kept up to
        date by `append_batches`, `purge_before` and `forget_profile` (the only writers of event_batches)."""
        with self._lock:
            st = self._stats.get(profile_id)
            if st is None:
                r = self._read("SELECT COALESCE(SUM(n), 0), MIN(stored_ms) FROM event_batches WHERE profile_id=?",
                               (profile_id,))[0]
                st = (int(r[0]), int(r[1]) if r[1] is not None else None)
                if len(self._stats) >= 10_000:  # profiles are client-named: keep the memory bounded
                    self._stats.clear()
                self._stats[profile_id] = st
            return st

    def last_seq(self) -> int:
        """Sequence number of the last durable event (0 before the first)."""
        return self._next_seq - 1

    def catalog_rows(self) -> list[tuple[int, str, str, int | None, int]]:
        return [tuple(r) for r in self._read(
            "SELECT item_id, title, genres, year, maturity FROM catalog ORDER BY item_id")]

    def catalog_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM catalog")[0][0])


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
