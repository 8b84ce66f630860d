"""Event ingest: group commit, visibility at ack, back-pressure with a retry hint, per-client rate limits."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from appliance.client import ApplianceClient
from appliance.serving.ingest import EventBatchWire
from appliance.serving.process import RankerProcess
from appliance.serving.rankpath import decode_packed_int64, encode_varint
from appliance.v1 import events_pb2

PLAY, SKIP, DISLIKE, BROWSE, LIKE = (events_pb2.EVENT_TYPE_PLAY, events_pb2.EVENT_TYPE_SKIP,
                                     events_pb2.EVENT_TYPE_DISLIKE, events_pb2.EVENT_TYPE_BROWSE,
                                     events_pb2.EVENT_TYPE_LIKE)


def _ids(ranker: RankerProcess, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).choice(ranker.core.catalog.ids, n, replace=False).tolist()


def test_concurrent_batches_are_group_committed_and_all_durable(ranker, client):
    sessions = [client.start_session(f"g{i}") for i in range(6)]
    items = _ids(ranker, 50)
    acks: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def pump(j: int) -> None:
        c = ApplianceClient(f"unix:{ranker.servers.unix_socket}")
        rng = np.random.default_rng(j)
        for _ in range(15):
            n = int(rng.integers(1, 300))
            ack = c.send_events(sessions[j], [(BROWSE, int(x)) for x in rng.choice(items, n)])
            with lock:
                acks.append((j, ack.durable_seq - ack.accepted + 1, ack.durable_seq))
        c.close()

    threads = [threading.Thread(target=pump, args=(j,)) for j in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer = ranker.core.writer
    assert writer.commits < len(acks)  # several calls shared one fsync
    spans = sorted((a, b) for _, a, b in acks)
    assert all(prev[1] < nxt[0] for prev, nxt in zip(spans, spans[1:]))  # no sequence number given twice
    stored = {}
    for b in ranker.store.iter_batches():
        stored[b.first_seq] = (b.session_id, len(b.types))
    for j, first, last in acks:
        assert stored[first] == (sessions[j], last - first + 1)
    assert ranker.store.last_seq() == max(b for _, b in spans)


def test_an_acknowledged_event_is_visible_to_the_next_rank(ranker, client):
    sid = client.start_session("vis")
    for _ in range(5):
        top = client.rank(sid, k=5).items[0].item_id
        client.send_events(sid, [(DISLIKE, top)])
        assert top not in [it.item_id for it in client.rank(sid, k=5).items]  # the very next call sees it


def test_repeated_rank_is_served_from_cache_until_an_event_arrives(ranker, client):
    sid = client.start_session("cache")
    cands = _ids(ranker, 300, seed=4)
    first = client.rank(sid, k=10, candidate_ids=cands)
    hits = ranker.core.rank_cache.hits
    again = client.rank(sid, k=10, candidate_ids=cands)
    assert ranker.core.rank_cache.hits == hits + 1
    assert again == first
    client.send_events(sid, [(SKIP, first.items[0].item_id)])
    after = client.rank(sid, k=10, candidate_ids=cands)
    assert first.items[0].item_id not in [it.item_id for it in after.items]
    assert ranker.core.rank_cache.hits == hits + 1  # the event made it compute afresh


def _unpacked(session: str, rows: list[tuple[int, int, int]]) -> bytes:
    """An EventBatch with every repeated field unpacked (legal protobuf a parser must accept)."""
    varint = encode_varint  # the server's own encoder; the decoder is checked against protobuf below
    body = b"\x0a" + varint(len(session)) + session.encode()
    for t, i, c in rows:
        body += b"\x10" + varint(t) + b"\x18" + varint(i) + b"\x20" + varint(c)
    return body


def test_unpacked_and_packed_batches_mean_the_same(ranker, client):
    sid = client.start_session("wire")
    items = _ids(ranker, 3, seed=9)
    raw = client.channel.unary_unary("/appliance.v1.Events/IngestBatch", request_serializer=None,
                                     response_deserializer=events_pb2.IngestAck.FromString)
    ack = raw(_unpacked(sid, [(PLAY, items[0], 5), (BROWSE, items[1], 6), (SKIP, items[2], 7)]), timeout=5)
    assert ack.accepted == 3
    rows = [(e.type, e.item_id, e.client_time_ms) for e in ranker.store.iter_events("wire")]
    assert rows == [(PLAY, items[0], 5), (BROWSE, items[1], 6), (SKIP, items[2], 7)]
    for bad in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x1a\x02\x80\x80"):
        with pytest.raises(grpc.RpcError) as err:
            raw(bad, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_varint_decoder_matches_protobuf():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 1000, 1001, 20_000):
        vals = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
        vals[: n // 2] = rng.integers(0, 1 << 20, n // 2)
        if n == 1001:
            vals[:] = rng.integers(1, 200_000, n)  # 1 to 3 bytes each: a Rank's candidate ids
        if n == 20_000:
            vals[:] = 1_700_000_000_000 + np.arange(n)  # all the same length: the 2-D path
        packed = EventBatchWire.FromString(events_pb2.EventBatch(item_ids=vals.tolist()).SerializeToString()).item_ids
        assert np.array_equal(decode_packed_int64(packed[0]), vals)
        assert b"".join(encode_varint(int(v)) for v in vals) == packed[0]  # and the encoder writes the same
    for bad in (b"\x80", b"\x01\xff", b"\xff" * 11 + b"\x01"):
        with pytest.raises(ValueError):
            decode_packed_int64(bad)


@pytest.fixture
def held_ranker(cfg):
    """A ranker whose disk holds every commit until the test opens `gate`."""
    proc = RankerProcess(cfg.with_overrides(serving={"ingest_queue_events": 100, "client_events_per_s": 0}))
    original = proc.store.append_batches
    proc.committing, proc.gate = threading.Event(), threading.Event()

    def held(batches, now_ms):  # noqa: ANN001, ANN202
        proc.committing.set()
        proc.gate.wait(10)
        return original(batches, now_ms)

    proc.store.append_batches = held
    yield proc
    proc.gate.set()
    proc.stop()


def test_full_queue_answers_resource_exhausted_with_a_retry_hint(held_ranker):
    proc = held_ranker
    c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
    c.wait_ready(10)
    sid = c.start_session("flood")
    items = _ids(proc, 60, seed=2)
    results: list[object] = []

    def send() -> None:
        try:
            results.append(c.send_events(sid, [(BROWSE, i) for i in items]))
        except grpc.RpcError as exc:
            results.append(exc)

    first = threading.Thread(target=send)
    first.start()
    assert proc.committing.wait(10)  # 60 events in the commit; the queue holds at most 100
    for _ in range(3):
        send()  # 60 more do not fit: refused at once, not queued
    proc.gate.set()
    first.join()
    send()  # room again
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    acked = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert len(refused) == 3 and len(acked) == 2
    for r in refused:
        assert r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = dict(r.trailing_metadata())["retry-after-ms"]
        assert 1 <= int(hint) <= 2000
    assert proc.store.event_stats("flood")[0] == 60 * len(acked)  # refused calls wrote nothing
    assert proc.core.writer.queued_events == 0 and proc.core.writer.rejected == 3
    c.close()


def test_per_client_rate_limit(cfg):
    proc = RankerProcess(cfg.with_overrides(serving={"client_events_per_s": 50, "client_burst_events": 200}))
    try:
        c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
        sid = c.start_session("chatty")
        items = _ids(proc, 100, seed=3)
        c.send_events(sid, [(BROWSE, i) for i in items])
        c.send_events(sid, [(BROWSE, i) for i in items])
        with pytest.raises(grpc.RpcError) as err:
            c.send_events(sid, [(BROWSE, i) for i in items])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_ms = int(dict(err.value.trailing_metadata())["retry-after-ms"])
        assert 1 <= wait_ms <= 2000
        # another client (its own x-client-id) has its own bucket
        batch = events_pb2.EventBatch(session_id=sid, types=[BROWSE] * 100, item_ids=items, client_time_ms=[1] * 100)
        assert c.events.IngestBatch(batch, metadata=(("x-client-id", "tv-2"),), timeout=5).accepted == 100
        time.sleep(wait_ms / 1e3 + 0.05)
        assert c.send_events(sid, [(BROWSE, i) for i in items]).accepted == 100  # the hint was right
        assert proc.store.event_stats("chatty")[0] == 400
        assert proc.core.limiter.rejected == 1
        c.close()
    finally:
        proc.stop()


@pytest.mark.parametrize("n", [1, 50, 5000])
def test_column_decoder_equals_the_message_parser(n):
    from appliance.serving.ingest import _parse_slow, parse_event_batch

    rng = np.random.default_rng(n)
    batch = events_pb2.EventBatch(session_id="a" * 32, types=rng.integers(1, 10, n).tolist(),
                                  item_ids=rng.integers(1, 200_000, n).tolist(),
                                  client_time_ms=(1_700_000_000_000 + rng.integers(0, 10**6, n)).tolist(),
                                  values=rng.uniform(-5, 500, n).astype(np.float32).tolist())
    raw = batch.SerializeToString()
    fast, slow = parse_event_batch(raw, 10_000), _parse_slow(raw, 10_000)
    for name in ("types", "item_ids", "client_time_ms", "values"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.session_id == slow.session_id == "a" * 32


def test_the_ranking_state_is_prepared_before_the_ack(ranker, client):
    """The event path derives the session's ranking state before acknowledging, so the Rank that follows
    an event finds it ready (tagged with the versions the event produced) instead of paying for it."""
    sid = client.start_session("prep")
    items = _ids(ranker, 3, seed=9)
    client.send_events(sid, [(DISLIKE, items[0]), (LIKE, items[1]), (LIKE, items[2])])
    live = ranker.core._sessions[sid]
    prof = ranker.core._profiles[live.profile_id]
    cached = live.state.ranker_cache
    assert cached is not None and cached[0] is ranker.core.ranker
    assert (cached[1], cached[2]) == (prof.version, live.state.version)
    derived = cached[3]
    assert set(derived.pitems) == {items[1], items[2]}
    rows, known = ranker.core.catalog.index_of(np.array([items[0]]))
    assert known[0] and rows[0] in set(derived.excl_rows.tolist())  # the disliked title is left out
    client.rank(sid, k=10)
    assert live.state.ranker_cache is cached  # the Rank used it as it was


def test_forget_drops_the_prepared_ranking_state(ranker, client):
    sid = client.start_session("forget-prep")
    client.send_events(sid, [(LIKE, _ids(ranker, 1, seed=3)[0])])
    state = ranker.core._sessions[sid].state
    assert state.ranker_cache is not None
    client.forget("forget-prep")
    assert state.ranker_cache is None
