"""In-process ranker: seven additive, vectorised signals per candidate, policy gates, MMR, reasons.

score(item) = sequence + collaborative + session + content + popularity + context + affect, each recorded
in the item's `contributions` so the reasons are the real reasons:

- sequence       w_q * z-score over the candidates the model knows of <q, e_item>: q is the SASRec
                 encoder's query (ONNX Runtime, appliance/ranking/sequence.py) for the household's recent
                 positive titles, newest last; 0 for titles the model never saw and for bundles without a
                 sequence model. Reason: "Because you just watched X", X the recent title (of the last
                 three) whose sequence embedding is closest to the item.
- next           w_n * z-score over the candidates of sum_k h_k P(item | r_k): the bundle's first-order
                 "watched next" chain over the newest `next_n` positive titles r_1 (newest) .. r_n, with
                 h_k = 1/k. Reason: "Viewers often watch this after X", X the r_k contributing most.

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
_SEQ, _NEXT, _CF, _SESSION, _CONTENT, _POP, _CTX, _AFFECT = (SIGNALS.index(n) for n in (
    "sequence", "next", "collaborative", "session", "content", "popularity", "context", "affect"))
SEQ_REASON_RECENT = 3  # "Because you just watched X": X among the newest this many titles


@dataclass(frozen=True)
class SignalWeights:
    """Weights of the behaviour signals (affect's comes from config). Defaults may be overridden by
    the bundle manifest's "ranker" table, which the training job tunes on a validation split."""
    sequence: float = 1.0
    next: float = 0.0
    next_n: float = 10.0              # newest positives the "watched next" chain looks at
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
    history: list[int]          # positive titles, oldest first (profile, then session-only ones)
    excluded: set[int]
    disliked: set[int]
    profile_pos: list
    session_pos: list
    profile_aff: np.ndarray
    session_aff: np.ndarray


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return ((x - x.mean()) / sd if sd > 0 else np.zeros_like(x)).astype(np.float32)


def _zscore(x: np.ndarray, mask: np.ndarray | None, weight: float, out: np.ndarray) -> None:
    """out = weight * (x - mean) / std over x (over x[mask] when given; 0 outside the mask)."""
    v = x[mask] if mask is not None else x
    mu, sd = float(v.mean()), float(v.std())
    if sd <= 0:
        out[:] = 0.0
        return
    np.multiply(x - mu, weight / sd, out=out)
    if mask is not None:
        out[~mask] = 0.0


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
        # MMR similarity = mean of the embedding cosine and the genre cosine = <M_i, M_j>.
        self._M = (np.hstack([self.Fn, self.Gl]) / np.sqrt(2.0)).astype(np.float32)
        self._allowed = {m: catalog.maturity <= m for m in range(1, 6)}
        self._all_rows = np.arange(n, dtype=np.int64)
        self.seq = bundle.sequence
        self._brow = np.where(known, brow, -1)            # catalog row -> bundle row (-1: not in bundle)
        if self.seq is not None:
            sk = known & self.seq.known[brow]
            self.seq_known = sk
            self.S = np.where(sk[:, None], self.seq.table[brow], 0.0).astype(np.float32)
        else:
            self.seq_known = np.zeros(n, dtype=bool)
            self.S = np.zeros((n, 1), dtype=np.float32)
        self._b2c = np.full(len(bundle.item_ids), -1, dtype=np.int64)  # bundle row -> catalog row
        self._b2c[brow[known]] = np.flatnonzero(known)
        self.trans = self._transition_in_catalog_rows(bundle.transition, brow, known)
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
            hist = list(profile.positives)
            if session.positives:
                seen = profile.positives
                hist += [i for i in session.positives if i not in seen]
            return _StateView(
                history=hist,
                excluded=profile.completed | profile.disliked | session.skipped | session.disliked
                | session.completed,
                disliked=profile.disliked | session.disliked,
                profile_pos=list(profile.positives.items()),
                session_pos=list(session.positives.items()),
                profile_aff=profile.genre_affinity.copy(),
                session_aff=session.genre_affinity.copy(),
            )

    def _positives(self, st: _StateView) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
        """Catalog rows and weights of positive titles, newest counted most (vectorised: a Rank right
        after an event cannot reuse anything, so this runs on every call)."""
        h = max(self.w.recency_half_life, 1e-6)
        ids_l, w_l, kinds = [], [], {}
        for src, boost in ((st.profile_pos, 1.0), (st.session_pos, self.w.session_boost)):
            m = len(src)
            if not m:
                continue
            ids_l.append(np.fromiter((i for i, _ in src), dtype=np.int64, count=m))
            pw = np.fromiter((p.weight for _, p in src), dtype=np.float64, count=m)
            w_l.append(boost * pw * 0.5 ** (np.arange(m - 1, -1, -1) / h))
            for i, p in src:
                kinds.setdefault(i, p.kind)
        if not ids_l:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), [], []
        ids = np.concatenate(ids_l)
        ws = np.concatenate(w_l)
        if len(ids_l) > 1:
            ids, inv = np.unique(ids, return_inverse=True)
            ws = np.bincount(inv, weights=ws, minlength=len(ids))
        rows, known = self.catalog.index_of(ids)
        keep = known & (ws > 0)
        if st.disliked:
            keep &= ~np.isin(ids, np.fromiter(st.disliked, dtype=np.int64, count=len(st.disliked)))
        items = ids[keep].tolist()
        return rows[keep], ws[keep].astype(np.float32), items, [kinds[i] for i in items]

    def _candidate_rows(self, excl: set[int], max_maturity: int, candidate_ids: np.ndarray | None
                        ) -> tuple[np.ndarray, list[int]]:
        keep = self._allowed[max_maturity]
        if excl:
            keep = keep.copy()
            r, kn = self.catalog.index_of(np.fromiter(excl, dtype=np.int64, count=len(excl)))
            keep[r[kn]] = False
        if candidate_ids is None or len(candidate_ids) == 0:
            return np.flatnonzero(keep), []
        ids = np.asarray(candidate_ids, dtype=np.int64).ravel()
        if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
            ids = np.unique(ids)  # the server sends them sorted and unique already: then no copy
        r, kn = self.catalog.index_of(ids)
        if kn.all():
            return r[keep[r]], []
        r = r[kn]
        return r[keep[r]], ids[~kn].tolist()

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
            Mp = self._M[pr]
            lam = self.diversity
            base = ((1 - lam) * rel).astype(np.float32)
            maxsim = np.zeros(pool_n, dtype=np.float32)
            val = np.empty(pool_n, dtype=np.float32)
            picked = []
            for _ in range(min(want, pool_n)):
                np.multiply(maxsim, -lam, out=val)
                val += base
                if picked:
                    val[picked] = -np.inf
                j = int(np.argmax(val))
                picked.append(j)
                np.maximum(maxsim, Mp @ Mp[j], out=maxsim)  # similarity to the newly picked item only
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
        seq_recent = self._sequence_term(st.history, rows, terms[_SEQ]) if w.sequence else None
        nxt = self._next_term(st.history, rows, terms[_NEXT]) if w.next else None
        prow, pw, pitems, pkinds = self._positives(st)
        if len(prow):
            taste = pw @ self.F[prow]
            tn = float(np.linalg.norm(taste))
            if tn > 0 and w.collaborative:
                terms[_CF] = (w.collaborative / tn) * (self.F[rows] @ taste)
        s_aff = st.session_aff
        s_hat = s_aff / (float(np.abs(s_aff).sum()) + 1.0)
        p_aff = st.profile_aff
        p_hat = p_aff / (float(np.abs(p_aff).sum()) + 5.0)
        gp = G @ np.stack([s_hat, p_hat], axis=1)
        terms[_SESSION] = w.session * gp[:, 0]
        terms[_CONTENT] = w.content * gp[:, 1]
        cold = max(0.0, 1.0 - len(prow) / max(w.cold_full_positives, 1e-9))
        wpop = w.popularity + w.popularity_cold * cold
        if wpop:
            terms[_POP] = wpop * self.pop_z[rows]
        ctx_keys = [key for key in active_context_keys(context.device, context.local_hour, context.weekday)
                    if key in self._ctx_vecs]
        if ctx_keys:
            terms[_CTX] = w.context * (G @ sum(self._ctx_vecs[key] for key in ctx_keys))
        if use_affect:
            strength = (self.affect_weight * max(0.0, 1.0 - age / self.affect_stale_s)
                        * mood_intensity(affect.valence, affect.arousal, affect.engagement))
            mvec = self._mood_vecs.get(mood)
            if strength > 0 and mvec is not None:
                terms[_AFFECT] = strength * (G @ mvec)
        score = terms.sum(axis=0)

        order = self._mmr(rows, score, int(k))
        items = self._explain(rows, order, terms, score, prow, pw, pitems, pkinds, s_hat, p_hat,
                              ctx_keys, mood, seq_recent, st, nxt)
        return RankResult(items, use_affect, age, mood, self.model_version, unknown, len(rows),
                          (time.perf_counter() - t0) * 1e3)

    def _sequence_term(self, history: list[int], rows: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """Fill `out` (per candidate) with the sequence term; return the catalog rows of the newest
        titles the reason may name (None when the term is 0 for every candidate)."""
        if self.seq is None or not history:
            return None
        hrows, hk = self.catalog.index_of(np.fromiter(history, dtype=np.int64, count=len(history)))
        hrows = hrows[hk]
        hrows = hrows[self.seq_known[hrows]]
        if not len(hrows):
            return None
        q = self.seq.encode(self._brow[hrows])
        known = self.seq_known[rows]
        logit = self.S[rows] @ q
        nk = int(known.sum())
        if nk == 0:
            return None
        _zscore(logit, known if nk != len(rows) else None, self.w.sequence, out)
        return hrows[-SEQ_REASON_RECENT:]

    def _transition_in_catalog_rows(self, trans, brow: np.ndarray, known: np.ndarray):
        """The bundle's CSR chain re-indexed by catalog rows (titles outside the catalog dropped), with
        each row's columns sorted, so a Rank touches only the rows of the recent titles."""
        if trans is None:
            return None
        indptr, indices, data = trans
        n = len(self.catalog)
        lens = np.zeros(n, dtype=np.int64)
        cols_l, vals_l = [], []
        for c in np.flatnonzero(known).tolist():
            b = int(brow[c])
            cc = self._b2c[indices[indptr[b]:indptr[b + 1]]]
            ok = cc >= 0
            cc, vv = cc[ok], data[indptr[b]:indptr[b + 1]][ok]
            o = np.argsort(cc)
            cols_l.append(cc[o])
            vals_l.append(vv[o])
            lens[c] = len(cc)
        new_ptr = np.r_[0, np.cumsum(lens)].astype(np.int64)
        order = np.flatnonzero(known)
        cols = np.zeros(int(new_ptr[-1]), dtype=np.int64)
        vals = np.zeros(int(new_ptr[-1]), dtype=np.float32)
        for c, cc, vv in zip(order.tolist(), cols_l, vals_l):
            cols[new_ptr[c]:new_ptr[c + 1]] = cc
            vals[new_ptr[c]:new_ptr[c + 1]] = vv
        return new_ptr, cols, vals

    def _next_recent(self, history: list[int]) -> np.ndarray:
        """Catalog rows of the newest `next_n` positive titles, newest first."""
        n_recent = max(int(self.w.next_n), 1)
        tail = history[-n_recent:]
        hrows, hk = self.catalog.index_of(np.fromiter(tail, dtype=np.int64, count=len(tail)))
        return hrows[hk][::-1]

    def _next_term(self, history: list[int], rows: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """Fill `out` with the "watched next" term; return the recent catalog rows it used (newest
        first), or None when there is no evidence."""
        if self.trans is None or not history:
            return None
        recent = self._next_recent(history)
        indptr, cols, vals = self.trans
        vec = np.zeros(len(self.catalog), dtype=np.float32)
        for k, c in enumerate(recent.tolist()):
            a, e = indptr[c], indptr[c + 1]
            if a != e:
                vec[cols[a:e]] += vals[a:e] * (1.0 / (k + 1.0))
        x = vec[rows]
        if not x.any():
            return None
        _zscore(x, None, self.w.next, out)
        return recent

    def _next_attribution(self, recent: np.ndarray, top: np.ndarray) -> np.ndarray:
        """For each item in `top`, the recent title (catalog row) whose chain row favours it most."""
        indptr, cols, vals = self.trans
        m = np.zeros((len(recent), len(top)), dtype=np.float32)
        for k, c in enumerate(recent.tolist()):
            a, e = indptr[c], indptr[c + 1]
            if a == e:
                continue
            cc = cols[a:e]
            pos = np.minimum(np.searchsorted(cc, top), len(cc) - 1)
            hit = cc[pos] == top
            m[k, hit] = vals[a:e][pos[hit]] / (k + 1.0)
        return recent[np.argmax(m, axis=0)]

    def _explain(self, rows, order, terms, score, prow, pw, pitems, pkinds, s_hat, p_hat, ctx_keys,
                 mood, seq_recent=None, st=None, nxt=None) -> list[RankedItem]:
        """Reasons for the returned items only; each fact is computed only when its signal pushed at
        least one of them up (that is when a reason can use it)."""
        top = rows[order]
        T = terms[:, order]
        pushed = (T > 0).any(axis=1)
        cat_ids, titles = self.catalog.ids, self.catalog.titles
        n = len(top)
        facts: list[dict] = [{} for _ in range(n)]
        if seq_recent is not None and pushed[_SEQ]:
            sim = self.S[top] @ self.S[seq_recent].T            # [items, recent]
            sim[top[:, None] == seq_recent[None, :]] = -np.inf
            pick = seq_recent[np.argmax(sim, axis=1)].tolist()
            kinds = dict(st.profile_pos)
            kinds.update(dict(st.session_pos))
            for i, r in enumerate(pick):
                rid = int(cat_ids[r])
                pos = kinds.get(rid)
                facts[i].update(recent_item_id=rid, recent_title=titles[r],
                                recent_kind=pos.kind if pos is not None else "watched")
        if nxt is not None and pushed[_NEXT]:
            for i, r in enumerate(self._next_attribution(nxt, top).tolist()):
                facts[i].update(next_item_id=int(cat_ids[r]), next_title=titles[r])
        if len(prow) and pushed[_CF]:
            share = (self.F[top] @ self.F[prow].T) * pw       # each positive's part of the collab term
            share[top[:, None] == prow[None, :]] = -np.inf     # "because you liked X" never names X itself
            because = np.argmax(share, axis=1)
            because[~np.isfinite(share.max(axis=1))] = -1
            for i, b in enumerate(because.tolist()):
                if b >= 0:
                    facts[i].update(because_item_id=pitems[b], because_title=self.catalog.title_of(pitems[b]),
                                    because_kind=pkinds[b])
        names = self.catalog.genre_names
        hg = self.has_genre[top]
        for hat, sig, key in ((s_hat, _SESSION, "session_genre"), (p_hat, _CONTENT, "profile_genre")):
            if pushed[sig]:
                pos_g = hg & (hat > 0)
                gen = np.where(pos_g, hat, -np.inf).argmax(axis=1).tolist()
                ok = pos_g.any(axis=1).tolist()
                for i in range(n):
                    if ok[i]:
                        facts[i][key] = names[gen[i]]
        if ctx_keys and pushed[_CTX]:
            ctx_best = np.stack([self.Gs[top] @ self._ctx_vecs[key] for key in ctx_keys]).argmax(axis=0).tolist()
            for i in range(n):
                facts[i]["context_key"] = ctx_keys[ctx_best[i]]
        pop_recent = self.pop_recent[top].tolist()
        Tl = T.T.tolist()
        sc = score[order].tolist()
        out = []
        for i, r in enumerate(top.tolist()):
            contrib = dict(zip(SIGNALS, Tl[i]))
            f = ReasonInputs(pop_recent=pop_recent[i], mood=mood, **facts[i])
            out.append(RankedItem(int(cat_ids[r]), titles[r], sc[i], contrib, build_reasons(contrib, f)))
        return out
