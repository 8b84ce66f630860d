"""The in-process ranker on the committed model: gates, adaptation, affect rules, reasons, timing."""

from __future__ import annotations

import time

import numpy as np
import pytest

from appliance.errors import ValidationError
from appliance.fusion.state import (
    COMPLETE,
    DISLIKE,
    LIKE,
    PLAY,
    SKIP,
    AffectState,
    ProfileState,
    SessionState,
)
from appliance.ranking.bundle import RankerBundle
from appliance.ranking.catalog import Catalog, CatalogRow
from appliance.ranking.ranker import RankContext, Ranker, RankResult, SignalWeights
from appliance.ranking.reasons import SIGNALS

NOW = 50_000_000_000  # monotonic ns
TOY_STORY, TOY_STORY_2, MONSTERS_INC = 1, 3114, 4886


def _apply(profile: ProfileState, session: SessionState, events: list[tuple[int, int]]) -> None:
    for k, (t, item) in enumerate(events):  # the server applies every event to both
        profile.apply_event(t, item, 1_700_000_000_000 + k, 0.0)
        session.apply_event(t, item, 1_700_000_000_000 + k, 0.0)


def _upbeat(age_s: float = 0.1) -> AffectState:
    return AffectState(0.7, 0.5, 0.9, (0.0, 0.0, 0.0, 0.8, 0.0, 0.1, 0.1), faces=2,
                       capture_ns=NOW - int(age_s * 1e9), received_ns=NOW - int(age_s * 1e9) + 5_000_000)


def _texts(res: RankResult) -> list[str]:
    return [r.text for it in res.items for r in it.reasons]


def test_rank_returns_k_items_each_with_reasons(ranker, profile, session, tv_evening) -> None:
    _apply(profile, session, [(COMPLETE, TOY_STORY), (LIKE, TOY_STORY_2), (PLAY, MONSTERS_INC)])
    for cands in (None, np.array([], dtype=np.int64), ranker.catalog.ids[::7]):
        res = ranker.rank(profile, session, None, False, tv_evening, cands, 10, NOW)
        assert len(res.items) == 10 and res.model_version == ranker.bundle.version
        for it in res.items:
            assert it.reasons and all(r.text and r.signal in SIGNALS for r in it.reasons)
            assert set(it.contributions) == set(SIGNALS)
            assert it.score == pytest.approx(sum(it.contributions.values()), abs=1e-4)
            assert it.title == ranker.catalog.title_of(it.item_id)
        assert len({it.item_id for it in res.items}) == 10
    texts = _texts(res)
    assert any(t.startswith("Because you ") for t in texts)
    print("\n".join(f"{it.title}: {[r.text for r in it.reasons]}" for it in res.items))


def test_maturity_gate_never_violated(ranker, catalog) -> None:
    rng = np.random.default_rng(20240601)
    mat = dict(zip(catalog.ids.tolist(), catalog.maturity.tolist()))
    for trial in range(150):
        p, s = ProfileState("p", catalog), SessionState("p", "s", catalog)
        hist = rng.choice(catalog.ids, size=rng.integers(0, 12), replace=False)
        _apply(p, s, [(int(rng.choice([PLAY, COMPLETE, LIKE, SKIP])), int(i)) for i in hist])
        ctx = RankContext(device=int(rng.integers(0, 5)), local_hour=int(rng.integers(0, 24)),
                          weekday=int(rng.integers(0, 7)), max_maturity=int(rng.integers(1, 6)))
        n = int(rng.choice([0, 5, 50, 1000]))
        cands = rng.choice(catalog.ids, size=n, replace=True) if n else None  # with duplicates
        affect = _upbeat() if rng.random() < 0.5 else None
        k = int(rng.integers(1, 60))
        res = ranker.rank(p, s, affect, bool(rng.random() < 0.5), ctx, cands, k, NOW)
        ids = [it.item_id for it in res.items]
        assert all(mat[i] <= ctx.max_maturity for i in ids), (trial, ctx)
        assert len(ids) == len(set(ids)) <= k
        allowed = {i for i in (cands.tolist() if n else catalog.ids.tolist()) if mat[i] <= ctx.max_maturity}
        allowed -= p.completed | p.disliked | s.excluded
        assert len(ids) == min(k, len(allowed))


