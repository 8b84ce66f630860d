"""Profiles are isolated from each other; Profile.Forget erases a profile everywhere within 100 ms."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from appliance.client import ApplianceClient
from appliance.fusion import AffectState
from appliance.serving.process import RankerProcess
from appliance.v1 import events_pb2

PLAY, LIKE, COMPLETE, DISLIKE, SKIP, BROWSE = (events_pb2.EVENT_TYPE_PLAY, events_pb2.EVENT_TYPE_LIKE,
                                              events_pb2.EVENT_TYPE_COMPLETE, events_pb2.EVENT_TYPE_DISLIKE,
                                              events_pb2.EVENT_TYPE_SKIP, events_pb2.EVENT_TYPE_BROWSE)


def _state_of(ranker: RankerProcess, profile: str, session: str) -> tuple:
    core = ranker.core
    prof = core._profiles[profile]
    return (prof.snapshot(), core._sessions[session].state.version, core._consent.get(profile),
            [(e.seq, e.type, e.item_id) for e in ranker.store.iter_events(profile)],
            ranker.store.get_profile(profile), ranker.store.get_session(session))


def test_calls_with_one_profiles_session_never_touch_another(ranker, client):
    ids = np.random.default_rng(0).choice(ranker.core.catalog.ids, 60, replace=False).tolist()
    sa, sb = client.start_session("anna"), client.start_session("ben")
    client.set_consent("ben", True)
    ben_items = ids[:20]
    client.send_events(sb, [(LIKE, i) for i in ben_items[:10]] + [(COMPLETE, i) for i in ben_items[10:]])
    before = _state_of(ranker, "ben", sb)
    anna_items = ids[20:40]
    for _ in range(3):
        r = client.rank(sa, k=20, candidate_ids=ids)  # ben's titles among the candidates
        for it in r.items:  # anna's reasons only ever name anna's own titles
            assert all(reason.because_item_id in (0, *anna_items) for reason in it.reasons)
        client.send_events(sa, [(PLAY, i) for i in anna_items[:5]] + [(DISLIKE, i) for i in ben_items[:5]])
        client.stream_events(sa, [(SKIP, ben_items[5])])
        assert not r.affect_used  # ben's consent does not open affect for anna
    r = client.rank(sa, k=20, candidate_ids=ids)
    assert all(reason.because_item_id in (0, *anna_items) for it in r.items for reason in it.reasons)
    client.end_session(sa)
    assert _state_of(ranker, "ben", sb) == before
    # ben's own ranking still leaves out what ben completed, not what anna disliked
    rb = [it.item_id for it in client.rank(sb, k=40, candidate_ids=ids).items]
    assert not set(rb) & set(ben_items[10:]) and set(rb) & set(ben_items[:5])


def test_rank_cache_is_per_session(ranker, client):
    ids = np.random.default_rng(1).choice(ranker.core.catalog.ids, 200, replace=False).tolist()
    sa, sb = client.start_session("carla"), client.start_session("dan")
    client.send_events(sb, [(LIKE, i) for i in ids[:15]])
    ra = client.rank(sa, k=10, candidate_ids=ids)
    rb = client.rank(sb, k=10, candidate_ids=ids)  # same request bytes but for dan: not carla's cached answer
    assert [it.item_id for it in ra.items] != [it.item_id for it in rb.items]
    assert all(reason.because_item_id in (0, *ids[:15]) for it in rb.items for reason in it.reasons)
    assert all(reason.because_item_id == 0 for it in ra.items for reason in it.reasons)


def test_forget_erases_everything_within_100_ms(cfg):
    proc = RankerProcess(cfg.with_overrides(serving={"client_events_per_s": 0}))
    try:
        c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
        secret = "forget-me-4242"
        ids = proc.core.catalog.ids.tolist()
        sid = c.start_session(secret)
        keep = c.start_session("keep-me")
        c.set_consent(secret, True)
        rng = np.random.default_rng(2)
        for _ in range(20):  # 100,000 events
            c.send_events(sid, [(BROWSE, int(i)) for i in rng.choice(ids, 5000)])
        c.send_events(keep, [(PLAY, ids[0])])
        c.rank(sid, k=10, candidate_ids=ids[:500])
        c.rank(sid, k=10, candidate_ids=ids[:500])  # cached now
        proc.core.on_affect(AffectState(0.5, 0.5, 0.9, faces=1, capture_ns=time.monotonic_ns(),
                                        received_ns=time.monotonic_ns()), sid)
        assert proc.core.latest_affect() is not None and len(proc.core.rank_cache) > 0
        keep_before = [(e.seq, e.item_id) for e in proc.store.iter_events("keep-me")]

        t0 = time.perf_counter()
        out = c.forget(secret)
        forget_ms = (time.perf_counter() - t0) * 1e3
        print(f"Profile.Forget of {out.events_deleted} events: {forget_ms:.1f} ms")
        assert out.events_deleted == 100_000 and out.sessions_deleted == 1
        assert forget_ms < 100, forget_ms

        # store
        assert proc.store.get_profile(secret) is None and proc.store.event_stats(secret) == (0, None)
        assert proc.store.get_session(sid) is None
        # memory: profile state, session, consent, affect, cached answers
        core = proc.core
        assert secret not in core._profiles and secret not in core._consent and sid not in core._sessions
        assert core.latest_affect() is None
        assert len(core.rank_cache) == 0
        # the API
        with pytest.raises(grpc.RpcError) as err:
            c.rank(sid, k=3)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            c.explain(secret)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # the files: rows overwritten, WAL checkpointed and truncated
        db = Path(proc.store.path)
        for f in (db, Path(f"{db}-wal")):
            if f.exists():
                assert secret.encode() not in f.read_bytes(), f"{f.name} still holds the profile id"
                assert sid.encode() not in f.read_bytes(), f"{f.name} still holds the session id"
        # the other profile is untouched
        assert [(e.seq, e.item_id) for e in proc.store.iter_events("keep-me")] == keep_before
        assert len(c.rank(keep, k=3).items) == 3
        c.close()
    finally:
        proc.stop()


def test_events_queued_behind_a_forget_are_never_written(cfg):
    proc = RankerProcess(cfg.with_overrides(serving={"client_events_per_s": 0}))
    original = proc.store.append_batches
    committing = threading.Event()

    def slow(batches, now_ms):  # noqa: ANN001, ANN202 - a slow disk: calls pile up behind the first commit
        committing.set()
        time.sleep(0.3)
        return original(batches, now_ms)

    proc.store.append_batches = slow
    try:
        c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
        sid = c.start_session("racer")
        item = int(proc.core.catalog.ids[0])
        results: dict[str, object] = {}

        def send(name: str) -> None:
            try:
                results[name] = c.send_events(sid, [(BROWSE, item)] * 10).accepted
            except grpc.RpcError as exc:
                results[name] = exc.code()

        first = threading.Thread(target=send, args=("first",))
        first.start()
        assert committing.wait(10)  # the first batch is being committed
        second = threading.Thread(target=send, args=("second",))
        second.start()
        deadline = time.monotonic() + 10
        while proc.core.writer.queued_events < 20 and time.monotonic() < deadline:
            time.sleep(0.005)  # until the second one waits in the queue behind it
        assert proc.core.writer.queued_events == 20
        c.forget("racer")
        first.join()
        second.join()
        assert results["first"] == 10  # acknowledged before the Forget, and then erased by it
        # The second batch either joined the first one's group commit (acknowledged before the Forget, then
        # erased by it) or waited behind it and was refused; either way nothing is left after the Forget.
        assert results["second"] in (10, grpc.StatusCode.NOT_FOUND)
        assert proc.store.event_stats("racer") == (0, None)
        assert "racer" not in proc.core._profiles
        c.close()
    finally:
        proc.stop()
