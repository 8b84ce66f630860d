"""SQLite store: durability settings, migrations, forget, integrity, read-only failure."""

from __future__ import annotations

import sqlite3

import pytest

from appliance.errors import StoreError
from appliance.store import Store
from appliance.store.schema import SCHEMA_VERSION


def test_events_roundtrip_in_order(tmp_path):
    s = Store(tmp_path / "a.db")
    s.start_session("s" * 32, "p1", 1, 10)
    seq = s.append_events("p1", "s" * 32, [(1, 10, 100, 0.0), (5, 11, 101, 0.0), (4, 12, 102, 0.5)], 200)
    assert seq == 3
    rows = list(s.iter_events("p1"))
    assert [(r.type, r.item_id) for r in rows] == [(1, 10), (5, 11), (4, 12)]
    assert s.event_stats("p1") == (3, 200)


def test_wal_and_full_sync(tmp_path):
    s = Store(tmp_path / "a.db")
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync at every commit


def test_consent_defaults_off_and_persists(tmp_path):
    s = Store(tmp_path / "a.db")
    assert s.ensure_profile("p", 1).camera_consent is False
    s.set_consent("p", True, 2)
    s.close()
    again = Store(tmp_path / "a.db")
    assert again.get_profile("p").camera_consent is True


def test_forget_removes_everything_of_one_profile_only(tmp_path):
    s = Store(tmp_path / "a.db")
    s.start_session("a" * 32, "alice", 1, 1)
    s.start_session("b" * 32, "bob", 1, 1)
    s.append_events("alice", "a" * 32, [(1, 1, 1, 0.0)] * 5, 2)
    s.append_events("bob", "b" * 32, [(1, 2, 1, 0.0)] * 3, 2)
    assert s.forget_profile("alice") == (5, 1)
    assert s.get_profile("alice") is None and list(s.iter_events("alice")) == []
    assert len(list(s.iter_events("bob"))) == 3 and s.get_session("b" * 32) is not None


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "a.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this build"):
        Store(path)


def test_corrupt_file_is_refused_with_clear_error(tmp_path):
    path = tmp_path / "a.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="a.db"):
        Store(path)


def test_failed_write_changes_nothing(tmp_path):
    s = Store(tmp_path / "a.db")
    s.start_session("a" * 32, "alice", 1, 1)
    s.append_events("alice", "a" * 32, [(1, 1, 1, 0.0)], 2)
    with pytest.raises(StoreError):  # second row violates NOT NULL: the whole batch rolls back
        s.append_events("alice", "a" * 32, [(1, 2, 1, 0.0), (1, None, 1, 0.0)], 3)
    assert [r.item_id for r in s.iter_events("alice")] == [1]


def test_catalog_import_upserts_and_replaces(tmp_path):
    s = Store(tmp_path / "a.db")
    s.import_catalog([(1, "A (1999)", "Comedy", 1999, 1), (2, "B", "Drama", None, 3)])
    s.import_catalog([(2, "B2", "Drama", None, 3)])
    assert [r[1] for r in s.catalog_rows()] == ["A (1999)", "B2"]
    s.import_catalog([(3, "C", "Horror", 2000, 4)], replace=True)
    assert [r[0] for r in s.catalog_rows()] == [3]


