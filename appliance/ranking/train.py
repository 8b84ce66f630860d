"""Offline training job (cloud side, never on the box's hot path): MovieLens-format data -> bundle.

    python -m appliance.ranking.train --ratings ratings.csv --movies movies.csv --out models/ranker

Model (numpy only):
- every rating is an implicit interaction (the star value is ignored);
- collaborative item embedding: truncated SVD of the user x item 0/1 matrix, columns scaled by
  degree^-alpha (PureSVD, Cremonesi et al. 2010). A user's score for item i is <f_i, sum_j w_j f_j>
  over the user's titles j with recency weights w_j = 0.5^(age_j / half_life) (age in positions,
  newest = 0): exactly what the box's collaborative signal computes from `ProfileState.positives`;
- popularity: log1p(interactions) and log1p(recency-weighted interactions, 180-day half-life);
- content: ridge regression from catalog-only features (genres, release decade/year) to the
  embedding, fitted on titles with >= 5 interactions; titles without interactions (cold start) get
  the predicted embedding, and the weights ship so the box can embed titles added later.

Evaluation (honest, reported in the manifest): per user, time-ordered leave-last-out (ties in time
broken by movieId). Hyper-parameters are chosen on a validation split (each user's second-to-last
interaction, trained without the last two) and reported once on the test split. Full ranking over
the whole catalog minus the user's training titles; HR@10 and NDCG@10, ties broken at random in
expectation. Baselines (popularity, recency-weighted popularity) are computed in the same run, and
the shipped Ranker itself is evaluated end to end (events replayed into ProfileState). The shipped
factors are then refitted on all interactions with the chosen hyper-parameters.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.errors import ValidationError
from appliance.ranking.bundle import (
    CONTENT_FEATURES,
    FORMAT,
    MANIFEST,
    RankerBundle,
    content_features,
    sha256_file,
)
from appliance.ranking.catalog import Catalog, parse_catalog_csv, write_catalog_csv

DEFAULT_VERSION = "ml-small-svd-1"
POP_HALF_LIFE_DAYS = 180.0
RIDGE_LAMBDA = 3.0
RIDGE_MIN_COUNT = 5
GRID_DIMS = (32, 48, 64)
GRID_ALPHAS = (0.0, 0.25)
GRID_HALF_LIVES = (5.0, 10.0, 20.0, 0.0)   # 0 = no recency weighting
GRID_POPULARITY = (0.0, 0.05, 0.1, 0.2)
CONTENT_WEIGHT = 0.5  # kept for explanations; the manifest records the content=0 ablation

ATTRIBUTION = """# Attribution: MovieLens data

