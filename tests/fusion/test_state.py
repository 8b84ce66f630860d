"""Fusion state: per-event rules, replay equals live application, forget, affect freshness."""

from __future__ import annotations

import time

import numpy as np
import pytest

from appliance.errors import ValidationError
from appliance.fusion.state import (
    BROWSE,
    COMPLETE,
    DISLIKE,
    DWELL,
    LIKE,
    PAUSE,
    PLAY,
    SEEK,
    SKIP,
    AffectState,
    ProfileState,
    SessionState,
    TitleSet,
)
from appliance.ranking.catalog import Catalog

TOY_STORY, JUMANJI, HEAT = 1, 2, 6


def _random_events(catalog: Catalog, n: int, seed: int) -> list[tuple[int, int, int, float]]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(catalog.ids[:400], size=n)
    types = rng.integers(1, 10, size=n)
    vals = rng.uniform(0, 120, size=n).astype(np.float32)
    return [(int(t), int(i), 1_700_000_000_000 + 1000 * k, float(v)) for k, (t, i, v) in
            enumerate(zip(types, ids, vals))] + [(PLAY, 999_999_999, 1_800_000_000_000, 0.0)]  # unknown id


def test_event_rules(catalog: Catalog) -> None:
    p = ProfileState("p", catalog)
    g = catalog.genre_index
    assert p.apply_event(PLAY, TOY_STORY, 1, 0.0)
    assert TOY_STORY in p.watched and TOY_STORY in p.positives and TOY_STORY not in p.completed
    p.apply_event(COMPLETE, TOY_STORY, 2, 0.0)
    assert TOY_STORY in p.completed and p.positives[TOY_STORY].weight == 1.0
    p.apply_event(LIKE, JUMANJI, 3, 0.0)
    assert p.positives[JUMANJI].kind == "liked" and list(p.positives)[-1] == JUMANJI
    p.apply_event(DISLIKE, JUMANJI, 4, 0.0)
    assert JUMANJI in p.disliked and JUMANJI not in p.liked and JUMANJI not in p.positives
    before = p.genre_affinity.copy()
    p.apply_event(PAUSE, HEAT, 5, 0.0)
    p.apply_event(SEEK, HEAT, 6, 1234.0)
    np.testing.assert_array_equal(p.genre_affinity, before)
    p.apply_event(SKIP, HEAT, 7, 0.0)  # Heat: Action|Crime|Thriller
    assert p.genre_affinity[g["Crime"]] < 0
    p.apply_event(DWELL, HEAT, 8, 600.0)
    p.apply_event(BROWSE, HEAT, 9, 0.0)
    assert p.n_events == 9 and p.last_ts_ms == 9
    assert not p.apply_event(PLAY, 10**12, 10, 0.0)  # unknown title: recorded, no genre update
    with pytest.raises(ValidationError):
        p.apply_event(0, TOY_STORY, 11, 0.0)
    with pytest.raises(ValidationError):
        p.apply_event(10, TOY_STORY, 11, 0.0)
    assert p.top_genres(3)[0][1] > 0


def test_session_skips_and_decay(catalog: Catalog) -> None:
    s = SessionState("p", "s", catalog)
    g = catalog.genre_index
    s.apply_event(SKIP, HEAT, 1, 0.0)
    s.apply_event(LIKE, TOY_STORY, 2, 0.0)
    assert HEAT in s.excluded and s.last_item == TOY_STORY
    assert s.genre_affinity[g["Thriller"]] < 0 < s.genre_affinity[g["Comedy"]]
    for k in range(60):
        s.apply_event(BROWSE, JUMANJI, 3 + k, 0.0)
    assert len(s.events) == 50
    assert abs(s.genre_affinity[g["Thriller"]]) < 1e-4  # old choices fade


def test_replay_equals_live(catalog: Catalog) -> None:
    events = _random_events(catalog, 2000, seed=3)
    live = ProfileState("p", catalog)
    for e in events:
        live.apply_event(*e)
    rebuilt = ProfileState.replay("p", catalog, events)
    assert rebuilt.snapshot() == live.snapshot()
    np.testing.assert_array_equal(rebuilt.genre_affinity, live.genre_affinity)


def test_forget_erases_everything(catalog: Catalog) -> None:
    p = ProfileState.replay("p", catalog, _random_events(catalog, 300, seed=4))
    v = p.version
    p.forget()
    assert p.snapshot() == ProfileState("p", catalog).snapshot()
    assert p.version > v


def test_apply_event_is_fast(catalog: Catalog) -> None:
    events = _random_events(catalog, 20000, seed=5)
    p, s = ProfileState("p", catalog), SessionState("p", "s", catalog)
    t = time.perf_counter()
    for e in events:
        p.apply_event(*e)
        s.apply_event(*e)
    per = (time.perf_counter() - t) / len(events) * 1e6
    print(f"apply_event profile+session: {per:.1f} us per event")


def test_affect_age_and_freshness() -> None:
    a = AffectState(0.5, 0.2, 0.8, (0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.1), faces=1,
                    capture_ns=10_000_000_000, received_ns=10_010_000_000)
    assert a.age_s(10_500_000_000) == pytest.approx(0.5)
    assert a.is_fresh(10_500_000_000, 1.0)
    assert not a.is_fresh(11_000_000_000, 1.0)
    assert a.age_s(9_000_000_000) == 0.0  # a capture stamped in the future counts as age 0
    nobody = AffectState(0.5, 0.2, 0.8, faces=0, capture_ns=10_000_000_000)
    assert not nobody.is_fresh(10_100_000_000, 1.0)


def test_title_set_behaves_like_a_set_of_catalog_ids(catalog):
    rng = np.random.default_rng(3)
    ts, ref = TitleSet(catalog), set()
    ids = rng.choice(catalog.ids, 300, replace=False).tolist()
    for _ in range(2000):
        op, i = int(rng.integers(0, 4)), ids[int(rng.integers(0, len(ids)))]
        if op == 0:
            ts.add(i)
            ref.add(i)
        elif op == 1:
            ts.discard(i)
            ref.discard(i)
        elif op == 2:
            batch = rng.choice(ids, 5).tolist()
            ts.update(batch)
            ref.update(batch)
        else:
            batch = rng.choice(ids, 5).tolist()
            ts.difference_update(batch)
            ref.difference_update(batch)
    assert list(ts) == sorted(ref) and len(ts) == len(ref)
    assert all((i in ts) == (i in ref) for i in ids)
    ts.add(10**12)  # not in the catalog: never rankable, not kept
    assert 10**12 not in ts and len(ts) == len(ref)


def test_profile_memory_does_not_grow_with_history(catalog):
    """A household that has touched every title holds sets of the same size as a new one."""
    p = ProfileState("p", catalog)
    before = sum(t.mask.nbytes for t in (p.watched, p.completed, p.liked, p.disliked))
    for t, item in enumerate(catalog.ids.tolist()):
        p.apply_event((PLAY, COMPLETE, LIKE, DISLIKE)[t % 4], item, t)
    assert len(p.watched) > len(catalog) // 3 and len(p.disliked) > len(catalog) // 5
    assert sum(t.mask.nbytes for t in (p.watched, p.completed, p.liked, p.disliked)) == before
    assert len(p.positives) <= 50
