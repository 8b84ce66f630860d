"""`appliance eval ranking`: our shipped ranker against five baselines, same split, same run.

Protocol (issue 6, literally; see appliance/evaluation/recsys/data.py and metrics.py):
every rating is an implicit interaction; per user a stable sort by timestamp; users with < 3
interactions are dropped; last = test, second to last = validation, the rest = train. Every model is
tuned on the validation item with a model fitted on train only, then refitted on train + validation and
scored on the test item. Full ranking over every item that occurs in the interactions file, minus the
user's fitted history; HR@K and NDCG@K (1/log2(rank + 1), rank from 1) for K = 10, 20, averaged over
users (ties broken at random in expectation).

"ours" is the product's scoring path end to end: the training job (appliance/ranking/train_seq.py)
writes a real bundle from the fitted histories, `RankerBundle.load` verifies it, and the box's `Ranker`
ranks for each user after the history was replayed into a `ProfileState` as COMPLETE events, exactly as
the ranker process would hold it (no session events, no time of day, no affect). Its signal weights and
the sequence model's epoch count are chosen on validation. MMR diversity is the product default (config
`ranking.diversity`); the same run reports ours without MMR and what MMR buys in intra-list similarity.

Also reported: catalog coverage@10 (share of items in at least one top-10), and two cold-start slices
(users with <= 5 train interactions; test items with <= 5 train interactions; "train" is the train part
of the split, as the protocol names it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import ValidationError
from appliance.evaluation.recsys import baselines as B
from appliance.evaluation.recsys.data import MIN_INTERACTIONS, Split, leave_last_out, read_interactions
from appliance.evaluation.recsys.metrics import (
    KS,
    PerUser,
    coverage,
    evaluate_lists,
    evaluate_scores,
    intra_list_similarity,
)

COLD_MAX = 5
# The ranker's signal-weight grid searched on validation (the sequence weight is the unit).
OURS_GRID: dict[str, tuple[float, ...]] = {
    "next": (0.0, 0.2, 0.5, 1.0),
    "collaborative": (0.0, 0.25, 0.5, 1.0),
    "content": (0.0, 0.5),
    "popularity": (0.0, 0.1),
}


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def tune_baseline(cls: type[B.Baseline], split: Split, log: Callable[[str], None]) -> dict[str, Any]:
    users = np.arange(split.n_users)
    hv, tv, yv = split.histories("valid"), split.history_ts("valid"), split.targets("valid")
    grid = []
    for params in cls.GRID:
        t0 = time.time()
        S = cls(**params).fit(hv, tv, split.n_items).scores(users)
        s = evaluate_scores(S, hv, yv).summary()
        grid.append({"params": params, **s})
        log(f"  valid {cls.name} {params}: NDCG@10 {s['NDCG@10']:.4f} HR@10 {s['HR@10']:.4f} ({time.time() - t0:.1f}s)")
    best = max(grid, key=lambda r: (r["NDCG@10"], r["HR@10"]))
    ht, tt, yt = split.histories("test"), split.history_ts("test"), split.targets("test")
    S = cls(**best["params"]).fit(ht, tt, split.n_items).scores(users)
    per = evaluate_scores(S, ht, yt)
    return {"per_user": per, "params": best["params"], "validation": grid}


# ---- ours --------------------------------------------------------------------------------------------

def _stage_histories(split: Split, item_rows: np.ndarray, stage: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [item_rows[h] for h in split.histories(stage)], split.history_ts(stage)


# Sequence parameters whose value here trains exactly as before they existed: left out of the cache key.
_NEUTRAL_PARAMS = {"lr_decay": 1.0, "patience": 0}


def _cache_key(split: Split, stage: str, params: dict) -> str:
    params = {k: v for k, v in params.items() if not (k in _NEUTRAL_PARAMS and v == _NEUTRAL_PARAMS[k])}
    h = hashlib.sha256()
    for s in split.histories(stage):
        h.update(s.astype(np.int64).tobytes())
        h.update(b"|")
    h.update(split.item_ids.astype(np.int64).tobytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _fit_bundle(split: Split, catalog, item_rows: np.ndarray, stage: str, p, out: Path,
                log: Callable[[str], None], model=None, curve=None) -> Path:
    from appliance.ranking import train_seq

    hist, ts = _stage_histories(split, item_rows, stage)
    train_seq.build_bundle(out, catalog, hist, ts, p, version=f"eval-{stage}",
                           ranker_weights=dict(train_seq.SEQ_RANKER_WEIGHTS), extra={}, log=log,
                           model=model, curve=curve)
    return out


def replay_states(catalog, split: Split, item_rows: np.ndarray, stage: str) -> list:
    """Each user's fitted history replayed into the box's state objects as COMPLETE events, in order
    (what the ranker process would hold after those events). Ranking only reads them, so the grid reuses them."""
    from appliance.fusion.state import COMPLETE, ProfileState, SessionState

    cand_ids = catalog.ids[item_rows]
    out = []
    for u, (h, t) in enumerate(zip(split.histories(stage), split.history_ts(stage))):
        ids = cand_ids[h]
        prof = ProfileState.replay(str(u), catalog, ((COMPLETE, int(i), int(ts) * 1000, 0.0)
                                                     for i, ts in zip(ids.tolist(), t.tolist())))
        out.append((prof, SessionState(str(u), "eval", catalog)))
    return out


def rank_users(ranker, catalog, states: list, item_rows: np.ndarray, k: int) -> list[list[int]]:
    """The box's path: Ranker.rank over every item of the file for each user's replayed state."""
    from appliance.ranking.ranker import RankContext

    ctx = RankContext(device=1, local_hour=-1, weekday=-1, max_maturity=5)
    cand_ids = catalog.ids[item_rows]
    id_to_item = dict(zip(cand_ids.tolist(), range(len(cand_ids))))
    lists = []
    for prof, sess in states:
        res = ranker.rank(prof, sess, None, False, ctx, cand_ids, k, 0)
        lists.append([id_to_item[it.item_id] for it in res.items])
    return lists


def _cached_dir(cache: Path | None, split: Split, stage: str, params) -> Path | None:
    return cache / f"bundle-{stage}-{_cache_key(split, stage, asdict(params))}" if cache else None


def validation_bundle(split: Split, catalog, item_rows: np.ndarray, p, log: Callable[[str], None],
                      dv: Path) -> Path:
    """The validation stage's bundle at `dv` (trained unless already there): the sequence model trained
    on the train part for at most p.epochs, NDCG@10 on the validation item every p.eval_every epochs, the
    best epoch's snapshot kept (its epoch count is then used to refit on train + validation)."""
    if not (dv / "manifest.json").exists():
        log("  ours: training the sequence model on train, choosing epochs on validation")
        from appliance.ranking import train_seq

        hist, _ = _stage_histories(split, item_rows, "valid")
        targets = item_rows[split.targets("valid")]
        model, curve = train_seq.train_sasrec(hist, len(catalog), p, (hist, targets), log)
        tmp = Path(str(dv) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _fit_bundle(split, catalog, item_rows, "valid", p, tmp, log, model=model, curve=curve)
        tmp.replace(dv)
    return dv


def eval_ours(split: Split, catalog, item_rows: np.ndarray, diversity: float, log: Callable[[str], None],
              work: Path, cache: Path | None, next_n: int = 10, seq_params: dict | None = None) -> dict[str, Any]:
    from appliance.ranking.bundle import RankerBundle
    from appliance.ranking.ranker import Ranker, SignalWeights
    from appliance.ranking.train_seq import SeqParams

    p = replace(SeqParams(), **(seq_params or {}))
    t0 = time.time()

    def cached(stage: str, params) -> Path | None:
        return _cached_dir(cache, split, stage, params)

    # Validation stage: train on train with NDCG@10 on validation every few epochs; the best epoch's
    # model is the validation bundle's, and its epoch count is used to refit on train + validation.
    dv = validation_bundle(split, catalog, item_rows, p, log, cached("valid", p) or work / "valid")
    bv = RankerBundle.load(dv)
    curve = bv.manifest["sequence"].get("curve") or []
    epochs = int(bv.manifest["sequence"].get("best_epoch") or p.epochs)
    p = replace(p, epochs=epochs)
    log(f"  ours: {epochs} epochs ({time.time() - t0:.0f}s)")

    def bundle_for(stage: str) -> RankerBundle:
        d = cached(stage, p) or work / stage
        if not (d / "manifest.json").exists():
            tmp = Path(str(d) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _fit_bundle(split, catalog, item_rows, stage, p, tmp, log)
            tmp.replace(d)
        return RankerBundle.load(d)

    base = SignalWeights()
    yv = split.targets("valid")
    states_v = replay_states(catalog, split, item_rows, "valid")
    grid = []
    names = list(OURS_GRID)
    for combo in itertools.product(*(OURS_GRID[n] for n in names)):
        w = dict(zip(names, combo))
        weights = replace(base, **w, **_fixed_weights(), next_n=float(next_n))
        ranker = Ranker(bv, catalog, affect_weight=0.0, diversity=0.0, affect_stale_s=1.0, weights=weights)
        s = evaluate_lists(rank_users(ranker, catalog, states_v, item_rows, max(KS)), yv).summary()
        grid.append({"weights": w, **s})
        log(f"  valid ours {w}: NDCG@10 {s['NDCG@10']:.4f} HR@10 {s['HR@10']:.4f}")
    best = max(grid, key=lambda r: (r["NDCG@10"], r["HR@10"]))
    chosen = {**_fixed_weights(), **best["weights"], "next_n": float(next_n)}
    weights = replace(base, **chosen)
    bt = bundle_for("test")
    yt = split.targets("test")
    states_t = replay_states(catalog, split, item_rows, "test")
    out: dict[str, Any] = {"weights": chosen, "epochs": epochs, "validation": grid, "epoch_curve": curve,
                           "sequence_params": asdict(p), "bundle_test_version": bt.version}
    for div in sorted({0.0, diversity}):
        ranker = Ranker(bt, catalog, affect_weight=0.0, diversity=div, affect_stale_s=1.0, weights=weights)
        t1 = time.time()
        lists = rank_users(ranker, catalog, states_t, item_rows, max(KS))
        per = evaluate_lists(lists, yt)
        vecs = _similarity_vectors(ranker, item_rows)
        out[f"diversity_{div:g}"] = {"per_user": per, "ils@10": intra_list_similarity(per.top10, vecs),
                                     "rank_ms_mean": round((time.time() - t1) * 1e3 / split.n_users, 3)}
    out["diversity"] = diversity
    return out


def _fixed_weights() -> dict[str, float]:
    from appliance.ranking.train_seq import SEQ_RANKER_WEIGHTS

    return {k: v for k, v in SEQ_RANKER_WEIGHTS.items() if k not in OURS_GRID and k != "next_n"}


def _similarity_vectors(ranker, item_rows: np.ndarray) -> np.ndarray:
    """Per item (split index) a vector whose dot products are the ranker's MMR similarity
    (mean of the embedding cosine and the genre cosine): [Fn, Gl] / sqrt(2)."""
    V = np.hstack([ranker.Fn[item_rows], ranker.Gl[item_rows]]) / np.sqrt(2.0)
    return V.astype(np.float64)


# ---- the command -------------------------------------------------------------------------------------

def _table(rows: list[tuple[str, dict[str, float], str]]) -> str:
    cols = [f"{m}@{k}" for k in KS for m in ("HR", "NDCG")]
    head = f"{'model':<14}" + "".join(f"{c:>10}" for c in cols) + "  chosen on validation"
    lines = [head, "-" * len(head)]
    for name, s, note in rows:
        lines.append(f"{name:<14}" + "".join(f"{s[c]:>10.4f}" for c in cols) + f"  {note}")
    return "\n".join(lines)


def run(interactions: Path, catalog: Path, json_out: Path | None, *, log: Callable[[str], None] | None = None,
        diversity: float | None = None, baselines: tuple[str, ...] | None = None,
        cache_dir: Path | None = None, with_ours: bool = True, seq_params: dict | None = None) -> dict[str, Any]:
    """Evaluate; print a table; write JSON to `json_out` when given. Returns the JSON object.
    (`with_ours=False` and `baselines` restrict the run, for tests; the CLI always runs everything.)"""
    from appliance.ranking.catalog import Catalog, parse_catalog_csv

    log = log or _log_default
    t0 = time.time()
    if diversity is None:
        from appliance.config.schema import RankingConfig

        diversity = float(RankingConfig().diversity)
    if cache_dir is None and os.environ.get("APPLIANCE_EVAL_CACHE"):
        cache_dir = Path(os.environ["APPLIANCE_EVAL_CACHE"])
    raw = read_interactions(interactions)
    split = leave_last_out(raw)
    if split.n_users == 0:
        raise ValidationError(f"{interactions}: no user has >= {MIN_INTERACTIONS} interactions")
    cat = Catalog.from_rows(parse_catalog_csv(catalog))
    item_rows, known = cat.index_of(split.item_ids)
    if not known.all():
        raise ValidationError(f"{interactions}: {int((~known).sum())} movieIds are absent from {catalog}, "
                              f"e.g. {split.item_ids[~known][:5].tolist()}")
    log(f"{len(raw.user)} interactions, {split.n_users} users (dropped {split.n_dropped_users} with < "
        f"{MIN_INTERACTIONS}), {split.n_items} items")

    per: dict[str, PerUser] = {}
    result: dict[str, Any] = {"baselines": {}}
    chosen: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    for cls in B.ALL:
        if baselines is not None and cls.name not in baselines:
            continue
        t1 = time.time()
        r = tune_baseline(cls, split, log)
        per[cls.name] = r["per_user"]
        chosen[cls.name] = r["params"]
        validation[cls.name] = r["validation"]
        result["baselines"][cls.name] = {**r["per_user"].summary(), "params": r["params"],
                                         "seconds": round(time.time() - t1, 1)}
        log(f"test {cls.name} {r['params']}: {r['per_user'].summary()}")

    ours: dict[str, Any] | None = None
    if with_ours:
        with tempfile.TemporaryDirectory(prefix="eval-ranking-") as tmp:
            ours = eval_ours(split, cat, item_rows, diversity, log, Path(tmp), cache_dir,
                             next_n=int(chosen.get("transition", {}).get("n", 10)), seq_params=seq_params)
        main_key = f"diversity_{diversity:g}"
        per["ours"] = ours[main_key]["per_user"]
        plain = ours["diversity_0"]
        result["ours"] = per["ours"].summary()
        result["ours_no_mmr"] = plain["per_user"].summary()
        result["ours_params"] = {"weights": ours["weights"], "sequence_epochs": ours["epochs"],
                                 "sequence_params": ours["sequence_params"], "diversity": diversity}
        validation["ours"] = ours["validation"]
        validation["ours_epoch_curve"] = ours["epoch_curve"]

        nd0 = result["ours_no_mmr"]["NDCG@10"]
        nd1 = result["ours"]["NDCG@10"]
        result["mmr"] = {
            "diversity": diversity,
            "ndcg@10_without": nd0, "ndcg@10_with": nd1,
            "ndcg@10_cost_pct": round(100.0 * (nd0 - nd1) / nd0, 2) if nd0 > 0 else 0.0,
            "intra_list_similarity@10_without": plain["ils@10"],
            "intra_list_similarity@10_with": ours[main_key]["ils@10"],
            "rank_ms_mean_without": plain["rank_ms_mean"], "rank_ms_mean_with": ours[main_key]["rank_ms_mean"],
        }
    best = max(result["baselines"], key=lambda n: result["baselines"][n]["NDCG@10"]) if result["baselines"] else None
    result["best_baseline"] = best
    if best:
        b = result["baselines"][best]["NDCG@10"]
        if ours is not None:
            nd1 = result["ours"]["NDCG@10"]
            result["ratio_to_best"] = round(nd1 / b, 4) if b > 0 else None
            result["meets_1_10x"] = bool(b > 0 and nd1 >= 1.10 * b)

    result["coverage@10"] = {n: coverage(pu.top10, split.n_items) for n, pu in per.items()}
    train_len = np.array([len(h) for h in split.histories("valid")])
    counts = np.bincount(np.concatenate(split.histories("valid")), minlength=split.n_items)
    cold_u = train_len <= COLD_MAX
    cold_i = counts[split.targets("test")] <= COLD_MAX
    result["cold_start"] = {
        "definition": f"train = the split's train part; users with <= {COLD_MAX} train interactions; test "
                      f"items with <= {COLD_MAX} train interactions",
        "users_le5_train": {"n_users": int(cold_u.sum()),
                            **({n: pu.summary(cold_u) for n, pu in per.items()} if cold_u.any() else {})},
        "items_le5_train": {"n_users": int(cold_i.sum()),
                            **({n: pu.summary(cold_i) for n, pu in per.items()} if cold_i.any() else {})},
    }
    result["n_users"] = split.n_users
    result["n_items"] = split.n_items
    result["n_interactions"] = int(len(raw.user))
    result["protocol"] = {
        "interactions": "every row is an implicit interaction (rating ignored)",
        "order": "per user, stable sort by timestamp (ties keep file order)",
        "min_interactions": MIN_INTERACTIONS, "dropped_users": split.n_dropped_users,
        "split": "last = test, second to last = validation, the rest = train",
        "tuning": "grids on validation with models fitted on train; refit on train+validation; score test",
        "ranking": "full ranking over every item in the interactions file, minus the user's fitted history",
        "metrics": "HR@K, NDCG@K = 1/log2(rank+1), rank from 1, K = 10, 20, mean over users; ties broken "
                   "at random in expectation",
        "ours": "RankerBundle written by appliance.ranking.train_seq from the fitted histories, loaded and "
                "verified, ranked by appliance.ranking.Ranker after replaying the history as COMPLETE events",
        "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (Path(interactions), Path(catalog))},
    }
    result["chosen"] = chosen
    result["validation"] = validation
    result["seconds"] = round(time.time() - t0, 1)

    rows = [("ours", result["ours"], f"{ours['weights']}, {ours['epochs']} epochs, MMR {diversity:g}"),
            ("ours (no MMR)", result["ours_no_mmr"], "")] if ours is not None else []
    rows += [(n, result["baselines"][n], json.dumps(chosen[n])) for n in result["baselines"]]
    print(_table(rows))
    if best and ours is not None:
        print(f"best baseline: {best}; ours / best NDCG@10 = {result['ratio_to_best']} "
              f"({'meets' if result['meets_1_10x'] else 'does NOT meet'} the 1.10x bar)")
    print(f"coverage@10: {result['coverage@10']}")
    if "mmr" in result:
        print(f"MMR: {result['mmr']}")
    for sl in ("users_le5_train", "items_le5_train"):
        c = result["cold_start"][sl]
        print(f"cold slice {sl}: n={c['n_users']}" + "".join(
            f"; {n} NDCG@10 {c[n]['NDCG@10']:.4f}" for n in per if n in c))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_out}")
    return result