def test_exclusions_dedupe_and_unknown_ids(ranker, profile, session, tv_evening) -> None:
    _apply(profile, session, [(COMPLETE, TOY_STORY), (DISLIKE, TOY_STORY_2), (SKIP, 2)])
    cands = np.array([TOY_STORY, TOY_STORY_2, 2, 260, 260, 260, 318, 987654321, -1], dtype=np.int64)
    res = ranker.rank(profile, session, None, False, tv_evening, cands, 10, NOW)
    assert sorted(it.item_id for it in res.items) == [260, 318]
    assert res.unknown_ids == [-1, 987654321]
    assert res.considered == 2


def test_bad_requests_are_validation_errors(ranker, profile, session) -> None:
    with pytest.raises(ValidationError, match="max_maturity"):
        ranker.rank(profile, session, None, False, RankContext(1, 20, 1, 0), None, 10, NOW)
    with pytest.raises(ValidationError, match="k must be"):
        ranker.rank(profile, session, None, False, RankContext(1, 20, 1, 5), None, 0, NOW)


def _share(res: RankResult, catalog: Catalog, genre: str) -> float:
    j = catalog.genre_index[genre]
    rows, _ = catalog.index_of(np.array([it.item_id for it in res.items]))
    return float((catalog.genres[rows, j] > 0).mean())


def test_session_adaptation_skips_and_like(ranker, catalog, profile, session, tv_evening) -> None:
    g = catalog.genres
    horror = g[:, catalog.genre_index["Horror"]] > 0
    comedy = g[:, catalog.genre_index["Comedy"]] > 0
    pop = ranker.pop_z
    # A shelf of popular pure-Horror and similarly popular pure-Comedy titles.
    h_rows = np.flatnonzero(horror & ~comedy)
    c_rows = np.flatnonzero(comedy & ~horror)
    h_rows = h_rows[np.argsort(-pop[h_rows])[:40]]
    c_rows = c_rows[pop[c_rows] <= pop[h_rows[5]]]  # comedies no more popular than the 6th horror title
    c_rows = c_rows[np.argsort(-pop[c_rows])[:40]]
    shelf = catalog.ids[np.r_[h_rows[3:], c_rows[1:]]]
    before = ranker.rank(profile, session, None, False, tv_evening, shelf, 10, NOW)
    hb, cb = _share(before, catalog, "Horror"), _share(before, catalog, "Comedy")
    assert 0 < hb and cb < 1, "the shelf must start mixed for the test to mean anything"
    _apply(profile, session, [(SKIP, int(catalog.ids[h_rows[0]])), (SKIP, int(catalog.ids[h_rows[1]])),
                              (LIKE, int(catalog.ids[c_rows[0]]))])
    after = ranker.rank(profile, session, None, False, tv_evening, shelf, 10, NOW)
    ha, ca = _share(after, catalog, "Horror"), _share(after, catalog, "Comedy")
    print(f"horror {hb:.1f} -> {ha:.1f}, comedy {cb:.1f} -> {ca:.1f}")
    assert ca > cb and ha < hb
    assert any(r.signal == "session" for it in after.items for r in it.reasons)


def test_cold_start_profile_gets_popularity_reasons(ranker, profile, session, tv_evening) -> None:
    res = ranker.rank(profile, session, None, False, tv_evening, None, 10, NOW)
    assert len(res.items) == 10
    signals = {r.signal for it in res.items for r in it.reasons}
    assert signals <= {"popularity", "content", "context"} and "popularity" in signals
    assert not any(t.startswith("Because you") for t in _texts(res))
    for it in res.items:
        assert it.contributions["collaborative"] == 0.0 and it.contributions["session"] == 0.0


# The collaborative signal on its own terms (the shipped weights may leave it small next to the sequence model).
COLLAB = SignalWeights(collaborative=1.0, sequence=0.0, next=0.0)


def test_reason_follows_its_signal(bundle, catalog, profile, session, tv_evening) -> None:
    ranker = Ranker(bundle, catalog, affect_weight=0.15, diversity=0.2, affect_stale_s=1.0, weights=COLLAB)
    res0 = ranker.rank(profile, session, None, False, tv_evening, None, 20, NOW)
    assert not any("Because you watched" in t for t in _texts(res0))
    _apply(profile, session, [(COMPLETE, TOY_STORY)])
    res1 = ranker.rank(profile, session, None, False, tv_evening, None, 20, NOW)
    because = [r for it in res1.items for r in it.reasons if r.signal == "collaborative"]
    assert because and all(r.because_item_id == TOY_STORY for r in because)
    assert because[0].text == "Because you watched Toy Story (1995)"
    assert TOY_STORY not in [it.item_id for it in res1.items]  # completed: never offered again


