"""The Rank path's C loops (appliance/ranking/_rankcore.c) against the numpy path they replace: the same
rows, the same scores to the bit, the same picks and reasons; bad buffers are errors, never crashes."""

from __future__ import annotations

import copy
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from appliance.fusion.state import COMPLETE, LIKE, PLAY, SKIP, AffectState, ProfileState, SessionState
from appliance.ranking import RankContext, Ranker
from appliance.ranking.reasons import SIGNALS

try:
    from appliance.ranking import _rankcore as rankcore
except ImportError:  # only acceptable where the build could not compile it
    if shutil.which("cc") and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        raise
    pytest.skip("no C compiler here: the ranker runs its numpy path", allow_module_level=True)

NOW = 1_700_000_100_000_000_000
EXACT = ("sequence", "next", "popularity", "context", "affect")  # no dot product: the same float32 steps


@pytest.fixture(scope="module")
def both(ranker: Ranker) -> tuple[Ranker, Ranker]:
    if ranker._native is None:
        pytest.skip("APPLIANCE_RANK_NATIVE=0: the C path is off")
    plain = copy.copy(ranker)
    plain._native = None
    return ranker, plain


def _state(catalog, rng) -> tuple[ProfileState, SessionState]:
    p, s = ProfileState("p", catalog), SessionState("p", "s", catalog)
    for t, item in enumerate(rng.choice(catalog.ids, int(rng.integers(0, 40)), replace=False).tolist()):
        kind = int(rng.choice([PLAY, COMPLETE, LIKE, SKIP]))
        (p if rng.random() < 0.7 else s).apply_event(kind, item, 1_700_000_000_000 + t, 0.0)
    return p, s


def test_reduce_add_is_numpys_float32_sum() -> None:
    """The z-scores' mean and spread are numpy's pairwise float32 sums, bit for bit."""
    rng = np.random.default_rng(0)
    for n in [*range(0, 140), 255, 256, 257, 999, 1000, 1001, 4097, 9742]:
        v = (rng.standard_normal(n) * rng.uniform(0.01, 1000)).astype(np.float32)
        assert rankcore.reduce_add(v) == float(np.add.reduce(v)), n


def test_candidate_rows_are_the_unique_known_kept_rows(catalog) -> None:
    rng = np.random.default_rng(3)
    bits, base = catalog.id_bits
    for size in (1, 5, 300, 1000, 5000):
        keep = rng.random(len(catalog)) < 0.8
        ids = rng.choice(catalog.ids, size)   # with repeats
        ids[::7] = -ids[::7]                  # ids that are not titles: negative ...
        ids[3::11] = 64 * len(bits) + ids[3::11]  # ... and beyond the bitmap
        ids[5::17] += 1                       # ... and between titles
        ids[:2] = [np.iinfo(np.int64).min, np.iinfo(np.int64).max][: len(ids)]
        out = np.empty(size + 1, np.int64)
        count, unknown = rankcore.candidate_rows(ids, bits, base, keep, out)
        rows = catalog.lookup(ids)
        want = np.unique(rows[rows >= 0])
        assert out[:count].tolist() == want[keep[want]].tolist()
        assert unknown == int((rows < 0).sum())


@pytest.mark.parametrize("seed", range(12))
def test_native_rank_equals_numpy_rank(both, catalog, seed: int) -> None:
    fast, plain = both
    rng = np.random.default_rng(1000 + seed)
    for _ in range(10):
        p, s = _state(catalog, rng)
        ctx = RankContext(device=int(rng.integers(0, 5)), local_hour=int(rng.integers(-1, 24)),
                          weekday=int(rng.integers(0, 7)), max_maturity=int(rng.integers(1, 6)))
        n = int(rng.choice([1, 7, 120, 1000, 3000]))
        cands = rng.choice(catalog.ids, n)
        cands[:: 13] += 10_000_000  # unknown ids
        affect = AffectState(float(rng.uniform(-1, 1)), float(rng.uniform(0, 1)), float(rng.uniform(0, 1)),
                             faces=1, capture_ns=NOW - int(rng.uniform(0, 1.2e9))) if rng.random() < 0.6 else None
        k = int(rng.choice([1, 3, 10, 10, 150]))
        consent = bool(rng.random() < 0.7)
        a = fast.rank(p, s, affect, consent, ctx, cands, k, NOW)
        b = plain.rank(p, s, affect, consent, ctx, cands, k, NOW)
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
        assert (a.unknown_ids, a.considered, a.mood, a.affect_used) == (b.unknown_ids, b.considered, b.mood,
                                                                         b.affect_used)
        for x, y in zip(a.items, b.items):
            assert np.float32(x.score) == np.float32(y.score)
            for name in SIGNALS:
                if name in EXACT:
                    assert x.contributions[name] == y.contributions[name], name
                else:  # C sums the dot products in order, numpy's BLAS in blocks
                    assert x.contributions[name] == pytest.approx(y.contributions[name], rel=1e-5, abs=1e-6)
            assert [(r.text, r.signal, r.because_item_id) for r in x.reasons] == \
                [(r.text, r.signal, r.because_item_id) for r in y.reasons]