def test_schema_1_events_migrate_to_batches(tmp_path):
    """A store written by schema 1 (one row per event) opens with its events, sequence numbers and order."""
    from appliance.store.schema import MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version=1;")
    db.execute("INSERT INTO profiles VALUES ('p1', 1, 0, 1)")
    db.execute("INSERT INTO sessions VALUES ('s1', 'p1', 1, 1, NULL)")
    rows = [("p1", "s1", 1, 10, 100, 0.0, 5), ("p1", "s1", 8, 11, 101, 30.5, 5), ("p1", "s1", 4, 12, 102, 0.0, 6),
            ("p2", "s2", 5, 13, 103, 0.0, 6)]
    db.executemany("INSERT INTO events(profile_id, session_id, type, item_id, client_time_ms, value, stored_ms) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("DELETE FROM events WHERE seq=2")  # a gap, as a Forget of an older profile would leave
    db.commit()
    db.close()
    s = Store(path)
    assert s.schema_version == SCHEMA_VERSION
    got = [(e.seq, e.profile_id, e.type, e.item_id, e.client_time_ms, e.value) for e in s.iter_events()]
    assert got == [(1, "p1", 1, 10, 100, 0.0), (3, "p1", 4, 12, 102, 0.0), (4, "p2", 5, 13, 103, 0.0)]
    assert s.event_stats("p1") == (2, 5)
    assert s.append_events("p1", "s1", [(9, 14, 104, 0.0)], 7) == 5  # numbering goes on after the old rows
    tables = {r[0] for r in s._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "events" not in tables


def test_sequence_numbers_are_never_reused_after_forget(tmp_path):
    s = Store(tmp_path / "a.db")
    s.start_session("a" * 32, "alice", 1, 1)
    last = s.append_events("alice", "a" * 32, [(1, 1, 1, 0.0)] * 4, 2)
    s.forget_profile("alice")  # the newest events are gone
    s.close()
    again = Store(tmp_path / "a.db")
    assert again.last_seq() == last
    again.start_session("b" * 32, "bob", 1, 3)
    assert again.append_events("bob", "b" * 32, [(1, 2, 1, 0.0)], 4) == last + 1


def test_group_commit_appends_many_batches_in_one_transaction(tmp_path):
    import numpy as np

    from appliance.store import EventBatch

    s = Store(tmp_path / "a.db")
    batches = [EventBatch("p", f"{i:032d}", np.full(n, 9, np.uint8), np.arange(1, n + 1, dtype=np.int64),
                          np.zeros(n, np.int64), np.zeros(n, np.float32)) for i, n in enumerate((3, 1, 5))]
    assert s.append_batches(batches, 10) == [3, 4, 9]
    assert [(b.first_seq, b.session_id, len(b.types)) for b in s.iter_batches()] == \
        [(1, f"{0:032d}", 3), (4, f"{1:032d}", 1), (5, f"{2:032d}", 5)]
    assert s.event_stats("p") == (9, 10)


def test_event_stats_stay_equal_to_the_table_through_appends_purges_forgets_and_failures(tmp_path):
    """Explain's counts are kept in memory after the first read (no per-call scan of a profile's history);
    whatever the writes, they must equal what the table says, and a failed write must not move them."""
    import random

    import numpy as np

    from appliance.store import EventBatch

    def table(store: Store, profile: str) -> tuple[int, int | None]:
        n, oldest = store._db.execute("SELECT COALESCE(SUM(n), 0), MIN(stored_ms) FROM event_batches "
                                      "WHERE profile_id=?", (profile,)).fetchone()
        return int(n), oldest

    rng = random.Random(7)
    s = Store(tmp_path / "a.db")
    # a group commit holding a batch of "doomed" fails in the database, after the other batches' inserts
    s._db.execute("CREATE TRIGGER doomed BEFORE INSERT ON event_batches WHEN NEW.profile_id = 'doomed' "
                  "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    profiles = ["p0", "p1", "p2"]
    for i, p in enumerate(profiles):
        s.start_session(f"{i:032d}", p, 1, 1)
    now = 10
    for step in range(300):
        now += rng.randint(1, 5)
        p = rng.choice(profiles)
        op = rng.random()
        if op < 0.75:
            s.append_events(p, f"{profiles.index(p):032d}", [(1, 7, now, 0.0)] * rng.randint(1, 4), now)
        elif op < 0.8:
            s.purge_before(now - rng.randint(5, 60))
        elif op < 0.83:
            s.forget_profile(p)
            s.start_session(f"{profiles.index(p):032d}", p, 1, now)
        elif op < 0.9:  # a group commit that fails in the database changes nothing, stats included
            one = np.ones(2, np.int64)
            with pytest.raises(StoreError):
                s.append_batches([EventBatch(p, f"{profiles.index(p):032d}", np.ones(2, np.uint8), one * 7, one * now,
                                             np.zeros(2, np.float32)),
                                  EventBatch("doomed", "d" * 32, np.ones(2, np.uint8), one * 7, one * now,
                                             np.zeros(2, np.float32))], now)
        q = rng.choice(profiles)
        assert s.event_stats(q) == table(s, q), f"step {step}"
    assert s.event_stats("nobody") == (0, None)
