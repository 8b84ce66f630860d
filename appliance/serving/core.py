"""The ranker process's state and operations, independent of gRPC.

Everything a Rank needs is kept hot in memory (catalog arrays, profile and session state, latest
affect); events update it on arrival, after they are durable. SQLite is the source of truth: the
in-memory state is rebuilt from it at start, so a `kill -9` loses nothing that was acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from appliance import __version__
from appliance.config import ApplianceConfig
from appliance.errors import NotFoundError, StoreError
from appliance.experiments import ExperimentArms
from appliance.fusion import AffectState, ProfileState, SessionState
from appliance.fusion.batch import apply_batch
from appliance.ranking import Catalog, CatalogRow, RankContext, Ranker, RankerBundle, RankResult
from appliance.serving.errors import log_bug
from appliance.serving.ingest import Columns, EventWriter, RateLimiter, _Pending, columns_from_rows, validate
from appliance.serving.rankpath import RankCache
from appliance.store import Store

log = logging.getLogger("appliance.ranker")

MATURITY_BY_NAME = {"all": 1, "7": 2, "13": 3, "16": 4, "adult": 5}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class LiveSession:
    session_id: str
    profile_id: str
    device: int
    state: SessionState


@dataclass
class VisionView:
    """What the ranker last heard from the vision process."""

    camera_open: bool = False
    camera_fps: float = 0.0
    process_fps: float = 0.0
    detector_ms: float = 0.0
    frames: int = 0
    frames_with_face: int = 0
    faces: int = 0
    heard_ns: int = 0
    affect_samples_received: int = 0
    model_version: str = ""
    reconnects: int = 0


@dataclass
class CoreCounters:
    events_ingested: int = 0
    ranks: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class ApplianceCore:
    """Profiles, consent, sessions, events, affect and ranking of one box."""

    def __init__(self, cfg: ApplianceConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self._lock = threading.RLock()
        self.bundle = RankerBundle.load(cfg.path(cfg.ranking.bundle_dir), cfg.ranking.sequence_runtime)
        if store.catalog_count() == 0:
            store.import_catalog(_row_tuple(r) for r in self.bundle.catalog_rows)
        self.catalog = Catalog.from_rows([_catalog_row(r) for r in store.catalog_rows()])
        self.ranker = Ranker(self.bundle, self.catalog, affect_weight=cfg.ranking.affect_weight,
                             diversity=cfg.ranking.diversity, affect_stale_s=cfg.ranking.affect_stale_s)
        self.experiments: ExperimentArms | None = None  # A/B arms: a ranker per arm, exposures buffered
        if cfg.experiments:
            from appliance.ops.bucketing import box_id

            self.experiments = ExperimentArms(cfg.experiments, self.ranker, box_id(cfg.path("{data_dir}")), store,
                                              cfg.store.exposure_flush_s)
        self.counters = CoreCounters()
        self.vision = VisionView()
        self._consent: dict[str, bool] = {}
        self._profiles: dict[str, ProfileState] = {}
        self._sessions: dict[str, LiveSession] = {}
        self._affect: AffectState | None = None
        self._affect_purged_ns = 0
        self._consent_epoch = 0
        self.rank_cache = RankCache(cfg.serving.rank_cache_entries)
        try:  # events past their retention are deleted before anything is replayed from them
            self.store.purge_before(now_ms() - cfg.store.event_retention_days * 86_400_000)
        except StoreError as exc:  # a full disk must not stop the box from serving: the sweep retries
            log.error("retention purge at start failed: %s", exc)
        self._rebuild()
        self.limiter = RateLimiter(cfg.serving.client_events_per_s, cfg.serving.client_burst_events)
        self.writer = EventWriter(self, cfg.serving.ingest_queue_events, cfg.serving.ingest_group_events)
        if self.experiments is not None:
            self.experiments.start()

    def close(self) -> None:
        """Stop the event writer (what is queued is committed first) and write the buffered exposures."""
        self.writer.stop()
        if self.experiments is not None:
            self.experiments.stop()

    # -- start-up -------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Replay the durable state into memory (profiles, open sessions, events)."""
        t0 = time.perf_counter()
        for p in self.store.profiles():
            self._consent[p.profile_id] = p.camera_consent
            self._profiles[p.profile_id] = ProfileState(p.profile_id, self.catalog)
        for s in self.store.open_sessions():
            self._sessions[s.session_id] = LiveSession(s.session_id, s.profile_id, s.device,
                                                       SessionState(s.profile_id, s.session_id, self.catalog))
        n = 0
        for b in self.store.iter_batches():
            prof = self._profiles.get(b.profile_id)
            if prof is None:
                prof = self._profiles[b.profile_id] = ProfileState(b.profile_id, self.catalog)
            live = self._sessions.get(b.session_id)
            n += self._replay(b, prof, live.state if live is not None else None)
        log.info("state rebuilt: %d profiles, %d open sessions, %d events in %.0f ms",
                 len(self._profiles), len(self._sessions), n, (time.perf_counter() - t0) * 1e3)

    def enforce_retention(self, now_ms_: int | None = None) -> int:
        """Delete events older than `store.event_retention_days` and rebuild, in place, the profiles that
        lost some (the same ProfileState objects: queued events and live sessions keep pointing at them).
        Returns the number of events deleted."""
        cutoff = (now_ms() if now_ms_ is None else now_ms_) - self.cfg.store.event_retention_days * 86_400_000
        with self._lock:  # the event writer cannot commit or apply in between
            deleted, touched = self.store.purge_before(cutoff)
            for pid in touched:
                prof = self._profiles.get(pid)
                if prof is None:
                    continue
                with prof.lock:
                    prof.forget()
                    for b in self.store.iter_batches(pid):
                        self._replay(b, prof, None)
        if deleted:
            log.info("retention: %d events older than %d days deleted (%d profiles rebuilt)", deleted,
                     self.cfg.store.event_retention_days, len(touched))
        return deleted

    def _replay(self, b, prof: ProfileState, session: SessionState | None) -> int:  # noqa: ANN001 - StoredBatch
        """Apply a stored batch to the states (titles since removed from the catalog are skipped); returns
        how many events were applied."""
        rows, known = self.catalog.index_of(b.item_ids)
        if known.all():
            types, items, ts, vals = b.types, b.item_ids, b.client_time_ms, b.values
        else:
            rows, types, items, ts, vals = rows[known], b.types[known], b.item_ids[known], b.client_time_ms[known], \
                b.values[known]
        apply_batch(prof, session, types, items, ts, vals, rows, self.catalog.genre_share)
        return len(types)

    def catalog_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Catalog rows of `ids` and which are known (Catalog.index_of: one gather from a dense table)."""
        return self.catalog.index_of(ids)

    # -- sessions & consent ---------------------------------------------------------------------
    def start_session(self, profile_id: str, device: int) -> str:
        sid = uuid.uuid4().hex
        with self._lock:
            self.store.start_session(sid, profile_id, device, now_ms())
            self._consent.setdefault(profile_id, False)
            if profile_id not in self._profiles:
                self._profiles[profile_id] = ProfileState(profile_id, self.catalog)
            live = self._sessions[sid] = LiveSession(sid, profile_id, device,
                                                     SessionState(profile_id, sid, self.catalog))
            profile = self._profiles[profile_id]
        try:  # off the Rank path: the session's first Rank finds its state prepared
            self.ranker_for(profile_id).prepare(profile, live.state)
        except Exception as exc:  # noqa: BLE001 - the session exists; its first Rank derives the state itself
            log_bug(log, "start session: preparing the ranking failed", exc)
        return sid

    def end_session(self, session_id: str) -> None:
        with self._lock:
            self._live(session_id)
            self.store.end_session(session_id, now_ms())
            del self._sessions[session_id]
        self.rank_cache.drop([session_id])

    def _live(self, session_id: str) -> LiveSession:
        live = self._sessions.get(session_id)
        if live is None:
            raise NotFoundError(f"session {session_id} is unknown or has ended")
        return live

    def get_consent(self, profile_id: str) -> tuple[bool, int]:
        row = self.store.get_profile(profile_id)
        if row is None:
            raise NotFoundError(f"profile {profile_id} is unknown")
        return row.camera_consent, row.consent_updated_ms

    def set_consent(self, profile_id: str, camera: bool) -> tuple[bool, int]:
        with self._lock:
            row = self.store.set_consent(profile_id, camera, now_ms())
            if profile_id not in self._profiles:
                self._profiles[profile_id] = ProfileState(profile_id, self.catalog)
            self._consent[profile_id] = camera
            self._consent_epoch += 1
            if not camera:
                self._purge_affect_if_unconsented()
        return row.camera_consent, row.consent_updated_ms

    def _purge_affect_if_unconsented(self) -> None:
        if not self.consented_sessions():
            self._affect = None
            self._affect_purged_ns = time.monotonic_ns()

    def consented_sessions(self) -> list[tuple[str, str]]:
        """(session_id, profile_id) of open sessions whose profile allows camera affect."""
        with self._lock:
            return [(s.session_id, s.profile_id) for s in self._sessions.values()
                    if self._consent.get(s.profile_id, False)]

    # -- events ---------------------------------------------------------------------------------
    def ingest(self, session_id: str, rows: list[tuple[int, int, int, float]]) -> int:
        """Make (type, item_id, client_time_ms, value) rows durable and visible; the last durable seq."""
        cols = validate(columns_from_rows(session_id, rows), max(len(rows), 1))
        return self.ingest_columns([cols])[-1]

    def ingest_columns(self, batches: list[Columns], timeout_s: float = 30.0,
                       still_wanted: Callable[[], bool] | None = None) -> list[int]:
        """Validated columns of one or more sessions -> durable (one group commit) and applied to memory.
        Returns each batch's last sequence number. Nothing is written when a session or title is unknown,
        nor when `still_wanted()` (the call is still live) is false by the time of the commit."""
        pending = []
        for cols in batches:
            live = self._live(cols.session_id)
            prof = self._profiles.get(live.profile_id)
            if prof is None:
                raise NotFoundError(f"session {cols.session_id} is unknown or has ended")
            rows, known = self.catalog_rows(cols.item_ids)
            if not bool(known.all()):
                bad = cols.item_ids[~known][:5].tolist()
                raise NotFoundError(f"item_id not in the catalog: {bad}")
            pending.append(_Pending(live.profile_id, cols.session_id, prof, live, cols, rows, still_wanted))
        self.writer.submit(pending)
        deadline = time.monotonic() + timeout_s
        for p in pending:
            if not p.done.wait(max(0.0, deadline - time.monotonic())):
                raise StoreError("store: the write did not finish in time; it may or may not be durable")
        for p in pending:
            if p.error is not None:
                raise p.error
        return [p.last_seq for p in pending]

    # -- affect ---------------------------------------------------------------------------------
    def on_affect(self, affect: AffectState, session_id: str) -> bool:
        """Accept a sample only for a consented session and only if captured after the last purge."""
        with self._lock:
            live = self._sessions.get(session_id)
            if live is None or not self._consent.get(live.profile_id, False):
                return False
            if affect.capture_ns <= self._affect_purged_ns:
                return False
            self._affect = affect
            self.vision.affect_samples_received += 1
            return True

    def latest_affect(self) -> AffectState | None:
        return self._affect

    # -- ranking --------------------------------------------------------------------------------
    def rank_versions(self, session_id: str) -> tuple[tuple[int, int] | None, float]:
        """For the Rank cache: the (profile, session) state versions an answer computed now depends on, or
        None while fresh consented affect is in use (the answer then changes with time); and the affect
        age a Rank reports now (negative when none)."""
        live = self._live(session_id)
        prof = self._profiles.get(live.profile_id)
        if prof is None:
            raise NotFoundError(f"session {session_id} is unknown or has ended")
        affect = self._affect if self._consent.get(live.profile_id, False) else None
        if affect is None:
            return (prof.version, live.state.version), -1.0
        now = time.monotonic_ns()
        age = affect.age_s(now)
        if affect.is_fresh(now, self.ranker.affect_stale_s):
            return None, age
        return (prof.version, live.state.version), age

    def rank_cache_put(self, session_id: str, key: tuple, versions: tuple[int, int], payload: bytes) -> None:
        self.rank_cache.put(session_id, key, versions, payload)
        if session_id not in self._sessions:  # ended or forgotten while this Rank ran: keep nothing
            self.rank_cache.drop([session_id])

    def rank(self, session_id: str, ctx: RankContext, candidate_ids: np.ndarray | list[int] | None,
             k: int) -> RankResult:
        """Rank for a session now. No global lock: the ranker only reads, and copies what it needs of the
        profile and session state under their own locks (events may be applied meanwhile)."""
        live = self._live(session_id)
        prof = self._profiles.get(live.profile_id)
        if prof is None:  # forgotten between the two lookups
            raise NotFoundError(f"session {session_id} is unknown or has ended")
        consent = self._consent.get(live.profile_id, False)
        cands = None
        if candidate_ids is not None and len(candidate_ids):
            cands = candidate_ids if isinstance(candidate_ids, np.ndarray) else np.asarray(candidate_ids, np.int64)
        exps = self.experiments
        ranker = self.ranker if exps is None else exps.on_rank(live.profile_id)  # the arm's ranker (cached)
        result = ranker.rank(prof, live.state, self._affect if consent else None, consent, ctx, cands, k,
                             time.monotonic_ns())
        if result.unknown_ids:  # the ranker found them while mapping ids to rows: no extra pass here
            raise NotFoundError(f"candidate ids not in the catalog: {result.unknown_ids[:5]}")
        self.counters.ranks += 1
        return result

    def ranker_for(self, profile_id: str) -> Ranker:
        """The ranker that serves this profile: its experiment arm's, else the box's (no exposure logged)."""
        return self.ranker if self.experiments is None else self.experiments.ranker_for(profile_id)

    def note_cached_rank(self, session_id: str) -> None:
        """A Rank answered from the cache is an exposure too (the cached answer came from the same arm)."""
        if self.experiments is not None:
            live = self._sessions.get(session_id)
            if live is not None:
                self.experiments.on_rank(live.profile_id)

    # -- profiles -------------------------------------------------------------------------------
    def explain(self, profile_id: str, top_k: int = 0) -> dict:
        """What the box holds about a profile, and (top_k > 0) its top titles now with their reasons."""
        row = self.store.get_profile(profile_id)
        if row is None:
            raise NotFoundError(f"profile {profile_id} is unknown")
        events, oldest = self.store.event_stats(profile_id)
        sessions = self.store.count_sessions(profile_id)
        prof = self._profiles.get(profile_id)
        top = prof.top_genres(5) if prof is not None else []
        items = []
        if top_k > 0 and prof is not None:
            ctx = rank_context(0, now_ms(), 0, 0, self.cfg.ranking.default_max_maturity)
            ranker = self.ranker_for(profile_id)
            with self._lock:  # behaviour only: no live session, no affect
                items = ranker.rank(prof, SessionState(profile_id, "explain", self.catalog), None, False, ctx,
                                    None, top_k, time.monotonic_ns()).items
        return {"camera_affect": row.camera_consent, "events": events, "sessions": sessions,
                "oldest_ms": oldest or 0, "top_genres": top, "top_items": items}

    def list_profiles(self) -> list[tuple[str, bool]]:
        return [(p.profile_id, p.camera_consent) for p in self.store.profiles()]

    def forget(self, profile_id: str) -> tuple[int, int]:
        """Erase a profile everywhere: store, memory, affect."""
        with self._lock:
            if self.store.get_profile(profile_id) is None and profile_id not in self._profiles:
                raise NotFoundError(f"profile {profile_id} is unknown")
            if self.experiments is None:
                ev, se = self.store.forget_profile(profile_id)
            else:
                with self.experiments.forgetting(profile_id):  # its buffered exposures go too
                    ev, se = self.store.forget_profile(profile_id)
            self._profiles.pop(profile_id, None)
            self._consent.pop(profile_id, None)
            gone = [s for s, live in self._sessions.items() if live.profile_id == profile_id]
            for sid in gone:
                self._sessions.pop(sid).state.ranker_cache = None  # a Rank still running keeps only its copy
            self.rank_cache.drop(gone)
            self._consent_epoch += 1
            self._purge_affect_if_unconsented()
        return ev, se

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"appliance": __version__, "ranker_bundle": self.bundle.version,
                "onnxruntime": onnxruntime.__version__, "vision_model": self.vision.model_version}


def _catalog_row(r: tuple) -> CatalogRow:
    item_id, title, genres, year, maturity = r
    return CatalogRow(item_id=int(item_id), title=title, genres=tuple(g for g in genres.split("|") if g),
                      year=year, maturity=int(maturity))


def _row_tuple(r: CatalogRow) -> tuple[int, str, str, int | None, int]:
    return (r.item_id, r.title, "|".join(r.genres), r.year, r.maturity)


_CONTEXTS: dict[tuple[int, int, int, int], RankContext] = {}


def rank_context(device: int, local_time_ms: int, utc_offset_min: int, max_maturity: int,
                 default_max: str) -> RankContext:
    """The ranker's context from the request's (no local time given = now; no ceiling = config's).

    Kept per minute of the request's time: the hour and weekday cannot change within a UTC minute (offsets
    are whole minutes, and the time's valid range ends on a minute), and building it takes two datetime
    objects (~10 us of a Rank). A request the ranker refuses is never kept."""
    t = local_time_ms if local_time_ms > 0 else now_ms()
    ceiling = max_maturity or MATURITY_BY_NAME[default_max]
    key = (device, t // 60_000, utc_offset_min, ceiling)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = RankContext.from_request(device, t, utc_offset_min, ceiling)
        if len(_CONTEXTS) >= 4096:
            _CONTEXTS.clear()
        _CONTEXTS[key] = ctx
    return ctx
