"""Apply a columnar batch of events to the fusion state at numpy speed.

`ProfileState.apply_event` / `SessionState.apply_event` cost ~4 us per event each (several small numpy
operations per event); at a million events a second that alone is more than the box has. This module
applies a whole batch with the same rules (appliance/fusion/state.py) and the same result as calling
`apply_event` row by row, except that the genre sums are added in a different order (float32 rounding,
~1e-6 relative). Replay at start applies the stored batches through the same function, so the state after
a restart equals the live state.

- counters, last time, recent items, the session's last 50 events: array slices;
- watched / completed / skipped: set updates from masked columns;
- liked / disliked: each title's LAST like-or-dislike event decides (that is what the per-event rule
  amounts to);
- genre affinity (profile): one weighted sum of the titles' genre shares;
- genre affinity (session): the per-event decay `a = 0.85 a + w g` over the m weighted events folds into
  `0.85^m a + sum_j 0.85^(m-1-j) w_j g_j`;
- positives (recency-ordered, capped): order matters and titles get evicted, so fusion's per-event rule
  runs event by event, but only for the events that touch them (play, complete, like, skip, dislike),
  on plain tuples, and Positive objects are made once for what is left.

The equivalence with `apply_event` is a test (tests/fusion/test_batch.py, random streams); if the state
classes no longer have what this relies on, `apply_batch` falls back to `apply_event` row by row.
Used by the ingest path (live batches) and by the replay at start and after a retention purge.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

try:
    from appliance.fusion.state import (
        COMPLETE,
        DISLIKE,
        DWELL,
        DWELL_FULL_S,
        LIKE,
        MAX_POSITIVES,
        MAX_SESSION_EVENTS,
        PLAY,
        POSITIVE_WEIGHT,
        PROFILE_WEIGHT,
        SESSION_DECAY,
        SESSION_WEIGHT,
        SKIP,
        Positive,
        ProfileState,
        SessionState,
    )

    _VECTOR = True
except ImportError:  # pragma: no cover - fusion changed shape: use its per-event API
    from appliance.fusion.state import ProfileState, SessionState

    _VECTOR = False


SMALL_BATCH = 8  # up to this many events, apply_event row by row (exact, and faster than ~30 numpy calls)


def _weights(table: dict[int, float]) -> np.ndarray:
    w = np.zeros(16, dtype=np.float64)
    for t, v in table.items():
        w[t] = v
    return w


if _VECTOR:
    _PW, _SW = _weights(PROFILE_WEIGHT), _weights(SESSION_WEIGHT)
    _TOUCHES_POSITIVES = np.zeros(16, dtype=bool)
    _TOUCHES_POSITIVES[[*POSITIVE_WEIGHT, SKIP, DISLIKE]] = True
    _POS_W = np.full(16, -1.0)  # positive weight per type; -1: removes the title (skip, dislike)
    for _t, _w in POSITIVE_WEIGHT.items():
        _POS_W[_t] = _w


def _pref_weights(table: np.ndarray, types: np.ndarray, values: np.ndarray, full_s: float) -> np.ndarray:
    """Per-event preference weight as fusion computes it (float64, then float32 like np.float32(w))."""
    w = table[types]
    dwell = types == DWELL
    if dwell.any():
        v = values[dwell].astype(np.float64)
        v = np.where(np.isfinite(v), v, 0.0)
        w[dwell] *= np.minimum(np.maximum(v, 0.0) / full_s, 1.0)
    return w.astype(np.float32)


def _genre_sum(rows: np.ndarray, w: np.ndarray, share: np.ndarray) -> np.ndarray:
    """sum_j w_j share[rows_j] (float32, [genres]). Many events of a batch fall on few titles: the weights
    are summed per title first (one bincount), then one product with the titles' shares, instead of
    gathering a share row per event (the gather was ~15 % of the event writer's time at 1M events/s)."""
    if len(rows) * 4 < len(share):  # a small batch: gathering its rows is cheaper than a catalog-long pass
        return w @ share[rows]
    per_title = np.bincount(rows, weights=w, minlength=len(share)).astype(np.float32)
    return per_title @ share


def _last_like_dislike(types: np.ndarray, items: np.ndarray) -> tuple[list[int], list[int]]:
    """(titles whose last like/dislike event is a like, ... is a dislike)."""
    m = (types == LIKE) | (types == DISLIKE)
    if not m.any():
        return [], []
    it, ty = items[m][::-1], types[m][::-1]
    uniq, first = np.unique(it, return_index=True)  # first in reversed order = last in time
    last = ty[first]
    return uniq[last == LIKE].tolist(), uniq[last == DISLIKE].tolist()


def _touches(types: np.ndarray, items: np.ndarray, ts: np.ndarray) -> tuple | None:
    """The events that touch the positives, as Python lists (item, weight or None for skip/dislike, liked,
    ts): made once per batch for both the profile and the session."""
    m = _TOUCHES_POSITIVES[types]
    if not m.any():
        return None
    t = types[m]
    w = _POS_W[t]
    return (items[m].tolist(), [None if x < 0 else x for x in w.tolist()], (t == LIKE).tolist(), ts[m].tolist())


def _positives(pos, touches: tuple | None, cap: int) -> None:  # noqa: ANN001
    """fusion's `_update_positives`, event by event, on plain tuples (weight, liked, ts); Positive objects
    are made once at the end for what is left (at most `cap`)."""
    if touches is None:
        return
    od = OrderedDict((k, (v.weight, v.kind == "liked", v.ts_ms)) for k, v in pos.items())
    pop, popitem = od.pop, od.popitem
    for i, w, liked, c in zip(*touches):
        if w is None:  # skip, dislike
            pop(i, None)
            continue
        old = pop(i, None)
        if old is None:
            od[i] = (w, liked, c)
            if len(od) > cap:
                popitem(last=False)
        else:  # the title was there: the count did not grow
            od[i] = (w if w >= old[0] else old[0], liked or old[1], c)
    pos.clear()
    for k, (w, liked, c) in od.items():
        pos[k] = Positive(w, "liked" if liked else "watched", c)


def apply_batch(profile: ProfileState, session: SessionState | None, types: np.ndarray, items: np.ndarray,
                ts: np.ndarray, values: np.ndarray, rows: np.ndarray, share: np.ndarray) -> None:
    """Apply events (all titles in the catalog; `rows` are their rows in the catalog whose genre shares
    `share` the states were built with) to a profile and, when given, a session, in order, as
    `apply_event` would."""
    n = len(types)
    if n == 0:
        return
    if n <= SMALL_BATCH or not _VECTOR:  # a few events: fusion's own per-event rule is cheaper than numpy's
        for t, i, c, v in zip(types.tolist(), items.tolist(), ts.tolist(), values.tolist()):
            profile.apply_event(t, i, c, v)
            if session is not None:
                session.apply_event(t, i, c, v)
        return
    types = types.astype(np.intp, copy=False)
    ts_max = int(ts.max())
    liked, disliked = _last_like_dislike(types, items)
    with profile.lock:
        profile.n_events += n
        profile.version += n
        profile.last_ts_ms = max(profile.last_ts_ms, ts_max)
        profile.recent_items.extend(items[-MAX_SESSION_EVENTS:].tolist())
        profile.watched.update(items[(types == PLAY) | (types == COMPLETE)].tolist())
        profile.completed.update(items[types == COMPLETE].tolist())
        profile.liked.update(liked)
        profile.disliked.difference_update(liked)
        profile.disliked.update(disliked)
        profile.liked.difference_update(disliked)
        touches = _touches(types, items, ts)
        _positives(profile.positives, touches, MAX_POSITIVES)
        w = _pref_weights(_PW, types, values, DWELL_FULL_S["profile"])
        nz = np.flatnonzero(w)  # profile and session tables are zero for the same types
        r = rows[nz]
        if nz.size:
            profile.genre_affinity += _genre_sum(r, w[nz], share)
    if session is None:
        return
    with session.lock:
        tail = slice(max(0, n - MAX_SESSION_EVENTS), n)
        session.events.extend(zip(types[tail].tolist(), items[tail].tolist(), ts[tail].tolist(),
                                  values[tail].astype(np.float64).tolist()))
        session.version += n
        session.last_ts_ms = max(session.last_ts_ms, ts_max)
        session.last_item = int(items[-1])
        session.skipped.update(items[types == SKIP].tolist())
        session.completed.update(items[types == COMPLETE].tolist())
        session.disliked.update(disliked)
        session.disliked.difference_update(liked)
        _positives(session.positives, touches, MAX_SESSION_EVENTS)
        w = _pref_weights(_SW, types, values, DWELL_FULL_S["session"])
        nz_s = np.flatnonzero(w)
        if not np.array_equal(nz_s, nz):
            nz, r = nz_s, rows[nz_s]
        m = nz.size
        if m:
            decay = np.float32(SESSION_DECAY) ** np.arange(m - 1, -1, -1, dtype=np.float32)
            session.genre_affinity *= np.float32(SESSION_DECAY) ** np.float32(m)
            session.genre_affinity += _genre_sum(r, decay * w[nz], share)
