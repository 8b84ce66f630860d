"""The Rank hot path's hand-made response encoder must mean exactly what the generated message means."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.fusion.state import COMPLETE, LIKE, SKIP, AffectState, ProfileState, SessionState
from appliance.ranking import RankContext
from appliance.ranking.ranker import RankedItem, RankResult
from appliance.ranking.reasons import Reason
from appliance.serving.rankpath import encode_response, with_age
from appliance.serving.services import add_ranked_items
from appliance.v1 import ranker_pb2


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
    assert result.items
    assert ranker_pb2.RankResponse.FromString(encode_response(result)) == _reference(result)
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
