"""Mood words, intensity, the context prior's schedule, and a configurable mood table."""

from __future__ import annotations

from appliance.fusion.state import AffectState
from appliance.ranking.mood import active_context_keys, mood_intensity, mood_word
from appliance.ranking.ranker import RankContext, Ranker, SignalWeights


def test_mood_quadrants_and_neutral() -> None:
    assert mood_word(0.6, 0.5) == "upbeat"
    assert mood_word(0.6, -0.5) == "calm"
    assert mood_word(-0.6, 0.5) == "tense"
    assert mood_word(-0.6, -0.5) == "subdued"
    assert mood_word(0.05, -0.05) == "neutral"
    assert mood_word(float("nan"), 0.3) == "neutral"
    assert mood_intensity(0.05, 0.05, 1.0) == 0.0
    assert mood_intensity(0.6, 0.6, 1.0) == 1.0
    assert mood_intensity(0.6, 0.6, 0.0) == 0.5


def test_context_schedule() -> None:
    assert active_context_keys(1, 23, 2) == ["late_night"]
    assert active_context_keys(2, 3, 2) == ["late_night", "mobile"]
    assert active_context_keys(1, 14, 6) == ["weekend_daytime"]
    assert active_context_keys(1, 14, 2) == [] and active_context_keys(1, -1, -1) == []


def test_configurable_mood_table(bundle, catalog, profile, session) -> None:
    horror_fans = {"upbeat": {"Horror": 1.0}}
    r = Ranker(bundle, catalog, affect_weight=1.0, diversity=0.0, affect_stale_s=1.0, mood_table=horror_fans,
               weights=SignalWeights(popularity=0.0))  # a new profile: cold-start popularity 0.3 vs the mood
    a = AffectState(0.7, 0.5, 1.0, faces=1, capture_ns=1_000_000_000, received_ns=1_000_000_000)
    res = r.rank(profile, session, a, True, RankContext(1, 20, 1, 5), None, 10, 1_100_000_000)
    h = catalog.genre_index["Horror"]
    rows, _ = catalog.index_of([it.item_id for it in res.items])
    assert catalog.genres[rows, h].mean() >= 0.5
    assert all(it.contributions["affect"] > 0 for it in res.items if catalog.genres[catalog.row_of(it.item_id), h])
