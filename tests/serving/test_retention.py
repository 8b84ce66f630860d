"""Retention: events older than `store.event_retention_days` leave the database and the profile's memory."""

from __future__ import annotations

import sqlite3

import numpy as np

from appliance.client import ApplianceClient
from appliance.serving.core import now_ms
from appliance.serving.process import RankerProcess
from appliance.v1 import events_pb2

LIKE, DISLIKE = events_pb2.EVENT_TYPE_LIKE, events_pb2.EVENT_TYPE_DISLIKE
DAY_MS = 86_400_000


def _age_batches(db_path: str, session_id: str, days: float) -> None:
    """Make a session and its batches look `days` older (as if written then)."""
    db = sqlite3.connect(db_path)
    with db:
        db.execute("UPDATE event_batches SET stored_ms = stored_ms - ? WHERE session_id = ?",
                   (int(days * DAY_MS), session_id))
        db.execute("UPDATE sessions SET started_ms = started_ms - ?, ended_ms = ended_ms - ? WHERE session_id = ?",
                   (int(days * DAY_MS), int(days * DAY_MS), session_id))
    db.close()


def test_old_events_are_purged_and_the_profile_rebuilt_in_place(cfg):
    proc = RankerProcess(cfg.with_overrides(store={"event_retention_days": 30}))
    c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
    try:
        ids = np.random.default_rng(1).choice(proc.core.catalog.ids, 3, replace=False).tolist()
        old_sid = c.start_session("ret")
        c.send_events(old_sid, [(LIKE, ids[0]), (DISLIKE, ids[1])])
        c.end_session(old_sid)
        new_sid = c.start_session("ret")
        c.send_events(new_sid, [(LIKE, ids[2])])
        prof = proc.core._profiles["ret"]
        assert ids[0] in prof.positives and ids[1] in prof.disliked
        _age_batches(proc.cfg.path(proc.cfg.store.db_path), old_sid, days=31)

        assert proc.core.enforce_retention() == 2
        assert proc.core._profiles["ret"] is prof                 # same object: queued events still land
        assert ids[0] not in prof.positives and ids[1] not in prof.disliked and ids[2] in prof.positives
        assert c.explain("ret").events_stored == 1
        assert proc.store.count_sessions("ret") == 1              # the old, ended session went too
        assert proc.core.enforce_retention() == 0                 # nothing left to purge
    finally:
        c.close()
        proc.stop()


def test_events_past_retention_are_deleted_at_start(cfg):
    cfg = cfg.with_overrides(store={"event_retention_days": 7})
    proc = RankerProcess(cfg)
    c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
    item = int(proc.core.catalog.ids[5])
    sid = c.start_session("start")
    c.send_events(sid, [(LIKE, item)])
    c.close()
    proc.stop()
    _age_batches(cfg.path(cfg.store.db_path), sid, days=8)

    proc = RankerProcess(cfg)
    try:
        assert proc.store.event_stats("start")[0] == 0
        assert item not in proc.core._profiles["start"].positives
        oldest = proc.store.event_stats("start")[1]
        assert oldest is None or oldest >= now_ms() - 7 * DAY_MS
    finally:
        proc.stop()


def test_old_experiment_exposures_are_purged(cfg):
    """What arm a profile saw is kept no longer than its events."""
    from appliance.store import Store

    store = Store(cfg.path(cfg.store.db_path))
    try:
        now = now_ms()
        with store._tx("test") as db:
            db.execute("INSERT OR IGNORE INTO profiles(profile_id, created_ms, camera_consent, consent_updated_ms) "
                       "VALUES ('exp', ?, 0, ?)", (now, now))
            for ms in (now - 100 * DAY_MS, now - DAY_MS):
                db.execute("INSERT INTO experiment_exposures VALUES ('seed-002', 'exp', 'control', ?, ?, ?, 3)",
                           (ms // DAY_MS, ms, ms))
        store.purge_before(now - 30 * DAY_MS)
        rows = store._read("SELECT day FROM experiment_exposures WHERE profile_id='exp'")
        assert [r[0] for r in rows] == [(now - DAY_MS) // DAY_MS]
    finally:
        store.close()