def test_titles_without_interactions_are_ranked(bundle: RankerBundle, ranker, catalog, profile, session,
                                                tv_evening) -> None:
    cold_rows = np.flatnonzero(bundle.popularity[:, 0] == 0)
    assert len(cold_rows) > 0
    assert np.all(np.linalg.norm(ranker.F[cold_rows], axis=1) > 0)  # placed by their content
    cold_ids = catalog.ids[cold_rows]
    res = ranker.rank(profile, session, None, False, RankContext(1, 20, 1, 5), cold_ids, 5, NOW)
    assert len(res.items) == min(5, len(cold_ids)) and all(it.reasons for it in res.items)
    # A title added to the box's catalog after training: embedded from genres and year.
    # Titles added to the box's catalog after training: embedded from genres and year alone, they land
    # in the same space, so a family-animation history prefers the new animated comedy to new horror.
    kids = CatalogRow(9_000_001, "A New Animated Comedy (2024)", ("Animation", "Children", "Comedy"), 2024, 1)
    scary = CatalogRow(9_000_002, "A New Horror (2024)", ("Horror", "Thriller"), 2024, 4)
    ext = Catalog.from_rows([*catalog.rows, kids, scary])
    r2 = Ranker(bundle, ext, affect_weight=0.15, diversity=0.2, affect_stale_s=1.0, weights=COLLAB)
    assert not r2.in_bundle[ext.index_of(np.array([kids.item_id]))[0]].any()
    p, s = ProfileState("p", ext), SessionState("p", "s", ext)
    _apply(p, s, [(COMPLETE, TOY_STORY), (COMPLETE, TOY_STORY_2), (LIKE, MONSTERS_INC)])
    res2 = r2.rank(p, s, None, False, tv_evening, np.array([kids.item_id, scary.item_id]), 2, NOW)
    got = {it.item_id: it for it in res2.items}
    assert res2.items[0].item_id == kids.item_id
    assert got[kids.item_id].contributions["collaborative"] > 0 > got[scary.item_id].contributions["collaborative"]
    assert all(it.reasons for it in res2.items)
    # The sequence model never saw them: no sequence evidence either way (a neutral term).
    r3 = Ranker(bundle, ext, affect_weight=0.15, diversity=0.2, affect_stale_s=1.0)
    res3 = r3.rank(p, s, None, False, tv_evening, np.array([kids.item_id, scary.item_id]), 2, NOW)
    assert all(it.contributions["sequence"] == 0.0 for it in res3.items)


def test_affect_is_exactly_zero_without_consent_or_when_stale(ranker, profile, session, tv_evening) -> None:
    for affect, consent in ((_upbeat(), False), (None, True), (_upbeat(age_s=1.0), True),
                            (_upbeat(age_s=30.0), True)):
        res = ranker.rank(profile, session, affect, consent, tv_evening, None, 50, NOW)
        assert not res.affect_used and res.mood == ""
        assert all(it.contributions["affect"] == 0.0 for it in res.items)
        assert not any(r.signal == "affect" for it in res.items for r in it.reasons)
    assert ranker.rank(profile, session, _upbeat(), False, tv_evening, None, 5, NOW).affect_age_s < 0


def test_fresh_consented_affect_changes_ranking_and_explains(bundle, catalog, profile, session,
                                                             tv_evening) -> None:
    r = Ranker(bundle, catalog, affect_weight=1.0, diversity=0.2, affect_stale_s=1.0)
    base = r.rank(profile, session, None, True, tv_evening, None, 10, NOW)
    moody = r.rank(profile, session, _upbeat(0.1), True, tv_evening, None, 10, NOW)
    assert moody.affect_used and moody.mood == "upbeat" and moody.affect_age_s == pytest.approx(0.1)
    assert [i.item_id for i in moody.items] != [i.item_id for i in base.items]
    assert "Matches the room's mood: upbeat" in _texts(moody)
    # The weight fades linearly with age: older affect, smaller contribution for the same title.
    older = r.rank(profile, session, _upbeat(0.6), True, tv_evening, None, 10, NOW)
    a_new = {i.item_id: i.contributions["affect"] for i in moody.items}
    a_old = {i.item_id: i.contributions["affect"] for i in older.items}
    common = [i for i in a_new if i in a_old and a_new[i] > 0]
    assert common and all(a_old[i] < a_new[i] for i in common)


