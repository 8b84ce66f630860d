"""The Rank hot path's hand-made request decoding and response encoding must mean exactly what the
generated messages mean."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

from appliance.errors import ValidationError
from appliance.fusion.state import COMPLETE, LIKE, SKIP, AffectState, ProfileState, SessionState
from appliance.ranking import RankContext
from appliance.ranking.ranker import Explained, RankedItem, RankResult
from appliance.ranking.reasons import SIGNALS, Reason
from appliance.serving.rankpath import (
    RankCache,
    encode_response,
    encode_varint,
    parse_rank_request,
    with_age,
)
from appliance.serving.services import add_ranked_items
from appliance.v1 import common_pb2, ranker_pb2


def _reference(result: RankResult) -> ranker_pb2.RankResponse:
    resp = ranker_pb2.RankResponse(model_version=result.model_version, affect_used=result.affect_used,
                                   mood=result.mood)
    add_ranked_items(resp.items, result.items)
    return resp


@pytest.fixture(scope="module")
def real_ranker():
    from appliance.ranking import Ranker, RankerBundle
    from tests.ranking.conftest import BUNDLE_DIR

    bundle = RankerBundle.load(BUNDLE_DIR)
    return Ranker(bundle, bundle.catalog(), affect_weight=0.3, diversity=0.2, affect_stale_s=5.0)


@pytest.mark.parametrize("seed", range(12))
def test_encoded_response_parses_to_the_reference_message(real_ranker, seed):
    rng = np.random.default_rng(seed)
    cat = real_ranker.catalog
    p, s = ProfileState("h", cat), SessionState("h", "s", cat)
    for t, item in enumerate(rng.choice(cat.ids, int(rng.integers(0, 40)), replace=False).tolist()):
        (p if t % 2 else s).apply_event((COMPLETE, LIKE, SKIP)[t % 3], item, 1_700_000_000_000 + t)
    affect = None
    if seed % 3 == 0:  # fresh consented affect: a mood, an affect term, affect_used
        affect = AffectState(valence=0.6, arousal=0.5, engagement=1.0, faces=1, capture_ns=10**9, received_ns=10**9)
    ctx = RankContext(device=int(rng.integers(0, 4)), local_hour=int(rng.integers(-1, 24)), weekday=5,
                      max_maturity=int(rng.integers(1, 6)))
    cands = None if seed % 4 == 0 else rng.choice(cat.ids, 600, replace=False)
    result = real_ranker.rank(p, s, affect, affect is not None, ctx, cands, int(rng.integers(1, 40)), 10**9)
    assert result.explained is not None  # the ranker hands its items over as columns ...
    payload = encode_response(result)
    assert result.items
    assert ranker_pb2.RankResponse.FromString(payload) == _reference(result)
    # ... and the columns encode to the very bytes the RankedItem objects encode to
    assert encode_response(RankResult(result.items, result.affect_used, result.affect_age_s, result.mood,
                                      result.model_version)) == payload
    aged = ranker_pb2.RankResponse.FromString(with_age(encode_response(result), 0.25))
    assert aged.affect_age_s == pytest.approx(0.25) and list(aged.items) == list(_reference(result).items)


def test_edge_values_encode_like_protobuf():
    """Zero and negative scores and weights, empty texts, unicode titles, huge and negative ids."""
    items = [
        RankedItem(0, "", 0.0, {"sequence": 0.0, "affect": -0.0, "popularity": -1.5}, []),
        RankedItem(2**62, "Amélie — 千と千尋 🎬", -3.25, {"collaborative": 1e-30},
                   [Reason("", "", 0.0, 0), Reason("Because you liked Ü", "collaborative", -0.5, -7)]),
    ]
    result = RankResult(items, True, 0.5, "upbeat 😀", "v-ü")
    assert ranker_pb2.RankResponse.FromString(encode_response(result)) == _reference(result)
    assert ranker_pb2.RankResponse.FromString(encode_response(RankResult([], False, -1.0, "", ""))) == \
        ranker_pb2.RankResponse()


def test_edge_values_encode_alike_from_columns():
    """The columns' encoder (C where built) writes the bytes the item objects' encoder writes, edge values
    included: zero and -0.0 scores, NaN/inf contributions, empty and unicode texts, huge and negative ids."""
    T = np.zeros((len(SIGNALS), 3), np.float32)
    T[:, 0] = [0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-30]
    T[:, 2] = np.arange(8, dtype=np.float32) * 1e6
    ex = Explained([0, 2**62, -7], ["", "Amélie — 千と千尋 🎬", "x" * 300], np.array([0.0, -0.0, -3.25], np.float32), T,
                   [[], [("", "", 0.0, 0), ("Because you liked Ü", "collaborative", -0.5, -7)],
                    [("é" * 200, "sequence", 1e-40, 2**40)]])
    result = RankResult(ex, True, 0.5, "upbeat 😀", "v-ü")
    objects = RankResult(ex.items(), True, 0.5, "upbeat 😀", "v-ü")
    assert encode_response(result) == encode_response(objects)
    assert list(ranker_pb2.RankResponse.FromString(encode_response(result)).items) == \
        list(_reference(objects).items)


def _request(ids: list[int]) -> ranker_pb2.RankRequest:
    return ranker_pb2.RankRequest(session_id="a" * 32, k=7, candidate_ids=ids,
                                  context=common_pb2.Context(device=common_pb2.DEVICE_TYPE_TV, max_maturity=3))


def test_packed_and_unpacked_ids_decode_alike():
    """Packed sfixed64 (what generated clients send) and unpacked (legal protobuf) give the same ids and the
    same cache key; the rest of the request is read as the generated message reads it."""
    ids = [5, 1, 2**40, 193609, 5, -3]
    req = _request(ids)
    packed = parse_rank_request(req.SerializeToString())
    head = _request([]).SerializeToString()
    unpacked = parse_rank_request(head + b"".join(b"\x19" + struct.pack("<q", i) for i in ids))
    for call in (packed, unpacked):
        assert call.ids(100).tolist() == ids
        assert (call.session_id, call.k, call.context) == (req.session_id, req.k, req.context)
    assert packed.ids_key == unpacked.ids_key == np.array(ids, dtype="<i8").tobytes()
    assert parse_rank_request(head).ids(100) is None  # no ids: the whole catalog
    with pytest.raises(ValidationError, match="at most 5 per call, got 6"):
        parse_rank_request(req.SerializeToString()).ids(5)


def test_ids_written_as_varints_are_refused_not_misread():
    """A client built for the field's former int64 type: packed or unpacked varints are INVALID_ARGUMENT."""
    head = _request([]).SerializeToString()
    varints = b"".join(encode_varint(i) for i in (5, 1, 300))  # 4 bytes: not a whole number of sfixed64
    with pytest.raises(ValidationError, match="sfixed64"):
        parse_rank_request(head + b"\x1a" + bytes([len(varints)]) + varints).ids(100)
    with pytest.raises(ValidationError, match="sfixed64"):
        parse_rank_request(head + b"".join(b"\x18" + encode_varint(i) for i in (5, 1, 300)))
    for junk in (b"\x1a\x09" + bytes(8), b"\xff\xff\xff"):  # truncated field, garbage
        with pytest.raises(ValidationError, match="not a valid"):
            parse_rank_request(head + junk)


