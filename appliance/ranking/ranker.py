"""In-process ranker: six additive, vectorised signals per candidate, policy gates, MMR, reasons.

score(item) = collaborative + session + content + popularity + context + affect, each recorded in the
item's `contributions` so the reasons are the real reasons:

- collaborative  w_cf * <f_item, t>: t is the unit "taste" vector, the recency-weighted sum of the
                 embeddings of the profile's and session's positive titles (half-life in positions).
- session        w_s  * <genre share of item, session affinity / (|affinity|_1 + 1)>  (skips push down)
- content        w_c  * <genre share of item, profile affinity / (|affinity|_1 + 5)>
- popularity     (w_p + w_cold * max(0, 1 - positives/5)) * mean of the z-scores of log interactions and
                 of recency-weighted interactions: the prior that carries a profile with no history
- context        w_x  * <genre share, prior of the active context rows (late night, phone, weekend)>
- affect         affect_weight * (1 - age/stale) * intensity * <genre share, mood row>; exactly 0
                 without consent, without affect, with nobody seen, or once age >= affect_stale_s.

Then: maturity gate (never above context.max_maturity), leave out completed/disliked titles (and
skipped ones for the rest of the session), dedupe, MMR over the best ~100 (similarity = mean of
embedding cosine and genre cosine), top k. Titles the bundle lacks get their embedding from content.
Everything that does not depend on the request is computed once in __init__.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.errors import ValidationError
from appliance.ranking.bundle import RankerBundle
from appliance.ranking.catalog import Catalog
from appliance.ranking.mood import (
    CONTEXT_GENRE_TABLE,
    MOOD_GENRE_TABLE,
    MoodTable,
    active_context_keys,
    mood_intensity,
    mood_word,
)
from appliance.ranking.reasons import SIGNALS, Reason, ReasonInputs, build_reasons

if TYPE_CHECKING:
    from appliance.config.schema import RankingConfig
    from appliance.fusion.state import AffectState, ProfileState, SessionState

MMR_POOL = 100


@dataclass(frozen=True)
class SignalWeights:
    """Weights of the behaviour signals (affect's comes from config). Defaults may be overridden by
    the bundle manifest's "ranker" table, which the training job tunes on a validation split."""
    collaborative: float = 1.0
    session: float = 1.0
    content: float = 0.5
    popularity: float = 0.0           # for a profile with history (tuned on validation)
    popularity_cold: float = 0.3      # extra popularity with no history, fading linearly to 0 ...
    cold_full_positives: float = 5.0  # ... once this many positive titles are known
    context: float = 0.15
    recency_half_life: float = 10.0   # positions: a positive this many titles back counts half
    session_boost: float = 1.0        # multiplier of this session's own positives (added on top)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SignalWeights:
        known = {k: float(v) for k, v in (params.get("weights") or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class RankContext:
    """device: proto DeviceType; local_hour 0..23 and weekday 0 = Monday (-1 = unknown);
    max_maturity: proto Maturity 1..5."""
    device: int
    local_hour: int
    weekday: int
    max_maturity: int

    @classmethod
    def from_request(cls, device: int, local_time_unix_ms: int, utc_offset_minutes: int,
                     max_maturity: int) -> RankContext:
        """From the proto Context fields (max_maturity already resolved: UNSPECIFIED is the server's
        call, from config `default_max_maturity`). No time (0) gives hour/weekday -1: no time prior."""
        if not local_time_unix_ms:
            return cls(device=int(device), local_hour=-1, weekday=-1, max_maturity=int(max_maturity))
        if not -24 * 60 <= utc_offset_minutes <= 24 * 60:
            raise ValidationError(f"context.utc_offset_minutes out of range: {utc_offset_minutes}")
        try:
            t = _dt.datetime.fromtimestamp(local_time_unix_ms / 1000.0, tz=_dt.timezone.utc)
            t = t + _dt.timedelta(minutes=utc_offset_minutes)
        except (OverflowError, OSError, ValueError):
            raise ValidationError(f"context.local_time_unix_ms out of range: {local_time_unix_ms}") from None
        return cls(device=int(device), local_hour=t.hour, weekday=t.weekday(), max_maturity=int(max_maturity))


@dataclass
class RankedItem:
    item_id: int
    title: str
    score: float
    contributions: dict[str, float]
    reasons: list[Reason]


@dataclass
class RankResult:
    items: list[RankedItem]
    affect_used: bool
    affect_age_s: float          # negative when there is no (consented) affect
    mood: str                    # "" when affect was not used
    model_version: str
    unknown_ids: list[int] = field(default_factory=list)  # candidate ids not in the catalog
    considered: int = 0          # candidates left after dedupe, maturity gate and exclusions
    elapsed_ms: float = 0.0


@dataclass
class _StateView:
    excluded: set[int]
    disliked: set[int]
    profile_pos: list
    session_pos: list
    profile_aff: np.ndarray
    session_aff: np.ndarray


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return ((x - x.mean()) / sd if sd > 0 else np.zeros_like(x)).astype(np.float32)


def _table_vec(table: Mapping[str, float], catalog: Catalog) -> np.ndarray:
    v = np.zeros(len(catalog.genre_names), dtype=np.float32)
    for g, w in table.items():
        j = catalog.genre_index.get(g)
        if j is not None:
            v[j] = float(w)
    return v


class Ranker:
    """Thread-safe for concurrent `rank` calls: it only reads what __init__ built."""

    def __init__(self, bundle: RankerBundle, catalog: Catalog, affect_weight: float = 0.15,
                 diversity: float = 0.2, affect_stale_s: float = 1.0, *,
                 weights: SignalWeights | None = None, mood_table: MoodTable | None = None,
                 context_table: MoodTable | None = None) -> None:
        if not (0.0 <= diversity <= 1.0 and affect_weight >= 0 and affect_stale_s > 0):
            raise ValueError("diversity must be in [0, 1], affect_weight >= 0, affect_stale_s > 0")
        self.bundle, self.catalog = bundle, catalog
        self.model_version = bundle.version
        self.affect_weight, self.diversity, self.affect_stale_s = affect_weight, diversity, affect_stale_s
        self.w = weights or SignalWeights.from_params(bundle.params)
        n = len(catalog)
        brow, known = self._bundle_rows(bundle.item_ids, catalog.ids)
        content = bundle.content_embedding(catalog).astype(np.float32)
        self.F = np.where(known[:, None], bundle.item_factors[brow], content).astype(np.float32)
        self.in_bundle = known
        norms = np.linalg.norm(self.F, axis=1, keepdims=True)
        self.Fn = (self.F / np.maximum(norms, 1e-9)).astype(np.float32)
        pop = np.where(known[:, None], bundle.popularity[brow], 0.0).astype(np.float32)
        z_all, z_recent = _z(pop[:, 0]), _z(pop[:, 1])
        self.pop_z = (0.5 * (z_all + z_recent)).astype(np.float32)
        self.pop_recent = z_recent > z_all
        self.Gs = catalog.genre_share
        gn = np.linalg.norm(catalog.genres, axis=1, keepdims=True)
        self.Gl = (catalog.genres / np.maximum(gn, 1e-9)).astype(np.float32)
        self.has_genre = catalog.genres > 0
        self._allowed = {m: catalog.maturity <= m for m in range(1, 6)}
        self._all_rows = np.arange(n, dtype=np.int64)
        mt = MOOD_GENRE_TABLE if mood_table is None else mood_table
        self._mood_vecs = {m: _table_vec(t, catalog) for m, t in mt.items()}
        ct = CONTEXT_GENRE_TABLE if context_table is None else context_table
        self._ctx_vecs = {k: _table_vec(t, catalog) for k, t in ct.items()}

    @classmethod
    def from_config(cls, cfg: RankingConfig, bundle_dir: str | os.PathLike[str]) -> Ranker:
        """Load and verify the bundle at `bundle_dir` (already expanded) and rank over its catalog."""
        bundle = RankerBundle.load(bundle_dir)
        return cls(bundle, bundle.catalog(), affect_weight=cfg.affect_weight, diversity=cfg.diversity,
                   affect_stale_s=cfg.affect_stale_s)

    @staticmethod
    def _bundle_rows(bundle_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(bundle_ids) == 0:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(bundle_ids, ids), len(bundle_ids) - 1)
        known = bundle_ids[pos] == ids
        return np.where(known, pos, 0), known

    # ---- request-time pieces -------------------------------------------------------------------

    def _read_state(self, profile: ProfileState, session: SessionState) -> _StateView:
        """Copy, under the states' locks, what this request needs (events may arrive meanwhile)."""
        with profile.lock, session.lock:
            return _StateView(
                excluded=profile.completed | profile.disliked | session.skipped | session.disliked
                | session.completed,
                disliked=profile.disliked | session.disliked,
                profile_pos=list(profile.positives.items()),
                session_pos=list(session.positives.items()),
                profile_aff=profile.genre_affinity.copy(),
                session_aff=session.genre_affinity.copy(),
            )

    def _positives(self, st: _StateView) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
        """Catalog rows and weights of positive titles, newest counted most."""
        h = max(self.w.recency_half_life, 1e-6)
        merged: dict[int, tuple[float, str]] = {}
        for src, boost in ((st.profile_pos, 1.0), (st.session_pos, self.w.session_boost)):
            for age, (item, p) in enumerate(reversed(src)):
                w = boost * p.weight * 0.5 ** (age / h)
                cur = merged.get(item)
                merged[item] = (cur[0] + w, cur[1]) if cur else (w, p.kind)
        rows, ws, items, kinds = [], [], [], []
        for item, (w, kind) in merged.items():
            r = self.catalog.row_of(item)
            if r is None or item in st.disliked or w <= 0:
                continue
            rows.append(r)
            ws.append(w)
            items.append(item)
            kinds.append(kind)
        return np.asarray(rows, dtype=np.int64), np.asarray(ws, dtype=np.float32), items, kinds

    def _candidate_rows(self, excl: set[int], max_maturity: int, candidate_ids: np.ndarray | None
                        ) -> tuple[np.ndarray, list[int]]:
        keep = self._allowed[max_maturity].copy()
        if excl:
            r, kn = self.catalog.index_of(np.fromiter(excl, dtype=np.int64, count=len(excl)))
            keep[r[kn]] = False
        if candidate_ids is None or len(candidate_ids) == 0:
            return np.flatnonzero(keep), []
        ids = np.asarray(candidate_ids, dtype=np.int64).ravel()
        r, kn = self.catalog.index_of(ids)
        unknown = np.unique(ids[~kn]).tolist() if not kn.all() else []
        r = np.unique(r[kn])
        return r[keep[r]], unknown

    def _mmr(self, rows: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
        """Indices into `rows`, in the order to show: MMR over the best MMR_POOL, then by score."""
        c = len(rows)
        pool_n = min(c, MMR_POOL)
        pool = np.argpartition(-score, pool_n - 1)[:pool_n] if pool_n < c else np.arange(c)
        pool = pool[np.argsort(-score[pool], kind="stable")]
        want = min(k, c)
        if self.diversity <= 0 or pool_n <= 1:
            head = pool
        else:
            s = score[pool]
            rel = (s - s.min()) / max(float(s.max() - s.min()), 1e-9)
            pr = rows[pool]
            sim = 0.5 * (self.Fn[pr] @ self.Fn[pr].T) + 0.5 * (self.Gl[pr] @ self.Gl[pr].T)
            lam = self.diversity
            maxsim = np.zeros(pool_n, dtype=np.float32)
            avail = np.ones(pool_n, dtype=bool)
            picked = []
            for _ in range(min(want, pool_n)):
                mmr = np.where(avail, (1 - lam) * rel - lam * maxsim, -np.inf)
                j = int(np.argmax(mmr))
                picked.append(j)
                avail[j] = False
                np.maximum(maxsim, sim[j], out=maxsim)
            head = pool[picked]
        if want <= len(head):
            return head[:want]
        rest = np.setdiff1d(np.arange(c), head, assume_unique=True)
        rest = rest[np.argsort(-score[rest], kind="stable")][: want - len(head)]
        return np.concatenate([head, rest])

    def rank(self, profile: ProfileState, session: SessionState, affect: AffectState | None,
             consent: bool, context: RankContext, candidate_ids: np.ndarray | None, k: int,
             now_ns: int) -> RankResult:
        """Rank candidates (None/empty = whole catalog) for this session now; see the module doc."""
        t0 = time.perf_counter()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValidationError(f"k must be >= 1, got {k!r}")
        if context.max_maturity not in self._allowed:
            raise ValidationError(f"context.max_maturity must be 1..5, got {context.max_maturity!r}")
        st = self._read_state(profile, session)
        rows, unknown = self._candidate_rows(st.excluded, context.max_maturity, candidate_ids)

        use_affect = bool(consent) and affect is not None and affect.is_fresh(now_ns, self.affect_stale_s)
        age = affect.age_s(now_ns) if (consent and affect is not None) else -1.0
        mood = mood_word(affect.valence, affect.arousal) if use_affect else ""
        if not rows.size:
            return RankResult([], use_affect, age, mood, self.model_version, unknown, 0,
                              (time.perf_counter() - t0) * 1e3)

        w = self.w
        G = self.Gs[rows]
        terms = np.zeros((len(SIGNALS), len(rows)), dtype=np.float32)
        prow, pw, pitems, pkinds = self._positives(st)
        if len(prow):
            taste = pw @ self.F[prow]
            tn = float(np.linalg.norm(taste))
            if tn > 0:
                terms[0] = w.collaborative * (self.F[rows] @ (taste / tn))
        s_aff = st.session_aff
        s_hat = s_aff / (float(np.abs(s_aff).sum()) + 1.0)
        p_aff = st.profile_aff
        p_hat = p_aff / (float(np.abs(p_aff).sum()) + 5.0)
        terms[1] = w.session * (G @ s_hat)
        terms[2] = w.content * (G @ p_hat)
        cold = max(0.0, 1.0 - len(prow) / max(w.cold_full_positives, 1e-9))
        terms[3] = (w.popularity + w.popularity_cold * cold) * self.pop_z[rows]
        ctx_keys = [key for key in active_context_keys(context.device, context.local_hour, context.weekday)
                    if key in self._ctx_vecs]
        if ctx_keys:
            terms[4] = w.context * (G @ sum(self._ctx_vecs[key] for key in ctx_keys))
        if use_affect:
            strength = (self.affect_weight * max(0.0, 1.0 - age / self.affect_stale_s)
                        * mood_intensity(affect.valence, affect.arousal, affect.engagement))
            mvec = self._mood_vecs.get(mood)
            if strength > 0 and mvec is not None:
                terms[5] = strength * (G @ mvec)
        score = terms.sum(axis=0)

        order = self._mmr(rows, score, int(k))
        items = self._explain(rows, order, terms, score, prow, pw, pitems, pkinds, s_hat, p_hat,
                              ctx_keys, mood)
        return RankResult(items, use_affect, age, mood, self.model_version, unknown, len(rows),
                          (time.perf_counter() - t0) * 1e3)

    def _explain(self, rows, order, terms, score, prow, pw, pitems, pkinds, s_hat, p_hat, ctx_keys,
                 mood) -> list[RankedItem]:
        top = rows[order]
        T = terms[:, order]
        if len(prow):
            share = (self.F[top] @ self.F[prow].T) * pw       # each positive's part of the collab term
            share[top[:, None] == prow[None, :]] = -np.inf     # "because you liked X" never names X itself
            because = np.argmax(share, axis=1)
            because[~np.isfinite(share.max(axis=1))] = -1
        else:
            because = None
        hg = self.has_genre[top]
        s_gen = np.where(hg & (s_hat > 0), s_hat, -np.inf).argmax(axis=1)
        s_ok = (hg & (s_hat > 0)).any(axis=1)
        p_gen = np.where(hg & (p_hat > 0), p_hat, -np.inf).argmax(axis=1)
        p_ok = (hg & (p_hat > 0)).any(axis=1)
        if ctx_keys:
            per_key = np.stack([self.Gs[top] @ self._ctx_vecs[key] for key in ctx_keys])
            ctx_best = per_key.argmax(axis=0)
        names = self.catalog.genre_names
        out = []
        for i, r in enumerate(top.tolist()):
            contrib = {sig: float(T[j, i]) for j, sig in enumerate(SIGNALS)}
            b = int(because[i]) if because is not None else -1
            facts = ReasonInputs(
                because_item_id=pitems[b] if b >= 0 else 0,
                because_title=self.catalog.title_of(pitems[b]) if b >= 0 else "",
                because_kind=pkinds[b] if b >= 0 else "watched",
                session_genre=names[s_gen[i]] if s_ok[i] else "",
                profile_genre=names[p_gen[i]] if p_ok[i] else "",
                pop_recent=bool(self.pop_recent[r]),
                context_key=ctx_keys[int(ctx_best[i])] if ctx_keys else "",
                mood=mood,
            )
            out.append(RankedItem(int(self.catalog.ids[r]), self.catalog.titles[r], float(score[order[i]]),
                                  contrib, build_reasons(contrib, facts)))
        return out
