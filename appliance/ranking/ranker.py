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

Where the work happens: what depends on nothing but the bundle and catalog is computed once in __init__
(per-title context and mood affinities included); what depends on the profile and session state (the
sequence encoder's query, the taste vector, every state-only term of every title) once per state version by
`prepare`, which the event path calls before its ack; a Rank only gathers its candidates' rows of that,
z-scores two of them over the candidates, adds the request's context/affect terms, runs MMR and writes the
reasons of the k titles it returns. A Rank is a few dozen numpy calls on ~1,000-element arrays, where each
call's fixed cost (~1 us) is most of its price, so the Rank path counts calls: what may be shown is one mask
per state and maturity ceiling, ids become rows with one clipped gather and one sort, mean/std skip numpy's
Python wrappers, gathers use `take` (C-ordered results), the reason texts of a title are kept per state, and
the items are handed over as columns (`Explained`; `RankResult.items` makes the objects on demand). Every
shortcut keeps the float32 arithmetic of the plain expression it replaces, step for step, so scores and
contributions are bit-identical; the one exception is MMR's similarities, one small matrix product instead
of a mat-vec per pick: the same values up to the last bit, which can move a pick only at an exact near-tie
(none in 4,800 random rankings checked against the per-pick mat-vecs).

Where the build compiled them (native.py), ids to rows, scores + MMR + the shown titles' terms, and the
reasons' walk are C calls instead (`_rankcore.c`: the same float32 steps and numpy's pairwise sums, so the
scores are the same bits; dot products summed in order rather than by BLAS); the reason texts themselves are
still made here (`_made`, kept per state). tests/ranking/test_native.py holds the two paths to the same
rankings and reasons, and the numpy path stays the statement of the rules.
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
from appliance.ranking.native import NEXT_USED, SEQ_USED
from appliance.ranking.native import load as load_native
from appliance.ranking.reasons import (
    MAX_REASONS,
    MIN_ABS,
    MIN_SHARE,
    SIGNALS,
    Reason,
    fallback_from_made,
    made_of,
    reason_floor,
    strong_from_made,
)

if TYPE_CHECKING:
    from appliance.config.schema import RankingConfig
    from appliance.fusion.state import AffectState, ProfileState, SessionState, TitleSet

MMR_POOL = 100
_SEQ, _NEXT, _CF, _SESSION, _CONTENT, _POP, _CTX, _AFFECT = (SIGNALS.index(n) for n in (
    "sequence", "next", "collaborative", "session", "content", "popularity", "context", "affect"))
SEQ_REASON_RECENT = 3  # "Because you just watched X": X among the newest this many titles
MADE_PER_STATE = 512  # reason texts kept per signal and state (a state lives until the session's next event)
_MISS = object()


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


@dataclass(slots=True)
class RankedItem:
    item_id: int
    title: str
    score: float
    contributions: dict[str, float]
    reasons: list[Reason]


class Explained:
    """The returned items of a ranking as plain columns: what `RankedItem`s are made of, without making
    them (the Rank path encodes these directly; `RankResult.items` builds the objects on first use).
    `score32` and `T` (float32 [8, k], SIGNALS order) are the arrays the scores and contributions come from;
    `scores` and `values` are their Python lists, made on first use."""

    __slots__ = ("ids", "titles", "score32", "T", "reasons", "_scores", "_values")

    def __init__(self, ids: list[int], titles: list[str], score32: np.ndarray, T: np.ndarray,
                 reasons: list[list[tuple]], values: list[list[float]] | None = None) -> None:
        self.ids, self.titles, self.score32, self.T = ids, titles, score32, T
        self.reasons = reasons  # per item: (text, signal, weight, because_item_id) tuples, Reason's fields
        self._scores: list[float] | None = None
        self._values = values

    @property
    def scores(self) -> list[float]:
        if self._scores is None:
            self._scores = self.score32.tolist()
        return self._scores

    @property
    def values(self) -> list[list[float]]:
        """Per item: the signal contributions in SIGNALS order."""
        if self._values is None:
            self._values = self.T.T.tolist()
        return self._values

    def items(self) -> list[RankedItem]:
        return [RankedItem(i, t, s, dict(zip(SIGNALS, v)), [Reason(*r) for r in rs])
                for i, t, s, v, rs in zip(self.ids, self.titles, self.scores, self.values, self.reasons)]


