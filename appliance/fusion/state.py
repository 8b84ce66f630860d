"""What the ranker knows about a profile, a session and the room, updated event by event.

Events change state in O(1): a set insert, an ordered-dict move, and one genre-vector update (a row of
the catalog's genre shares, ~20 floats). Nothing catalog-sized is allocated per event, so applying an
event stays well under a millisecond.

The ranker reads `positives` (recent titles the household watched or liked, oldest first) for the
collaborative signal, the genre-affinity vectors for the session and content signals, and
`completed`/`disliked`/`skipped` to leave titles out.

How each event type counts (proto EventType ints). `w` is added, spread over the title's genres, to
the genre affinity; "positive" titles feed "Because you watched ...":

    type        profile w        session w        effect
    PLAY=1      +0.5             +1.0             watched; positive (0.5)
    PAUSE=2     0                0                recorded only
    SEEK=3      0                0                recorded only
    SKIP=4      -0.5             -1.5             no longer positive; left out for the rest of the session
    LIKE=5      +2.0             +2.0             liked; positive (2.0); un-dislikes
    DISLIKE=6   -2.0             -2.0             disliked (never recommended); not positive; un-likes
    COMPLETE=7  +1.0             +1.0             completed (never recommended again); positive (1.0)
    DWELL=8     +0.2*min(v/60,1) +0.5*min(v/30,1) value = seconds the player dwelt on the title
    BROWSE=9    +0.05            +0.1             a glance

Session affinity decays by `SESSION_DECAY` at every event that carries a preference, so the last
few choices dominate; profile affinity does not decay (it is rebuilt by replaying stored events in
order, which must give the same state as live application: updates depend only on the events and
their order).

Concurrency: each state has a re-entrant `lock`; `apply_event` and `forget` take it, and the ranker
copies what it needs under it, so events may arrive on one gRPC thread while another ranks. A state
is tied to its catalog's genre vocabulary: after a bundle/catalog change, rebuild it with `replay`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from appliance.errors import ValidationError

if TYPE_CHECKING:  # avoid an import cycle: ranking imports fusion
    from appliance.ranking.catalog import Catalog

PLAY, PAUSE, SEEK, SKIP, LIKE, DISLIKE, COMPLETE, DWELL, BROWSE = range(1, 10)
EVENT_NAMES = {PLAY: "play", PAUSE: "pause", SEEK: "seek", SKIP: "skip", LIKE: "like",
               DISLIKE: "dislike", COMPLETE: "complete", DWELL: "dwell", BROWSE: "browse"}

PROFILE_WEIGHT = {PLAY: 0.5, PAUSE: 0.0, SEEK: 0.0, SKIP: -0.5, LIKE: 2.0, DISLIKE: -2.0,
                  COMPLETE: 1.0, DWELL: 0.2, BROWSE: 0.05}
SESSION_WEIGHT = {PLAY: 1.0, PAUSE: 0.0, SEEK: 0.0, SKIP: -1.5, LIKE: 2.0, DISLIKE: -2.0,
                  COMPLETE: 1.0, DWELL: 0.5, BROWSE: 0.1}
POSITIVE_WEIGHT = {PLAY: 0.5, COMPLETE: 1.0, LIKE: 2.0}
DWELL_FULL_S = {"profile": 60.0, "session": 30.0}
SESSION_DECAY = 0.85
MAX_POSITIVES = 50
MAX_SESSION_EVENTS = 50


@dataclass(frozen=True)
class Positive:
    """A title that counts for the household: `kind` is "liked" or "watched" (for the reason text)."""
    weight: float
    kind: str
    ts_ms: int


def _check(event_type: int) -> None:
    if event_type not in EVENT_NAMES:
        raise ValidationError(f"event type {event_type!r} is not one of 1..9 (PLAY..BROWSE)")


def _pref_weight(table: dict[int, float], event_type: int, value: float, full_s: float) -> float:
    w = table[event_type]
    if event_type == DWELL:
        v = float(value) if np.isfinite(value) else 0.0
        w *= min(max(v, 0.0) / full_s, 1.0)
    return w


def _update_positives(pos: OrderedDict[int, Positive], event_type: int, item_id: int, ts_ms: int,
                      cap: int) -> None:
    if event_type in POSITIVE_WEIGHT:
        old = pos.pop(item_id, None)
        w = POSITIVE_WEIGHT[event_type]
        kind = "liked" if event_type == LIKE or (old is not None and old.kind == "liked") else "watched"
        pos[item_id] = Positive(max(w, old.weight) if old else w, kind, ts_ms)  # newest at the end
        while len(pos) > cap:
            pos.popitem(last=False)
    elif event_type in (SKIP, DISLIKE):
        pos.pop(item_id, None)


class TitleSet:
    """A set of catalog titles kept as one bool per catalog row.

    Memory is fixed by the catalog, not by the history: a household that has watched the whole catalog
    costs what a new one costs (a Python set of ids grew by ~60 bytes per title and was most of the
    ranker's memory growth in the soak). The ranker ORs the masks instead of mapping ids to rows. Titles
    not in the catalog are not kept: they can never be ranked, and a catalog change rebuilds the states
    by replay. Iteration yields ids in catalog order (ascending)."""

    __slots__ = ("_catalog", "mask")

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self.mask = np.zeros(len(catalog), dtype=bool)

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def add(self, item_id: int) -> None:
        r = self._catalog.row_of(item_id)
        if r is not None:
            self.mask[r] = True

    def discard(self, item_id: int) -> None:
        r = self._catalog.row_of(item_id)
        if r is not None:
            self.mask[r] = False

    def _rows(self, item_ids: Iterable[int]) -> np.ndarray:
        ids = np.asarray(item_ids if isinstance(item_ids, np.ndarray) else list(item_ids), dtype=np.int64)
        rows, known = self._catalog.index_of(ids)
        return rows[known]

    def update(self, item_ids: Iterable[int]) -> None:
        self.mask[self._rows(item_ids)] = True

    def difference_update(self, item_ids: Iterable[int]) -> None:
        self.mask[self._rows(item_ids)] = False

    def clear(self) -> None:
        self.mask[:] = False

    def __contains__(self, item_id: object) -> bool:
        r = self._catalog.row_of(item_id) if isinstance(item_id, (int, np.integer)) else None
        return r is not None and bool(self.mask[r])

    def __len__(self) -> int:
        return int(np.count_nonzero(self.mask))

    def __iter__(self) -> Iterator[int]:
        return iter(self._catalog.ids[self.mask].tolist())

    def __or__(self, other: Iterable[int]) -> set[int]:
        return set(self) | set(other)

    def __repr__(self) -> str:
        return f"TitleSet({sorted(self)!r})"


class ProfileState:
    """Long-lived household-profile state; rebuild with `replay`, erase with `forget`."""

    def __init__(self, profile_id: str, catalog: Catalog) -> None:
        self.profile_id = profile_id
        self._catalog = catalog
        self.genre_affinity = np.zeros(len(catalog.genre_names), dtype=np.float32)
        self.watched = TitleSet(catalog)
        self.completed = TitleSet(catalog)
        self.liked = TitleSet(catalog)
        self.disliked = TitleSet(catalog)
        self.positives: OrderedDict[int, Positive] = OrderedDict()
        self.recent_items: deque[int] = deque(maxlen=MAX_SESSION_EVENTS)
        self.n_events = 0
        self.last_ts_ms = 0
        self.version = 0  # bumps on every change; lets a caller cache what it derives from the state
        self.lock = threading.RLock()

    def apply_event(self, event_type: int, item_id: int, ts_ms: int, value: float = 0.0) -> bool:
        """Apply one event; True when the title is in the catalog (its genres counted)."""
        _check(event_type)
        with self.lock:
            return self._apply(event_type, int(item_id), int(ts_ms), value)

    def _apply(self, event_type: int, item_id: int, ts_ms: int, value: float) -> bool:
        self.n_events += 1
        self.version += 1
        self.last_ts_ms = max(self.last_ts_ms, int(ts_ms))
        if item_id <= 0:
            return False
        self.recent_items.append(item_id)
        if event_type in (PLAY, COMPLETE):
            self.watched.add(item_id)
        if event_type == COMPLETE:
            self.completed.add(item_id)
        elif event_type == LIKE:
            self.liked.add(item_id)
            self.disliked.discard(item_id)
        elif event_type == DISLIKE:
            self.disliked.add(item_id)
            self.liked.discard(item_id)
        _update_positives(self.positives, event_type, item_id, int(ts_ms), MAX_POSITIVES)
        row = self._catalog.row_of(item_id)
        if row is None:
            return False
        w = _pref_weight(PROFILE_WEIGHT, event_type, value, DWELL_FULL_S["profile"])
        if w:
            self.genre_affinity += np.float32(w) * self._catalog.genre_share[row]
        return True

    @classmethod
    def replay(cls, profile_id: str, catalog: Catalog,
               events: Iterable[tuple[int, int, int, float]]) -> ProfileState:
        """Rebuild from stored (event_type, item_id, ts_ms, value) rows in their stored order."""
        state = cls(profile_id, catalog)
        for event_type, item_id, ts_ms, value in events:
            state.apply_event(event_type, item_id, ts_ms, value)
        return state

    def forget(self) -> None:
        """Erase everything held about the profile (the household's "delete my data")."""
        with self.lock:
            self._forget()

    def _forget(self) -> None:
        self.genre_affinity[:] = 0.0
        for s in (self.watched, self.completed, self.liked, self.disliked):
            s.clear()
        self.positives.clear()
        self.recent_items.clear()
        self.n_events = 0
        self.last_ts_ms = 0
        self.version += 1

    def top_genres(self, n: int = 5) -> list[tuple[str, float]]:
        """Strongest positive genre affinities, for Profile.Explain."""
        order = np.argsort(-self.genre_affinity, kind="stable")[:n]
        names = self._catalog.genre_names
        return [(names[j], float(self.genre_affinity[j])) for j in order if self.genre_affinity[j] > 0]

    def snapshot(self) -> dict:
        """Plain-data view (for tests and debugging): equal snapshots mean equal state."""
        with self.lock:
            return self._snapshot()

    def _snapshot(self) -> dict:
        return {
            "profile_id": self.profile_id, "genre_affinity": self.genre_affinity.tolist(),
            "watched": sorted(self.watched), "completed": sorted(self.completed),
            "liked": sorted(self.liked), "disliked": sorted(self.disliked),
            "positives": [(k, v.weight, v.kind, v.ts_ms) for k, v in self.positives.items()],
            "recent_items": list(self.recent_items), "n_events": self.n_events,
            "last_ts_ms": self.last_ts_ms,
        }


class SessionState:
    """One viewing session: what happened in the last few minutes counts most."""

    def __init__(self, profile_id: str, session_id: str, catalog: Catalog) -> None:
        self.profile_id = profile_id
        self.session_id = session_id
        self._catalog = catalog
        self.events: deque[tuple[int, int, int, float]] = deque(maxlen=MAX_SESSION_EVENTS)
        self.genre_affinity = np.zeros(len(catalog.genre_names), dtype=np.float32)
        self.positives: OrderedDict[int, Positive] = OrderedDict()
        self.skipped = TitleSet(catalog)
        self.disliked = TitleSet(catalog)
        self.completed = TitleSet(catalog)
        self.last_item = 0
        self.last_ts_ms = 0
        self.version = 0
        self.lock = threading.RLock()
        # The ranker's derived view of this session + its profile, tagged with both versions
        # (appliance/ranking/ranker.py `Ranker.prepare`); dropped with the session.
        self.ranker_cache: tuple | None = None

    def apply_event(self, event_type: int, item_id: int, ts_ms: int, value: float = 0.0) -> bool:
        """Apply one event; True when the title is in the catalog (its genres counted)."""
        _check(event_type)
        with self.lock:
            return self._apply(event_type, int(item_id), int(ts_ms), value)

    def _apply(self, event_type: int, item_id: int, ts_ms: int, value: float) -> bool:
        self.events.append((int(event_type), item_id, int(ts_ms), float(value)))
        self.version += 1
        self.last_ts_ms = max(self.last_ts_ms, int(ts_ms))
        if item_id <= 0:
            return False
        self.last_item = item_id
        if event_type == SKIP:
            self.skipped.add(item_id)
        elif event_type == DISLIKE:
            self.disliked.add(item_id)
        elif event_type == COMPLETE:
            self.completed.add(item_id)
        elif event_type == LIKE:
            self.disliked.discard(item_id)
        _update_positives(self.positives, event_type, item_id, int(ts_ms), MAX_SESSION_EVENTS)
        row = self._catalog.row_of(item_id)
        if row is None:
            return False
        w = _pref_weight(SESSION_WEIGHT, event_type, value, DWELL_FULL_S["session"])
        if w:
            self.genre_affinity *= np.float32(SESSION_DECAY)
            self.genre_affinity += np.float32(w) * self._catalog.genre_share[row]
        return True

    @property
    def excluded(self) -> set[int]:
        """Titles not to offer again in this session."""
        with self.lock:
            return set(self.skipped) | set(self.disliked) | set(self.completed)


@dataclass(frozen=True)
class AffectState:
    """Latest room affect from the vision process (derived scores only; no pixels, no identity).

    Timestamps are CLOCK_MONOTONIC ns shared by the processes on the box; age counts from capture.
    """
    valence: float
    arousal: float
    engagement: float
    probs: tuple[float, ...] = field(default=(0.0,) * 7)
    faces: int = 0
    capture_ns: int = 0
    received_ns: int = 0

    def age_s(self, now_ns: int) -> float:
        """Seconds since capture; a capture stamped in the future (clock skew) counts as age 0."""
        return max(0.0, (int(now_ns) - int(self.capture_ns)) / 1e9)

    def is_fresh(self, now_ns: int, stale_s: float) -> bool:
        """Young enough to use and someone was seen."""
        return self.faces > 0 and self.age_s(now_ns) < stale_s