def test_late_night_context_reason(ranker, profile, session) -> None:
    res = ranker.rank(profile, session, None, False, RankContext(1, 23, 2, 5), None, 30, NOW)
    assert any(it.contributions["context"] != 0.0 for it in res.items)
    night = RankContext.from_request(device=2, local_time_unix_ms=1_700_000_000_000 - 3 * 3600_000,
                                     utc_offset_minutes=60, max_maturity=3)
    assert (night.local_hour, night.weekday, night.max_maturity) == (20, 1, 3)
    unknown = RankContext.from_request(device=1, local_time_unix_ms=0, utc_offset_minutes=0, max_maturity=5)
    res = ranker.rank(profile, session, None, False, unknown, None, 30, NOW)
    assert all(it.contributions["context"] == 0.0 for it in res.items)
    with pytest.raises(ValidationError):
        RankContext.from_request(device=1, local_time_unix_ms=2**62, utc_offset_minutes=0, max_maturity=5)


def test_replayed_state_ranks_like_live_state(ranker, catalog, tv_evening) -> None:
    rng = np.random.default_rng(11)
    events = [(int(t), int(i), 1_700_000_000_000 + k * 1000, 0.0) for k, (t, i) in
              enumerate(zip(rng.integers(1, 10, 300), rng.choice(catalog.ids[:2000], 300)))]
    live = ProfileState("p", catalog)
    for e in events:
        live.apply_event(*e)
    replayed = ProfileState.replay("p", catalog, events)
    s = SessionState("p", "s2", catalog)
    a = ranker.rank(live, s, None, False, tv_evening, None, 20, NOW)
    b = ranker.rank(replayed, s, None, False, tv_evening, None, 20, NOW)
    assert [(i.item_id, i.score, [r.text for r in i.reasons]) for i in a.items] == \
           [(i.item_id, i.score, [r.text for r in i.reasons]) for i in b.items]


def test_latency_is_reported(ranker, catalog, profile, session, tv_evening) -> None:
    rng = np.random.default_rng(1)
    _apply(profile, session, [(COMPLETE, int(i)) for i in rng.choice(catalog.ids[:3000], 40, replace=False)])
    affect = _upbeat()
    for label, n in (("1,000 candidates", 1000), ("full catalog", 0)):
        times = []
        for _ in range(200):
            cands = rng.choice(catalog.ids, n, replace=False) if n else None
            t = time.perf_counter()
            ranker.rank(profile, session, affect, True, tv_evening, cands, 10, NOW)
            times.append((time.perf_counter() - t) * 1e3)
        p50, p99 = np.percentile(times, [50, 99])
        print(f"rank {label}, k=10: p50 {p50:.2f} ms, p99 {p99:.2f} ms")


def test_events_and_ranks_on_two_threads(ranker, catalog, profile, session, tv_evening) -> None:
    import threading

    errors: list[BaseException] = []
    stop = threading.Event()

    def feed() -> None:
        rng = np.random.default_rng(2)
        try:
            while not stop.is_set():
                _apply(profile, session, [(int(rng.integers(1, 10)), int(rng.choice(catalog.ids)))])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=feed)
    t.start()
    try:
        for _ in range(50):
            res = ranker.rank(profile, session, None, False, tv_evening, None, 10, NOW)
            assert all(it.reasons for it in res.items)
    finally:
        stop.set()
        t.join()
    assert not errors and profile.n_events > 0