class RankResult:
    """A ranking. `items` may be given as an `Explained` (then `explained` keeps it and the RankedItem
    objects are made on first access of `items`)."""

    __slots__ = ("_items", "explained", "affect_used", "affect_age_s", "mood", "model_version", "unknown_ids",
                 "considered", "elapsed_ms")

    def __init__(self, items: list[RankedItem] | Explained, affect_used: bool, affect_age_s: float, mood: str,
                 model_version: str, unknown_ids: list[int] | None = None, considered: int = 0,
                 elapsed_ms: float = 0.0) -> None:
        self.explained = items if isinstance(items, Explained) else None
        self._items = None if self.explained is not None else items
        self.affect_used = affect_used
        self.affect_age_s = affect_age_s    # negative when there is no (consented) affect
        self.mood = mood                    # "" when affect was not used
        self.model_version = model_version
        self.unknown_ids = [] if unknown_ids is None else unknown_ids  # candidate ids not in the catalog
        self.considered = considered        # candidates left after dedupe, maturity gate and exclusions
        self.elapsed_ms = elapsed_ms

    @property
    def items(self) -> list[RankedItem]:
        if self._items is None:
            self._items = self.explained.items()
        return self._items

    @items.setter
    def items(self, value: list[RankedItem]) -> None:
        self._items, self.explained = value, None

    def __repr__(self) -> str:
        return (f"RankResult(items={self.items!r}, affect_used={self.affect_used!r}, affect_age_s={self.affect_age_s!r}, "
                f"mood={self.mood!r}, model_version={self.model_version!r}, unknown_ids={self.unknown_ids!r}, "
                f"considered={self.considered!r}, elapsed_ms={self.elapsed_ms!r})")


@dataclass
class Derivations:
    """How often a session's ranking state was derived, and where (a metric): before an ack or at session
    start (`prepare`, off the Rank path), or by a Rank that found nothing prepared for the current state
    (another session of its profile had an event, or the state was built by a Rank-only caller). Shared by
    the A/B arms' copies of a ranker; counts are taken under the GIL without a lock (a metric, not a ledger)."""
    prepared: int = 0
    on_rank: int = 0


@dataclass
class _StateView:
    history: list[int]          # positive titles, oldest first (profile, then session-only ones)
    excluded: np.ndarray        # catalog-sized bool masks (TitleSet masks OR-ed)
    disliked: np.ndarray
    profile_pos: list
    session_pos: list
    profile_aff: np.ndarray
    session_aff: np.ndarray


@dataclass
class _Derived:
    """What every Rank of a session needs from its state until the next event (see `Ranker.prepare`)."""
    excl_rows: np.ndarray | None    # catalog rows never to show (completed, disliked, skipped...)
    prow: np.ndarray                # positive titles: catalog rows, weights, ids, "liked"/"watched"
    pw: np.ndarray
    pitems: list[int]
    pkinds: list[str]
    s_hat: np.ndarray               # normalised session / profile genre affinity
    p_hat: np.ndarray
    seq_q: np.ndarray | None        # the sequence encoder's query for the history (None: no evidence)
    seq_recent: np.ndarray | None   # catalog rows of the newest titles a sequence reason may name
    next_recent: np.ndarray | None  # the recent catalog rows the "watched next" row of `base` used, newest
                                    # first (None: no chain or no history, and that row is 0)
    kinds: dict                     # item id -> Positive, for "Because you just watched/liked X"
    base: np.ndarray                # [3, catalog]: per title the raw sequence and "next" scores (z-scored
                                    # over the candidates at Rank time) and the sum of the other state terms
    taste: np.ndarray | None        # w_cf * unit taste vector (to split the sum again for the top k)
    session_w: np.ndarray           # w_s * session affinity, w_c * profile affinity (genre space)
    content_w: np.ndarray
    w_pop: float                    # popularity weight incl. the cold-start share
    # For the reasons of the top k (gathered once per state instead of once per Rank):
    prow_F: np.ndarray              # F[prow]: the positives' embeddings ("Because you liked X")
    seq_recent_S: np.ndarray | None  # S[seq_recent] ("Because you just watched X")
    s_best: np.ndarray              # s_hat / p_hat where > 0, else -inf (the genre a reason may name)
    p_best: np.ndarray
    keep: dict = field(default_factory=dict)  # maturity ceiling -> catalog mask of rows a Rank may show
                                              # (allowed and not left out), filled on first use
    made: dict = field(default_factory=dict)  # signal -> {catalog row: (reason text, named id) or None},
                                              # filled as titles are shown (see Ranker._made)


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return ((x - x.mean()) / sd if sd > 0 else np.zeros_like(x)).astype(np.float32)


_add = np.add.reduce


def _mean_std(v: np.ndarray) -> tuple[float, float]:
    """float(v.mean()), float(v.std()) of a float32 vector, bit for bit, without numpy's Python-level
    `_methods` (a dozen calls and checks: a tenth of a Rank's time): the same reductions in the same
    order, the same float32 roundings (numpy divides the float32 sum by an intp count in float64)."""
    n = v.size
    mean = np.float32(float(_add(v)) / n)
    dev = v - mean
    np.square(dev, out=dev)
    return float(mean), float(np.sqrt(np.float32(float(_add(dev)) / n)))


