"""The batch applier gives the state that applying the same events one by one gives (fusion's rules)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.fusion import ProfileState, SessionState
from appliance.fusion.batch import apply_batch
from appliance.ranking import Catalog, CatalogRow
from appliance.ranking.catalog import GENRES


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    rng = np.random.default_rng(3)
    rows = [CatalogRow(item_id=i, title=f"Title {i}", year=1990 + i % 30, maturity=1 + i % 5,
                       genres=tuple(rng.choice(GENRES, size=1 + i % 3, replace=False).tolist()) if i % 17 else ())
            for i in range(1, 301)]
    return Catalog.from_rows(rows)


def _events(catalog: Catalog, n: int, seed: int, items: int = 120):
    rng = np.random.default_rng(seed)
    types = rng.integers(1, 10, size=n).astype(np.uint8)
    ids = rng.choice(catalog.ids[:items], size=n)
    ts = 1_700_000_000_000 + np.cumsum(rng.integers(0, 5000, size=n))
    vals = np.where(rng.random(n) < 0.2, rng.uniform(-10, 200, size=n), 0.0).astype(np.float32)
    return types, ids.astype(np.int64), ts.astype(np.int64), vals


def _snap_session(s: SessionState) -> dict:
    return {"events": list(s.events), "positives": [(k, v.weight, v.kind, v.ts_ms) for k, v in s.positives.items()],
            "skipped": sorted(s.skipped), "disliked": sorted(s.disliked), "completed": sorted(s.completed),
            "last_item": s.last_item, "last_ts_ms": s.last_ts_ms}


@pytest.mark.parametrize("seed", range(12))
def test_batches_equal_event_by_event(catalog: Catalog, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 3000))
    types, ids, ts, vals = _events(catalog, n, seed, items=int(rng.integers(5, 300)))
    p1, s1 = ProfileState("p", catalog), SessionState("p", "s", catalog)
    p2, s2 = ProfileState("p", catalog), SessionState("p", "s", catalog)
    for t, i, c, v in zip(types.tolist(), ids.tolist(), ts.tolist(), vals.tolist()):
        p1.apply_event(t, i, c, v)
        s1.apply_event(t, i, c, v)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 8))), replace=False)) if n > 1 else []
    for a, b in zip([0, *cuts], [*cuts, n]):  # the same stream in batches of random sizes
        rows, known = catalog.index_of(ids[a:b])
        assert known.all()
        apply_batch(p2, s2, types[a:b], ids[a:b], ts[a:b], vals[a:b], rows, catalog.genre_share)
    a1, a2 = p1.snapshot(), p2.snapshot()
    np.testing.assert_allclose(a2.pop("genre_affinity"), a1.pop("genre_affinity"), rtol=1e-4, atol=1e-4)
    assert a2 == a1
    b1, b2 = _snap_session(s1), _snap_session(s2)
    assert b2 == b1
    np.testing.assert_allclose(s2.genre_affinity, s1.genre_affinity, rtol=1e-4, atol=1e-4)
    assert p2.version != 0 and s2.version != 0


def test_empty_batch_changes_nothing(catalog: Catalog) -> None:
    p, s = ProfileState("p", catalog), SessionState("p", "s", catalog)
    e = np.zeros(0, dtype=np.int64)
    apply_batch(p, s, e.astype(np.uint8), e, e, e.astype(np.float32), e, catalog.genre_share)
    assert p.version == 0 and s.version == 0 and p.n_events == 0