The catalog (`catalog.csv`) and the model arrays in this bundle are derived from the MovieLens
"ml-latest-small" data set, published by GroupLens Research at the University of Minnesota
(<http://grouplens.org/datasets/>). They are redistributed as a transformation of that data set under
the same licence conditions, which are, in short (see the data set's README.txt for the full text):

- The data set may be used for research purposes.
- The user may not state or imply any endorsement from the University of Minnesota or the GroupLens
  Research Group.
- Publications resulting from the use of the data set must acknowledge it by citing:
  F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context.
  ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4: 19:1-19:19.
  <https://doi.org/10.1145/2827872>
- Redistribution, including transformations, is allowed only under these same licence conditions.
- No use for commercial or revenue-bearing purposes without first obtaining permission from a faculty
  member of the GroupLens Research Project at the University of Minnesota.
- The data and scripts are provided "as is", without warranty of any kind.

This bundle is a development/reference model. A fleet product must be trained on the service's own
catalog and interactions (or obtain GroupLens' permission) before it ships commercially.
Maturity levels in `catalog.csv` are NOT from MovieLens: they are derived from genres by the
conservative rule in `appliance/ranking/catalog.py` (`derive_maturity`).
"""


@dataclass
class Interactions:
    """Interactions sorted by (user, time, item); `item` is the catalog row."""
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    n_users: int
    n_items: int

    def subset(self, mask: np.ndarray) -> Interactions:
        return Interactions(self.user[mask], self.item[mask], self.ts[mask], self.n_users, self.n_items)

    def last_mask(self) -> np.ndarray:
        """True at each user's last interaction."""
        return np.r_[self.user[1:] != self.user[:-1], True]


def load_interactions(path: Path, catalog: Catalog) -> Interactions:
    users, items, ts = [], [], []
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        try:
            iu, im, it = header.index("userId"), header.index("movieId"), header.index("timestamp")
        except ValueError:
            raise ValidationError(f"{path}: line 1: need columns userId, movieId, timestamp") from None
        for rec in reader:
            try:
                users.append(int(rec[iu]))
                items.append(int(rec[im]))
                ts.append(int(float(rec[it])))
            except (ValueError, IndexError):
                raise ValidationError(f"{path}: line {reader.line_num}: bad userId/movieId/timestamp") from None
    u = np.asarray(users, dtype=np.int64)
    rows, known = catalog.index_of(np.asarray(items, dtype=np.int64))
    if not known.all():
        raise ValidationError(f"{path}: {int((~known).sum())} ratings name movies absent from the catalog")
    uid, uidx = np.unique(u, return_inverse=True)
    t = np.asarray(ts, dtype=np.int64)
    order = np.lexsort((rows, t, uidx))
    return Interactions(uidx[order], rows[order], t[order], len(uid), len(catalog))


def recency_positions(inter: Interactions) -> np.ndarray:
    """Position from each user's end: 0 for the newest interaction."""
    n = len(inter.user)
    idx = np.arange(n)
    ends = np.r_[np.flatnonzero(inter.user[1:] != inter.user[:-1]), n - 1]
    return ends[np.searchsorted(ends, idx)] - idx


def user_item_matrix(inter: Interactions, values: np.ndarray | None = None) -> np.ndarray:
    X = np.zeros((inter.n_users, inter.n_items), dtype=np.float32)
    X[inter.user, inter.item] = 1.0 if values is None else values
    return X


def svd_basis(X: np.ndarray, alpha: float, max_dim: int) -> np.ndarray:
    """Right singular vectors (items x max_dim) of X with columns scaled by degree^-alpha."""
    deg = X.sum(axis=0)
    scale = np.where(deg > 0, deg, 1.0) ** (-alpha)
    _, _, vt = np.linalg.svd(X * scale, full_matrices=False)
    return np.ascontiguousarray(vt[:max_dim].T.astype(np.float32))


def recency_weights(inter: Interactions, half_life: float) -> np.ndarray:
    if half_life <= 0:
        return np.ones(len(inter.user), dtype=np.float32)
    return (0.5 ** (recency_positions(inter) / half_life)).astype(np.float32)


def popularity(inter: Interactions, half_life_days: float = POP_HALF_LIFE_DAYS) -> np.ndarray:
    count = np.bincount(inter.item, minlength=inter.n_items).astype(np.float64)
    t_ref = inter.ts.max() if len(inter.ts) else 0
    w = 0.5 ** ((t_ref - inter.ts) / (half_life_days * 86400.0))
    recent = np.bincount(inter.item, weights=w, minlength=inter.n_items)
    return np.stack([np.log1p(count), np.log1p(recent)], axis=1).astype(np.float32)


def fit_ridge(C: np.ndarray, F: np.ndarray, mask: np.ndarray, lam: float = RIDGE_LAMBDA) -> np.ndarray:
    A = C[mask].astype(np.float64)
    reg = lam * np.eye(A.shape[1])
    reg[-1, -1] = 0.0  # do not shrink the bias
    return np.linalg.solve(A.T @ A + reg, A.T @ F[mask].astype(np.float64)).astype(np.float32)


@dataclass
class Fitted:
    factors: np.ndarray        # items x d, cold rows filled from content
    popularity: np.ndarray     # items x 2
    content_weights: np.ndarray
    counts: np.ndarray
    scale: float
    content_cosine: float      # held-out warm titles: cosine(predicted, fitted) embedding


def fit(inter: Interactions, catalog: Catalog, dim: int, alpha: float, basis: np.ndarray | None = None,
        seed: int = 0) -> Fitted:
    X = user_item_matrix(inter)
    V = (basis if basis is not None else svd_basis(X, alpha, dim))[:, :dim].copy()
    counts = np.bincount(inter.item, minlength=inter.n_items)
    norms = np.linalg.norm(V, axis=1)
    scale = float(np.percentile(norms[counts > 0], 99)) if (counts > 0).any() else 1.0
    V /= max(scale, 1e-9)
    C = content_features(catalog.genres, catalog.year)
    warm = counts >= RIDGE_MIN_COUNT
    rng = np.random.default_rng(seed)
    held = warm & (rng.random(len(warm)) < 0.2)
    W_check = fit_ridge(C, V, warm & ~held)
    P, T = C[held] @ W_check, V[held]
    cos = float(np.mean(np.sum(P * T, 1) / np.maximum(np.linalg.norm(P, axis=1) * np.linalg.norm(T, axis=1), 1e-9)))
    W = fit_ridge(C, V, warm)
    cold = counts == 0
    V[cold] = C[cold] @ W
    return Fitted(V.astype(np.float32), popularity(inter), W, counts, scale, cos)


# ---- evaluation --------------------------------------------------------------------------------

def hit_ndcg(S: np.ndarray, seen: np.ndarray, target: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Expected HR@k / NDCG@k with ties broken at random; `seen` items are excluded from ranking."""
    S = np.where(seen, -np.inf, S)
    t = S[np.arange(len(target)), target]
    greater = (S > t[:, None]).sum(axis=1)
    ties = (S == t[:, None]).sum(axis=1) - 1
    hr = nd = 0.0
    disc = 1.0 / np.log2(np.arange(k) + 2.0)
    for g, e in zip(greater.tolist(), ties.tolist()):
        if g >= k:
            continue
        span = e + 1
        inside = min(span, k - g)
        hr += inside / span
        nd += disc[g:g + inside].sum() / span
    n = len(target)
    return hr / n, nd / n


def _metrics(hr: float, nd: float, n: int) -> dict[str, float]:
    """Rounded metrics plus the standard error of HR (610 users: differences < ~2 SE are noise)."""
    return {"hr@10": round(float(hr), 4), "ndcg@10": round(float(nd), 4),
            "hr_se": round(float(np.sqrt(max(hr * (1 - hr), 0.0) / max(n, 1))), 4)}


def eval_scores(train: Interactions, test: Interactions, scorer: Callable[[np.ndarray], np.ndarray]
                ) -> dict[str, float]:
    X = user_item_matrix(train)
    target = np.full(train.n_users, -1, dtype=np.int64)
    target[test.user] = test.item
    users = np.flatnonzero(target >= 0)
    S = scorer(X)[users]
    return _metrics(*hit_ndcg(S, X[users] > 0, target[users]), len(users))


def cf_scorer(train: Interactions, V: np.ndarray, half_life: float) -> Callable[[np.ndarray], np.ndarray]:
    W = user_item_matrix(train, recency_weights(train, half_life))
    return lambda X: (W @ V) @ V.T


def eval_ranker(train: Interactions, test: Interactions, catalog: Catalog, fitted: Fitted,
                weights: dict[str, float], diversity: float) -> dict[str, float]:
    """The shipped Ranker end to end: replay each user's training interactions as COMPLETE events."""
    from appliance.fusion.state import COMPLETE, ProfileState, SessionState
    from appliance.ranking.ranker import RankContext, Ranker

    bundle = RankerBundle(path=Path("."), manifest={}, version="eval", item_ids=catalog.ids,
                          item_factors=fitted.factors, popularity=fitted.popularity,
                          content_weights=fitted.content_weights, catalog_rows=catalog.rows,
                          params={"weights": weights})
    ranker = Ranker(bundle, catalog, affect_weight=0.0, diversity=diversity, affect_stale_s=1.0)
    ctx = RankContext(device=1, local_hour=20, weekday=1, max_maturity=5)
    starts = np.r_[0, np.flatnonzero(train.user[1:] != train.user[:-1]) + 1, len(train.user)]
    target = dict(zip(test.user.tolist(), test.item.tolist()))
    hr = nd = 0.0
    n = 0
    for a, b in itertools.pairwise(starts):
        u = int(train.user[a])
        if u not in target:
            continue
        ids = catalog.ids[train.item[a:b]]
        prof = ProfileState.replay(str(u), catalog, ((COMPLETE, int(i), int(t) * 1000, 0.0)
                                                     for i, t in zip(ids, train.ts[a:b])))
        res = ranker.rank(prof, SessionState(str(u), "eval", catalog), None, False, ctx, None, 10, 0)
        got = [it.item_id for it in res.items]
        want = int(catalog.ids[target[u]])
        if want in got:
            p = got.index(want)
            hr += 1.0
            nd += 1.0 / np.log2(p + 2.0)
        n += 1
    return _metrics(hr / n, nd / n, n)


# ---- the job -----------------------------------------------------------------------------------

def tune(train: Interactions, valid: Interactions, catalog: Catalog, log) -> tuple[dict, list[dict]]:
    X = user_item_matrix(train)
    results = []
    for alpha in GRID_ALPHAS:
        basis = svd_basis(X, alpha, max(GRID_DIMS))
        for dim in GRID_DIMS:
            V = basis[:, :dim]
            for h in GRID_HALF_LIVES:
                m = eval_scores(train, valid, cf_scorer(train, V, h))
                results.append({"alpha": alpha, "dim": dim, "half_life": h, **m})
                log(f"  valid cf alpha={alpha} dim={dim} half_life={h}: {m}")
    best = max(results, key=lambda r: (r["ndcg@10"], r["hr@10"]))
    return best, results


def tune_ranker(train: Interactions, valid: Interactions, catalog: Catalog, cfg: dict, diversity: float,
                log) -> tuple[dict[str, float], list[dict]]:
    fitted = fit(train, catalog, cfg["dim"], cfg["alpha"])
    results = []
    grid = [(wp, CONTENT_WEIGHT) for wp in GRID_POPULARITY] + [(None, 0.0)]
    for wp, wc in grid:
        if wp is None:  # ablation: the best popularity weight without the content signal
            wp = max(results, key=lambda r: (r["ndcg@10"], r["hr@10"]))["popularity"]
        weights = {"popularity": wp, "content": wc, "recency_half_life": cfg["half_life"] or 1e9}
        m = eval_ranker(train, valid, catalog, fitted, weights, diversity)
        results.append({**weights, **m})
        log(f"  valid ranker popularity={wp} content={wc}: {m}")
    best = max((r for r in results if r["content"] == CONTENT_WEIGHT), key=lambda r: (r["ndcg@10"], r["hr@10"]))
    return {k: v for k, v in best.items() if k in ("popularity", "content", "recency_half_life")}, results


def write_bundle(out: Path, catalog: Catalog, fitted: Fitted, manifest: dict,
                 extra_files: list[str] | None = None) -> dict[str, dict]:
    """Write the arrays, then the manifest with the sha256 of every file (`extra_files` already written
    into `out` by the caller, e.g. the sequence model, are listed too)."""
    out.mkdir(parents=True, exist_ok=True)
    write_catalog_csv(catalog.rows, out / "catalog.csv")
    np.save(out / "item_ids.npy", catalog.ids.astype(np.int64))
    np.save(out / "item_factors.npy", fitted.factors.astype(np.float16))
    np.save(out / "popularity.npy", fitted.popularity.astype(np.float32))
    np.save(out / "content_weights.npy", fitted.content_weights.astype(np.float32))
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
    names = ["catalog.csv", "item_ids.npy", "item_factors.npy", "popularity.npy", "content_weights.npy",
             "ATTRIBUTION.md", *(extra_files or [])]
    files = {n: {"sha256": sha256_file(out / n), "bytes": (out / n).stat().st_size} for n in names}
    manifest = {**manifest, "files": files}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / MANIFEST)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.ranking.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratings", required=True, type=Path)
    ap.add_argument("--movies", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--version", default=DEFAULT_VERSION)
    ap.add_argument("--diversity", type=float, default=0.2, help="MMR setting the ranker is evaluated with")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tune", action="store_true", help="skip the validation grids (use dim 64, "
                    "alpha 0, half-life 10, default ranker weights)")
    args = ap.parse_args(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    catalog = Catalog.from_rows(parse_catalog_csv(args.movies))
    inter = load_interactions(args.ratings, catalog)
    log(f"{len(inter.user)} interactions, {inter.n_users} users, {len(catalog)} titles")
    test_m = inter.last_mask()
    train = inter.subset(~test_m)
    test = inter.subset(test_m)
    valid_m = train.last_mask()
    train_v, valid = train.subset(~valid_m), train.subset(valid_m)

    if args.no_tune:
        cfg = {"alpha": 0.0, "dim": 64, "half_life": 10.0}
        grid, rgrid = [], []
        weights = {"popularity": 0.0, "content": CONTENT_WEIGHT, "recency_half_life": 10.0}
    else:
        log("tuning the embedding on the validation split")
        cfg, grid = tune(train_v, valid, catalog, log)
        log(f"chosen: {cfg}")
        log("tuning the ranker's popularity/content weights on the validation split")
        weights, rgrid = tune_ranker(train_v, valid, catalog, cfg, args.diversity, log)
        log(f"chosen: {weights}")
    dim, alpha, h = int(cfg["dim"]), float(cfg["alpha"]), float(cfg["half_life"])

    log("test split: fitting without each user's last interaction")
    fitted = fit(train, catalog, dim, alpha, seed=args.seed)
    pop_t = fitted.popularity
    test_metrics = {
        "popularity": eval_scores(train, test, lambda X: np.tile(pop_t[:, 0], (X.shape[0], 1))),
        "popularity_recent": eval_scores(train, test, lambda X: np.tile(pop_t[:, 1], (X.shape[0], 1))),
        "svd_cf": eval_scores(train, test, cf_scorer(train, fitted.factors, h)),
        f"ranker_diversity_{args.diversity:g}": eval_ranker(train, test, catalog, fitted, weights, args.diversity),
        "ranker_diversity_0": eval_ranker(train, test, catalog, fitted, weights, 0.0),
    }
    for k, v in test_metrics.items():
        log(f"  test {k}: {v}")

    log("refitting on all interactions for the shipped bundle")
    final = fit(inter, catalog, dim, alpha, seed=args.seed)
    manifest = {
        "format": FORMAT,
        "kind": "ranker",
        "version": args.version,
        "created_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "model": {
            "type": "puresvd-implicit", "dim": dim, "alpha": alpha, "factor_scale_p99": final.scale,
            "factors_dtype": "float16", "popularity_columns": ["log1p_count", "log1p_recent"],
            "popularity_half_life_days": POP_HALF_LIFE_DAYS, "content_features": CONTENT_FEATURES,
            "ridge_lambda": RIDGE_LAMBDA, "ridge_min_count": RIDGE_MIN_COUNT,
            "content_holdout_cosine": round(final.content_cosine, 4),
            "cold_items": int((final.counts == 0).sum()),
        },
        "ranker": {"weights": weights},
        "training": {
            "command": "python -m appliance.ranking.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "interactions": len(inter.user), "users": inter.n_users, "titles": len(catalog),
            "seed": args.seed, "numpy": np.__version__, "seconds": round(time.time() - t0, 1),
        },
        "sources": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in (args.ratings, args.movies)},
        "evaluation": {
            "protocol": "per-user time-ordered leave-last-out (ties by movieId); full ranking over the "
                        "catalog minus the user's training titles; expected HR@10/NDCG@10 under random "
                        "tie-breaking; hyper-parameters chosen on the second-to-last interaction; the "
                        "ranker is evaluated end to end (COMPLETE events replayed, TV, 20:00, no affect)",
            "users": len(test.user),
            "chosen": {"embedding": cfg, "ranker_weights": weights},
            "validation_grid": grid,
            "validation_ranker_grid": rgrid,
            "test": test_metrics,
        },
    }
    files = write_bundle(args.out, catalog, final, manifest)
    total = sum(f["bytes"] for f in files.values()) + (args.out / MANIFEST).stat().st_size
    log(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    print(json.dumps({"version": args.version, "bytes": total, "test": test_metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