def test_k_beyond_the_pool_and_no_diversity(both, catalog) -> None:
    fast, plain = both
    rng = np.random.default_rng(7)
    p, s = _state(catalog, rng)
    ctx = RankContext(device=1, local_hour=21, weekday=4, max_maturity=5)
    cands = rng.choice(catalog.ids, 800, replace=False)
    for div in (0.0, 0.2, 0.5):  # (at 1.0 relevance is gone: picks tie on similarity alone)
        f2, p2 = copy.copy(fast), copy.copy(plain)
        f2.diversity = p2.diversity = div
        a = f2.rank(p, s, None, False, ctx, cands, 250, NOW)
        b = p2.rank(p, s, None, False, ctx, cands, 250, NOW)
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items], div


def test_bad_buffers_are_errors_not_crashes(ranker) -> None:
    bits, base = ranker.catalog.id_bits
    keep = np.ones(len(ranker.catalog), bool)
    ids = np.arange(10, dtype=np.int64)
    with pytest.raises(ValueError):
        rankcore.candidate_rows(ids, bits, base, keep, np.empty(5, np.int64))       # out too short
    with pytest.raises(ValueError):
        rankcore.candidate_rows(ids.astype(np.int32)[:3], bits, base, keep, np.empty(11, np.int64))  # 4-byte ids
    with pytest.raises(ValueError):
        rankcore.candidate_rows(ids, bits, base[:-1], keep, np.empty(11, np.int64))  # base of the wrong size
    with pytest.raises(TypeError):
        rankcore.candidate_rows(ids, bits, base, keep, b"\0" * 88)                   # read-only out
    with pytest.raises(TypeError):
        rankcore.candidate_rows(ids[::2], bits, base, keep, np.empty(11, np.int64))  # not contiguous
    n = len(ranker.catalog)
    z = np.zeros(n, np.float32)
    args = [np.array([0, 1, n + 5], np.int64), np.zeros((3, n), np.float32), None, 1.0, False, 0.0, None, None,
            0.0, ranker._M, 0.2, 100, ranker.F, None, ranker.Gs, np.zeros(ranker.Gs.shape[1], np.float32),
            np.zeros(ranker.Gs.shape[1], np.float32), z, 0.0, np.empty(2, np.int64), np.empty(2, np.float32),
            np.empty((8, 2), np.float32)]
    with pytest.raises(IndexError):
        rankcore.score_and_pick(*args)                                      # a row outside the catalog
    args[0] = np.array([0, 1, 2], np.int64)
    args[1] = np.zeros((3, n - 1), np.float32)
    with pytest.raises(ValueError):
        rankcore.score_and_pick(*args)                                      # base of the wrong size
    args[1] = np.zeros((3, n), np.float32)
    assert rankcore.score_and_pick(*args) == 0
    with pytest.raises(TypeError):
        rankcore.score_and_pick(*args[:-1])


def test_reasons_walk_and_fallback_equal_numpy(both, catalog) -> None:
    """Items whose signals are all weak, negative or tied take the fallback reason; the C walk and the
    Python one give the same reasons for any terms."""
    fast, plain = both
    rng = np.random.default_rng(11)
    p, s = _state(catalog, rng)
    d = fast._derived(p, s)
    top = np.sort(rng.choice(len(catalog), 6, replace=False)).astype(np.int64)
    for trial in range(200):
        T = (rng.standard_normal((len(SIGNALS), len(top))) * rng.choice([0.01, 0.3, 2.0])).astype(np.float32)
        T[:, 0] = -np.abs(T[:, 0])              # nothing pushed it up: "Something different to try"
        T[:, 1] = 0.001                         # all tied and below the floor
        T[rng.integers(0, 8), 2] = T[rng.integers(0, 8), 2]  # a tie
        score = T.sum(axis=0).astype(np.float32)
        a = fast._explain(top, T, score, d, (), "", None, None)
        b = plain._explain(top, T, score, d, (), "", None, None)
        assert a.reasons == b.reasons, trial
        assert a.values == b.values and a.scores == b.scores