def test_rank_over_grpc_reads_unpacked_ids_and_refuses_varints(client):
    sid = client.start_session("wire")
    ids = [1, 2, 3, 5, 6]
    want = client.rank(sid, k=3, candidate_ids=ids)
    raw = client.channel.unary_unary("/appliance.v1.Ranker/Rank", request_serializer=None,
                                     response_deserializer=ranker_pb2.RankResponse.FromString)
    head = ranker_pb2.RankRequest(session_id=sid, k=3).SerializeToString()
    got = raw(head + b"".join(b"\x19" + struct.pack("<q", i) for i in ids), timeout=5)
    assert [it.item_id for it in got.items] == [it.item_id for it in want.items]
    with pytest.raises(grpc.RpcError) as err:
        raw(head + b"".join(b"\x18" + encode_varint(i) for i in ids), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sfixed64" in err.value.details()


def test_rank_context_per_minute_matches_a_fresh_one():
    """Kept per minute of the request's time, it must be what RankContext.from_request says for that very
    time, across hour and day boundaries and UTC offsets; refused values are refused every time."""
    from appliance.serving.core import rank_context

    rng = np.random.default_rng(3)
    day = 86_400_000
    times = [1_750_000_000_000 + int(x) for x in rng.integers(0, 30 * day, 300)]
    times += [h * 3_600_000 + d for h in range(486_110, 486_130) for d in (-1, 0, 1, 59_999, 60_000)]
    for t in times:
        for off in (0, 60, 330, -480, -1):
            for dev in (1, 2):
                want = RankContext.from_request(dev, t, off, 4)
                assert rank_context(dev, t, off, 4, "adult") == want
                assert rank_context(dev, t, off, 0, "13") == RankContext.from_request(dev, t, off, 3)
    for _ in range(2):
        with pytest.raises(ValidationError):
            rank_context(1, 1_750_000_000_000, 24 * 60 + 1, 4, "adult")


def test_rank_cache_is_a_per_session_lru_keyed_by_request_and_versions():
    cache = RankCache(per_session=2, max_sessions=2)
    ids = np.arange(1, 1001, dtype="<i8").tobytes()
    key = (10, "ctx", ids)
    cache.put("s1", key, (1, 1), b"a")
    assert cache.get("s1", (10, "ctx", bytes(ids)), (1, 1)) == b"a"  # equal keys, not the same objects
    assert cache.get("s1", key, (1, 2)) is None and cache.peek("s1", key) == (1, 1, b"a")  # stale versions
    assert cache.get("s1", (10, "ctx", ids[:-8]), (1, 1)) is None and cache.get("s2", key, (1, 1)) is None
    cache.put("s1", key, (1, 2), b"b")  # the same request again replaces its entry
    assert len(cache) == 1 and cache.get("s1", key, (1, 2)) == b"b"
    cache.put("s1", (9, "ctx", ids), (1, 2), b"c")
    cache.get("s1", key, (1, 2))  # now the most recent of the two
    cache.put("s1", (8, "ctx", ids), (1, 2), b"d")  # evicts the least recently used: k=9
    assert cache.peek("s1", (9, "ctx", ids)) is None and cache.peek("s1", key) == (1, 2, b"b")
    cache.put("s2", key, (0, 0), b"e")
    cache.put("s3", key, (0, 0), b"f")  # a third session evicts the oldest, s1
    assert cache.peek("s1", key) is None and len(cache) == 2
    cache.drop(["s2", "s3"])
    assert len(cache) == 0 and (cache.hits, cache.misses) == (3, 3)