def test_prepared_state_ranks_exactly_like_a_fresh_derivation(ranker, catalog):
    """Ranker.prepare caches what a Rank derives from the state, keyed by both state versions: a Rank on
    the prepared state equals one derived from scratch, and any event invalidates the cache."""
    from appliance.fusion.state import COMPLETE, LIKE, SKIP, ProfileState, SessionState

    rng = np.random.default_rng(5)
    p, s = ProfileState("h", catalog), SessionState("h", "s", catalog)
    for t, item in enumerate(rng.choice(catalog.ids, 30, replace=False).tolist()):
        (p if t % 3 else s).apply_event((COMPLETE, LIKE, SKIP)[t % 3], item, 1_700_000_000_000 + t)
    ctx = RankContext(device=1, local_hour=21, weekday=4, max_maturity=4)
    cands = rng.choice(catalog.ids, 800, replace=False)
    ranker.prepare(p, s)
    prepared = s.ranker_cache
    got = ranker.rank(p, s, None, False, ctx, cands, 10, 0)
    assert s.ranker_cache is prepared
    s.ranker_cache = None
    want = ranker.rank(p, s, None, False, ctx, cands, 10, 0)
    assert [(i.item_id, i.score, [r.text for r in i.reasons]) for i in got.items] == \
        [(i.item_id, i.score, [r.text for r in i.reasons]) for i in want.items]
    top = got.items[0].item_id
    p.apply_event(SKIP, top, 1_800_000_000_000)
    s.apply_event(SKIP, top, 1_800_000_000_000)
    assert top not in [i.item_id for i in ranker.rank(p, s, None, False, ctx, cands, 10, 0).items]
    assert s.ranker_cache[1:3] == (p.version, s.version)


def test_derivations_count_where_a_sessions_state_was_derived(ranker, catalog) -> None:
    """`prepare` (event path, session start) and a Rank that finds nothing prepared are counted apart; an
    event through one session leaves its profile's other sessions to derive at their next Rank."""
    p = ProfileState("h", catalog)
    s1, s2 = SessionState("h", "a", catalog), SessionState("h", "b", catalog)
    ctx = RankContext(device=1, local_hour=21, weekday=4, max_maturity=4)
    cands = catalog.ids[:300]
    d = ranker.derivations
    before = (d.prepared, d.on_rank)
    ranker.prepare(p, s1)
    ranker.prepare(p, s1)  # nothing changed: nothing derived
    ranker.rank(p, s1, None, False, ctx, cands, 10, 0)
    assert (d.prepared, d.on_rank) == (before[0] + 1, before[1])
    ranker.rank(p, s2, None, False, ctx, cands, 10, 0)  # never prepared
    assert (d.prepared, d.on_rank) == (before[0] + 1, before[1] + 1)
    _apply(p, s1, [(PLAY, int(catalog.ids[5]))])
    ranker.prepare(p, s1)
    ranker.rank(p, s1, None, False, ctx, cands, 10, 0)
    ranker.rank(p, s2, None, False, ctx, cands, 10, 0)  # its profile changed through s1
    assert (d.prepared, d.on_rank) == (before[0] + 2, before[1] + 2)


def test_reason_texts_kept_per_state_match_freshly_made_ones(ranker, catalog) -> None:
    """The reason texts kept per state and title (Ranker._made) give, Rank after Rank, exactly the items
    and reasons a Rank that derives the state afresh gives."""
    rng = np.random.default_rng(5)
    hist = rng.choice(catalog.ids, 30, replace=False)
    states = []
    for _ in range(2):  # the same history twice: one state keeps what it made, the other starts afresh
        p, s = ProfileState("p", catalog), SessionState("p", "s", catalog)
        _apply(p, s, [((PLAY, LIKE, COMPLETE, SKIP)[k % 4], int(i)) for k, i in enumerate(hist)])
        states.append((p, s))
    (p1, s1), (p2, s2) = states
    ctx = RankContext(device=2, local_hour=23, weekday=5, max_maturity=5)
    for _ in range(80):
        cands = rng.choice(catalog.ids, 300, replace=False)
        affect = _upbeat() if rng.random() < 0.3 else None
        kept = ranker.rank(p1, s1, affect, True, ctx, cands, 10, NOW)
        s2.ranker_cache = None
        fresh = ranker.rank(p2, s2, affect, True, ctx, cands, 10, NOW)
        assert [(it.item_id, it.score, it.contributions, it.reasons) for it in kept.items] == \
            [(it.item_id, it.score, it.contributions, it.reasons) for it in fresh.items]
    made = s1.ranker_cache[3].made
    assert sum(len(m) for m in made.values()) > 100  # many titles' texts were kept and reused