def _zscore(x: np.ndarray, mask: np.ndarray | None, weight: float, out: np.ndarray) -> None:
    """out = weight * (x - mean) / std over x (over x[mask] when given; 0 outside the mask)."""
    v = x[mask] if mask is not None else x
    mu, sd = _mean_std(v)
    if sd <= 0:
        out[:] = 0.0
        return
    np.subtract(x, mu, out=out)
    out *= weight / sd
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
        self._pop_recent_l: list[bool] = self.pop_recent.tolist()
        self._pop_made = tuple(made_of(_POP, {"pop_recent": v}) for v in (False, True))  # by pop_recent
        self.Gs = catalog.genre_share
        gn = np.linalg.norm(catalog.genres, axis=1, keepdims=True)
        self.Gl = (catalog.genres / np.maximum(gn, 1e-9)).astype(np.float32)
        self.has_genre = catalog.genres > 0
        self._id_list: list[int] = catalog.ids.tolist()  # row -> id as a Python int (the reasons' loop)
        # MMR similarity = mean of the embedding cosine and the genre cosine = <M_i, M_j>.
        self._M = (np.hstack([self.Fn, self.Gl]) / np.sqrt(2.0)).astype(np.float32)
        self._allowed = {m: catalog.maturity <= m for m in range(1, 6)}
        self._allowed_rows = {m: np.flatnonzero(a) for m, a in self._allowed.items()}
        self._native = load_native()  # the C loops of the Rank path (None: numpy, the same rankings)
        self.derivations = Derivations()
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
        ct = CONTEXT_GENRE_TABLE if context_table is None else context_table
        # Per title: its mood affinity (x request strength) and its context prior (x w_context), once.
        self._mood_cat = {m: self.Gs @ _table_vec(t, catalog) for m, t in mt.items()}
        self._ctx_cat = {k: (self.w.context * (self.Gs @ _table_vec(t, catalog))).astype(np.float32)
                         for k, t in ct.items()}
        # Active context rows -> their summed per-title prior, made on first use (a handful of combinations):
        # the same float32 sums, in the same order, as adding the rows' gathers at Rank time.
        self._ctx_sum: dict[tuple[str, ...], np.ndarray] = {}
        self._ctx_keys: dict[tuple[int, int, int], tuple[str, ...]] = {}  # (device, hour, weekday) -> rows

    @classmethod
    def from_config(cls, cfg: RankingConfig, bundle_dir: str | os.PathLike[str]) -> Ranker:
        """Load and verify the bundle at `bundle_dir` (already expanded) and rank over its catalog."""
        bundle = RankerBundle.load(bundle_dir, cfg.sequence_runtime)
        return cls(bundle, bundle.catalog(), affect_weight=cfg.affect_weight, diversity=cfg.diversity,
                   affect_stale_s=cfg.affect_stale_s)

    @staticmethod
    def _bundle_rows(bundle_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(bundle_ids) == 0:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(bundle_ids, ids), len(bundle_ids) - 1)
        known = bundle_ids[pos] == ids
        return np.where(known, pos, 0), known

    # ---- per-state pieces: computed once per (profile version, session version) --------------------

    def prepare(self, profile: ProfileState, session: SessionState) -> None:
        """Derive, now, what every Rank of this session needs from its state until the next event (the
        sequence encoder's query, the taste vector, the "watched next" scores, the left-out rows...).

        The event path calls this after applying a batch and before acknowledging it, and StartSession for
        the new session, so the Rank that follows does not pay for it; a Rank that finds nothing prepared
        derives it itself (`derivations` counts both)."""
        self._derived(profile, session, on_rank=False)

    def _derived(self, profile: ProfileState, session: SessionState, on_rank: bool = True) -> _Derived:
        cached = session.ranker_cache
        if (cached is not None and cached[0] is self and cached[1] == profile.version
                and cached[2] == session.version):
            return cached[3]
        st, pver, sver = self._read_state(profile, session)
        d = self._derive(st)
        if on_rank:
            self.derivations.on_rank += 1
        else:
            self.derivations.prepared += 1
        session.ranker_cache = (self, pver, sver, d)  # one tuple: readers see the old or the new entry whole
        return d

    def _read_state(self, profile: ProfileState, session: SessionState) -> tuple[_StateView, int, int]:
        """Copy, under the states' locks, what a Rank needs (events may arrive meanwhile), with the two
        versions the copy belongs to."""
        with profile.lock, session.lock:
            hist = list(profile.positives)
            if session.positives:
                seen = profile.positives
                hist += [i for i in session.positives if i not in seen]
            m = self._mask
            return _StateView(
                history=hist,
                excluded=m(profile.completed) | m(profile.disliked) | m(session.skipped) | m(session.disliked)
                | m(session.completed),
                disliked=m(profile.disliked) | m(session.disliked),
                profile_pos=list(profile.positives.items()),
                session_pos=list(session.positives.items()),
                profile_aff=profile.genre_affinity.copy(),
                session_aff=session.genre_affinity.copy(),
            ), profile.version, session.version

    def _mask(self, titles: TitleSet) -> np.ndarray:
        """A state's title set as a mask over this ranker's catalog rows (its own mask when the state was
        built on this catalog, as on the box)."""
        if titles.catalog is self.catalog:
            return titles.mask
        mask = np.zeros(len(self.catalog), dtype=bool)
        ids = list(titles)
        if ids:
            r, kn = self.catalog.index_of(np.asarray(ids, dtype=np.int64))
            mask[r[kn]] = True
        return mask

    def _derive(self, st: _StateView) -> _Derived:
        w = self.w
        excl = np.flatnonzero(st.excluded) if st.excluded.any() else None
        prow, pw, pitems, pkinds = self._positives(st)
        taste = None
        if len(prow) and w.collaborative:
            t = pw @ self.F[prow]
            tn = float(np.linalg.norm(t))
            if tn > 0:
                taste = (t * (w.collaborative / tn)).astype(np.float32)
        s_aff, p_aff = st.session_aff, st.profile_aff
        s_hat = s_aff / (float(np.abs(s_aff).sum()) + 1.0)
        p_hat = p_aff / (float(np.abs(p_aff).sum()) + 5.0)
        cold = max(0.0, 1.0 - len(prow) / max(w.cold_full_positives, 1e-9))
        seq_q = seq_recent = None
        if w.sequence and self.seq is not None and st.history:
            hrows, hk = self.catalog.index_of(np.fromiter(st.history, dtype=np.int64, count=len(st.history)))
            hrows = hrows[hk]
            hrows = hrows[self.seq_known[hrows]]
            if len(hrows):
                seq_q = self.seq.encode(self._brow[hrows])
                seq_recent = hrows[-SEQ_REASON_RECENT:]
        # Three rows per title (~12 bytes x catalog per session): the two terms that are z-scored over each
        # request's candidates, and the sum of the rest. The top k's split of that sum is recomputed.
        base = np.zeros((3, len(self.catalog)), dtype=np.float32)
        next_recent = None
        if w.next and self.trans is not None and st.history:
            next_recent = self._next_recent(st.history)
            indptr, cols, vals = self.trans
            next_vec = base[1]
            for k, c in enumerate(next_recent.tolist()):
                a, e = indptr[c], indptr[c + 1]
                if a != e:
                    next_vec[cols[a:e]] += vals[a:e] * (1.0 / (k + 1.0))
        kinds = dict(st.profile_pos)
        kinds.update(dict(st.session_pos))
        w_pop = w.popularity + w.popularity_cold * cold
        if seq_q is not None:
            np.matmul(self.S, seq_q, out=base[0])
        session_w = (w.session * s_hat).astype(np.float32)
        content_w = (w.content * p_hat).astype(np.float32)
        np.matmul(self.Gs, session_w + content_w, out=base[2])
        if taste is not None:
            base[2] += self.F @ taste
        if w_pop:
            base[2] += self.pop_z * np.float32(w_pop)
        return _Derived(excl, prow, pw, pitems, pkinds, s_hat, p_hat, seq_q, seq_recent,
                        next_recent, kinds, base, taste, session_w, content_w, w_pop, self.F[prow],
                        self.S[seq_recent] if seq_recent is not None else None,
                        np.where(s_hat > 0, s_hat, -np.inf), np.where(p_hat > 0, p_hat, -np.inf))

    def _positives(self, st: _StateView) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
        """Catalog rows, weights, ids and kinds of the positive titles, newest counted most: a title in
        both the profile and the session adds up (ids ascending then; else in the source's order)."""
        h = max(self.w.recency_half_life, 1e-6)
        acc: dict[int, float] = {}
        kinds: dict[int, str] = {}
        sources = 0
        for src, boost in ((st.profile_pos, 1.0), (st.session_pos, self.w.session_boost)):
            m = len(src)
            if not m:
                continue
            sources += 1
            decay = (0.5 ** (np.arange(m - 1, -1, -1) / h)).tolist()
            for (i, p), f in zip(src, decay):
                acc[i] = acc.get(i, 0.0) + boost * p.weight * f
                kinds.setdefault(i, p.kind)
        row_of, disliked = self.catalog.row_of, st.disliked
        rows, ws, items = [], [], []
        for i in (sorted(acc) if sources > 1 else acc):
            wv = acc[i]
            r = row_of(i)
            if r is not None and wv > 0 and not disliked[r]:
                rows.append(r)
                ws.append(wv)
                items.append(i)
        return (np.array(rows, dtype=np.int64), np.array(ws, dtype=np.float64).astype(np.float32), items,
                [kinds[i] for i in items])

    # ---- request-time pieces -------------------------------------------------------------------

    def _keep(self, d: _Derived, max_maturity: int) -> np.ndarray:
        """The catalog mask of what this state may show under this ceiling (made on first use)."""
        keep = d.keep.get(max_maturity)
        if keep is None:
            keep = self._allowed[max_maturity]
            if d.excl_rows is not None and len(d.excl_rows):
                keep = keep.copy()
                keep[d.excl_rows] = False
            d.keep[max_maturity] = keep  # idempotent: two threads store equal masks
        return keep

    def _candidate_rows(self, d: _Derived, max_maturity: int, candidate_ids: np.ndarray | None
                        ) -> tuple[np.ndarray, list[int]]:
        """Catalog rows to score, ascending and unique (one catalog-sized mask: dedupes, sorts and gates in
        a few vector passes), and the candidate ids the catalog lacks. What may be shown at all (maturity
        gate and the state's left-out titles) is one mask per state and ceiling, made on first use."""
        keep = self._keep(d, max_maturity)
        unknown: list[int] = []
        if candidate_ids is None or len(candidate_ids) == 0:
            allowed = self._allowed[max_maturity]
            return (self._allowed_rows[max_maturity] if keep is allowed else keep.nonzero()[0]), unknown
        ids = np.asarray(candidate_ids, dtype=np.int64).ravel()
        # Sorted rows (-1, an unknown id, first), then each row once and only where `keep` allows: the rows
        # ascending and unique, as a catalog-sized mask's nonzero() gives them, at half the cost.
        r = np.sort(self.catalog.lookup(ids))
        if r[0] < 0:
            unknown = np.unique(ids[self.catalog.lookup(ids) < 0]).tolist()
            r = r[r >= 0]
            if not r.size:
                return r.astype(np.intp), unknown
        ok = keep.take(r)
        np.logical_and(ok[1:], r[1:] != r[:-1], out=ok[1:])
        return r[ok].astype(np.intp, copy=False), unknown

    def _context_sum(self, keys: tuple[str, ...]) -> np.ndarray:
        """Per title, the summed prior of these active context rows (cached per combination)."""
        v = self._ctx_sum.get(keys)
        if v is None:
            v = self._ctx_cat[keys[0]]
            for key in keys[1:]:
                v = v + self._ctx_cat[key]
            self._ctx_sum[keys] = v
        return v

    def _mmr(self, rows: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
        """Indices into `rows`, in the order to show: MMR over the best MMR_POOL, then by score."""
        c = len(rows)
        pool_n = min(c, MMR_POOL)
        neg = np.negative(score)
        pool = neg.argpartition(pool_n - 1)[:pool_n] if pool_n < c else np.arange(c)
        pool = pool[neg[pool].argsort(kind="stable")]
        want = min(k, c)
        if self.diversity <= 0 or pool_n <= 1:
            head = pool
        else:
            # MMR: pick argmax of (1 - lam) rel_i - lam max_{j picked} sim_ij, one title at a time. `base` is the
            # relevance part, in place with the same float32 steps as
            # ((1 - lam) * ((s - min) / max(max - min, 1e-9))).astype(float32); [0] is the max, [-1] the min.
            base = score[pool]
            base -= base[-1]
            base /= max(float(base[0]), 1e-9)
            base *= 1 - self.diversity
            n_pick = min(want, pool_n)
            # Only titles whose relevance is within lam (x 1.001: |sim| <= 1 up to rounding) of the n_pick-th best
            # can ever be picked: a title's value is at most its relevance and at least relevance - lam, and
            # before each of the n_pick picks one of the n_pick best is still unpicked. `base` is sorted
            # descending, so they are a prefix of the pool, `Mc`.
            m = int(np.count_nonzero(base >= base[n_pick - 1] - np.float32(self.diversity * 1.001)))
            Mc = self._M.take(rows.take(pool[:m]), axis=0)
            # After some picks a title's value is the min over them of (1 - lam) rel - lam sim[j] (a negative
            # constant times a max is a min of the products; float rounding is monotone): row j of `cand` is
            # that term for pick j, with -inf at j itself (a pick is never picked again), so each pick is one
            # element-wise min and one argmax. Picks come from the top of the pool, so the rows of its first
            # 2 x n_pick titles are one product; a pick beyond them (rare) gets its row on its own.
            neg_lam = np.float32(-self.diversity)
            bm = base[:m]
            r = min(m, 2 * n_pick)
            cand = Mc[:r] @ Mc.T
            cand *= neg_lam
            cand += bm
            cand.ravel()[::m + 1] = -np.inf  # the diagonal of the r x m block
            val = bm.copy()
            picked = [0]  # the first pick is the best score (argmax of `base`, which is sorted descending)
            j = 0
            minimum = np.minimum
            for _ in range(n_pick - 1):
                if j < r:
                    minimum(val, cand[j], out=val)
                else:
                    b = Mc.dot(Mc[j])
                    b *= neg_lam
                    b += bm
                    b[j] = -np.inf
                    minimum(val, b, out=val)
                j = int(val.argmax())
                picked.append(j)
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
        d = self._derived(profile, session)
        native = self._native
        if native is not None and candidate_ids is not None and len(candidate_ids) \
                and self.catalog.id_bits is not None:
            rows, unknown = self._candidate_rows_native(native, d, context.max_maturity, candidate_ids)
        else:
            rows, unknown = self._candidate_rows(d, context.max_maturity, candidate_ids)

        use_affect = bool(consent) and affect is not None and affect.is_fresh(now_ns, self.affect_stale_s)
        age = affect.age_s(now_ns) if (consent and affect is not None) else -1.0
        mood = mood_word(affect.valence, affect.arousal) if use_affect else ""
        if not rows.size:
            return RankResult([], use_affect, age, mood, self.model_version, unknown, 0,
                              (time.perf_counter() - t0) * 1e3)

        if native is not None:
            return self._rank_native(native, d, context, rows, unknown, use_affect, age, mood, affect, int(k), t0)
        w = self.w
        # One gather: sequence, next, and the rest of the state terms of every candidate. `take` gives a
        # C-ordered block (`base[:, rows]` is Fortran-ordered: every row below would be strided, 5x slower).
        B = d.base.take(rows, axis=1)
        seq_recent = None
        if d.seq_q is not None:
            known = self.seq_known.take(rows)
            nk = int(np.count_nonzero(known))
            if nk:
                _zscore(B[0], known if nk != len(rows) else None, w.sequence, B[0])
                seq_recent = d.seq_recent
            else:
                B[0] = 0.0
        nxt = None
        if d.next_recent is not None and B[1].any():
            _zscore(B[1], None, w.next, B[1])
            nxt = d.next_recent
        score = _add(B, axis=0)
        ctx_keys = self._active_context(context)
        ctx = None
        if ctx_keys:
            ctx = self._context_sum(ctx_keys).take(rows)
            score += ctx
        aff = None
        mcat, strength = self._affect_terms(use_affect, affect, age, mood)
        if mcat is not None:
            aff = mcat[rows] * np.float32(strength)
            score += aff

        order = self._mmr(rows, score, int(k))
        top = rows[order]
        T = np.zeros((len(SIGNALS), len(top)), dtype=np.float32)  # every signal's part, for the k shown only
        B[:2].take(order, axis=1, out=T[:2])  # base rows 0, 1: sequence, next (SIGNALS 0, 1)
        if d.taste is not None:
            self.F.take(top, axis=0).dot(d.taste, out=T[_CF])
        G = self.Gs.take(top, axis=0)
        G.dot(d.session_w, out=T[_SESSION])
        G.dot(d.content_w, out=T[_CONTENT])
        if d.w_pop:
            T[_POP] = self.pop_z[top] * np.float32(d.w_pop)
        if ctx is not None:
            T[_CTX] = ctx[order]
        if aff is not None:
            T[_AFFECT] = aff[order]
        items = self._explain(top, T, score[order], d, ctx_keys, mood, seq_recent, nxt)
        return RankResult(items, use_affect, age, mood, self.model_version, unknown, len(rows),
                          (time.perf_counter() - t0) * 1e3)

    def _active_context(self, context: RankContext) -> tuple[str, ...]:
        """The active context rows this ranker has, per (device, hour, weekday) (cached)."""
        when = (context.device, context.local_hour, context.weekday)
        ctx_keys = self._ctx_keys.get(when)
        if ctx_keys is None:
            ctx_keys = tuple(key for key in active_context_keys(*when) if key in self._ctx_cat)
            if len(self._ctx_keys) >= 4096:  # valid requests make at most a few hundred
                self._ctx_keys.clear()
            self._ctx_keys[when] = ctx_keys
        return ctx_keys

    def _affect_terms(self, use_affect: bool, affect: AffectState | None, age: float, mood: str
                      ) -> tuple[np.ndarray | None, float]:
        """The mood's per-title affinity and this request's strength (None when affect adds nothing)."""
        if not use_affect:
            return None, 0.0
        strength = (self.affect_weight * max(0.0, 1.0 - age / self.affect_stale_s)
                    * mood_intensity(affect.valence, affect.arousal, affect.engagement))
        mcat = self._mood_cat.get(mood)
        return (mcat, strength) if strength > 0 and mcat is not None else (None, 0.0)

    def _candidate_rows_native(self, native, d: _Derived, max_maturity: int, candidate_ids: np.ndarray  # noqa: ANN001
                               ) -> tuple[np.ndarray, list[int]]:
        """`_candidate_rows` in one C call (native.py): map through the rank bitmap, dedupe, gate, sort."""
        keep = self._keep(d, max_maturity)
        ids = np.asarray(candidate_ids, dtype=np.int64).ravel()
        out = np.empty(len(ids) + 1, dtype=np.int64)
        bits, base = self.catalog.id_bits
        count, n_unknown = native.candidate_rows(ids, bits, base, keep, out)
        unknown = np.unique(ids[self.catalog.lookup(ids) < 0]).tolist() if n_unknown else []
        return out[:count], unknown

    def _rank_native(self, native, d: _Derived, context: RankContext, rows: np.ndarray, unknown: list[int],  # noqa: ANN001
                     use_affect: bool, age: float, mood: str, affect: AffectState | None, k: int,
                     t0: float) -> RankResult:
        """The rest of `rank` (scores, MMR, the shown titles' terms) in one C call, then the reasons."""
        ctx_keys = self._active_context(context)
        ctx = self._context_sum(ctx_keys) if ctx_keys else None
        mcat, strength = self._affect_terms(use_affect, affect, age, mood)
        n = min(k, len(rows))
        order = np.empty(n, dtype=np.int64)
        top_score = np.empty(n, dtype=np.float32)
        T = np.empty((len(SIGNALS), n), dtype=np.float32)
        w = self.w
        flags = native.score_and_pick(
            rows, d.base, self.seq_known if d.seq_q is not None else None, w.sequence, d.next_recent is not None,
            w.next, ctx, mcat, strength, self._M, self.diversity, MMR_POOL, self.F, d.taste, self.Gs,
            d.session_w, d.content_w, self.pop_z, float(d.w_pop), order, top_score, T)
        top = rows.take(order)
        seq_recent = d.seq_recent if flags & SEQ_USED else None
        nxt = d.next_recent if flags & NEXT_USED else None
        items = self._explain(top, T, top_score, d, ctx_keys, mood, seq_recent, nxt)
        return RankResult(items, use_affect, age, mood, self.model_version, unknown, len(rows),
                          (time.perf_counter() - t0) * 1e3)

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

    def _explain(self, top: np.ndarray, T: np.ndarray, score: np.ndarray, d: _Derived, ctx_keys: tuple[str, ...],
                 mood: str, seq_recent: np.ndarray | None, nxt: np.ndarray | None) -> Explained:
        """Reasons for the returned items only (catalog rows `top`, their per-signal terms T and scores).
        A signal's reason texts (which recent title, which genre...) are made, for all k items at once, only
        when some item's reasons will read them: first for the signals strong enough to make a reason, then,
        for the items none of those explained, for the signals that pushed them up at all (`_made`). The
        items come back as columns (`Explained`), the reasons as Reason field tuples: no object per item."""
        native = self._native
        rows = top.tolist()
        if native is not None:  # the same walk in C (native.py), reading the same made texts
            mask = native.strong_signals(T, MIN_ABS, MIN_SHARE)
            cols = [self._made(j, rows, top, d, ctx_keys, mood, seq_recent, nxt) if mask >> j & 1 else None
                    for j in range(len(SIGNALS))]
            reasons = native.pick_reasons(T, cols, SIGNALS, MIN_ABS, MIN_SHARE, MAX_REASONS)
            Tl = orders = None
        else:
            Tl = T.T.tolist()
            orders = np.argsort(-T, axis=0, kind="stable").T.tolist()  # per item: signals by value, descending
            strong = [False] * len(SIGNALS)  # what `strong_reasons` reads: the signals not below the item's floor
            for v, o in zip(Tl, orders):
                floor = reason_floor(v[o[0]])
                for j in o:
                    if v[j] < floor:
                        break
                    strong[j] = True
            none = [None] * len(rows)
            cols = [self._made(j, rows, top, d, ctx_keys, mood, seq_recent, nxt) if on else none
                    for j, on in enumerate(strong)]
            reasons = list(map(strong_from_made, Tl, orders, zip(*cols)))
        if not all(reasons):
            if Tl is None:
                Tl = T.T.tolist()
                orders = np.argsort(-T, axis=0, kind="stable").T.tolist()
                strong = [c is not None for c in cols]
                none = [None] * len(rows)
                cols = [none if c is None else c for c in cols]
            weak = [i for i, rs in enumerate(reasons) if not rs]
            pushed = (T > 0).any(axis=1).tolist()
            for j in range(len(SIGNALS)):
                if pushed[j] and not strong[j]:
                    cols[j] = self._made(j, rows, top, d, ctx_keys, mood, seq_recent, nxt)
            made = list(zip(*cols))
            for i in weak:
                reasons[i] = [fallback_from_made(Tl[i], orders[i], made[i])]
        ids, titles = self._id_list, self.catalog.titles
        return Explained([ids[r] for r in rows], [titles[r] for r in rows], score, T, reasons, Tl)

    def _made(self, j: int, rows: list[int], top: np.ndarray, d: _Derived, ctx_keys: tuple[str, ...], mood: str,
              seq_recent: np.ndarray | None, nxt: np.ndarray | None) -> list:
        """Per item (catalog rows `rows` = `top`), what signal j's reason text makes of the item's facts:
        (text, named title id) or None. The five signals whose facts depend on nothing but the state and the
        title (sequence, next, collaborative, session, content) are kept per state and row (`_Derived.made`,
        bounded), so a title shown again before the next event costs a dict lookup; the others are made
        here (popularity per title at start, affect's one text, context from the request's active rows)."""
        if j == _POP:
            made, recent = self._pop_made, self._pop_recent_l
            return [made[recent[r]] for r in rows]
        if j == _AFFECT:
            return [made_of(j, {"mood": mood})] * len(rows)
        if j == _CTX or (j == _SEQ and seq_recent is None) or (j == _NEXT and nxt is None):
            facts: list[dict] = [{} for _ in rows]
            self._facts(facts, [j], top, d, ctx_keys, seq_recent, nxt)
            return [made_of(j, f) for f in facts]
        memo = d.made.get(j)
        if memo is None:
            memo = d.made.setdefault(j, {})
        out = [memo.get(r, _MISS) for r in rows]
        miss = [i for i, m in enumerate(out) if m is _MISS]
        if miss:
            facts = [{} for _ in miss]
            self._facts(facts, [j], top if len(miss) == len(rows) else top.take(miss), d, ctx_keys, seq_recent, nxt)
            room = len(memo) < MADE_PER_STATE
            for i, f in zip(miss, facts):
                out[i] = m = made_of(j, f)
                if room:
                    memo[rows[i]] = m
        return out

    def _facts(self, facts: list[dict], signals: list[int], top: np.ndarray, d: _Derived, ctx_keys: tuple[str, ...],
               seq_recent: np.ndarray | None, nxt: np.ndarray | None) -> None:
        """Add to each item's facts those the reasons of `signals` need (see reasons.Facts)."""
        ids, titles = self._id_list, self.catalog.titles
        if _SEQ in signals and seq_recent is not None:
            sim = self.S[top] @ d.seq_recent_S.T                 # [items, recent]
            sim[top[:, None] == seq_recent[None, :]] = -np.inf
            kinds = d.kinds
            for f, q in zip(facts, seq_recent[np.argmax(sim, axis=1)].tolist()):
                rid = ids[q]
                pos = kinds.get(rid)
                f["recent_item_id"], f["recent_title"] = rid, titles[q]
                f["recent_kind"] = pos.kind if pos is not None else "watched"
        if _NEXT in signals and nxt is not None:
            for f, q in zip(facts, self._next_attribution(nxt, top).tolist()):
                f["next_item_id"], f["next_title"] = ids[q], titles[q]
        prow = d.prow
        if _CF in signals and len(prow):
            share = (self.F[top] @ d.prow_F.T) * d.pw           # each positive's part of the collab term
            share[top[:, None] == prow[None, :]] = -np.inf     # "because you liked X" never names X itself
            because = np.argmax(share, axis=1)
            because[~np.isfinite(share.max(axis=1))] = -1
            pitems, pkinds, title_of = d.pitems, d.pkinds, self.catalog.title_of
            for f, q in zip(facts, because.tolist()):
                if q >= 0:
                    f["because_item_id"], f["because_title"], f["because_kind"] = pitems[q], title_of(pitems[q]), \
                        pkinds[q]
        names = self.catalog.genre_names
        for sig, best, key in ((_SESSION, d.s_best, "session_genre"), (_CONTENT, d.p_best, "profile_genre")):
            if sig in signals:  # the item's genre with the largest positive affinity, if it has one
                m = np.where(self.has_genre[top], best, -np.inf)
                for f, g, ok in zip(facts, m.argmax(axis=1).tolist(), (m.max(axis=1) > -np.inf).tolist()):
                    if ok:
                        f[key] = names[g]
        if _CTX in signals and ctx_keys:
            best = np.stack([self._ctx_cat[key][top] for key in ctx_keys]).argmax(axis=0).tolist()
            for f, c in zip(facts, best):
                f["context_key"] = ctx_keys[c]
