"""Tuning the federated run on validation only: a numpy replay of the run's arithmetic, no test title.

`appliance federation simulate` runs the real Flower ServerApp and ClientApps (SecAgg+, packing,
clipping, central noise): 8-25 minutes for the 610-box fleet on this machine. Comparing settings needs
many runs and several noise draws each, so this module replays the *same arithmetic* without the
transport:

    every round: the round's aligned subset (`model.round_subset`), each box's `model.client_update`
    on the head as the box receives it (float32), `packing.encode` of its clipped update and the
    dequantised vector the server unpacks from the exact integer sum (pack > 1), the sum over the
    planned cohort, N(0, (z C)^2) noise with z from `accounting.calibrate_noise`, and the server's
    step (`flower_app.soft_threshold` + `server_opt.ServerOptimizer`, the same code the ServerApp runs).

SecAgg+ delivers the exact sum of the boxes' packed integers (the wire tests check that), so a replay
differs from a run of the same settings only by the random draws (noise, stochastic rounding).

What it is scored on: `simulate.load_fleet(..., holdout=2)`. The test title of every user is dropped
altogether and the title before it is every box's held-out validation title (the box trains without
it); the score is NDCG@10 on those titles of the users outside the central panel (the panel users'
second-to-last titles were in the panel start's training data). start_only and centralized (pooled
examples, no DP, same head, same step sizes as `simulate`) are scored on the same titles, so a
setting is compared as fed / centralized on validation. Test titles never enter this module.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from appliance.federation import packing
from appliance.federation.model import (
    HeadShape,
    client_update,
    frozen_titles,
    local_train,
    n_federated,
    round_subset,
    subset_size,
)


@dataclass(frozen=True)
class Setting:
    """The run's knobs (the defaults are `simulate`'s)."""

    rounds: int = 20
    epsilon: float = 2.0
    delta: float = 1e-5
    clip: float = 0.25
    compression: float = 12.0
    pack: int = 2
    always_popular: int = 300
    federated_titles: int = 0          # > 0: only the panel's N most watched titles' biases are federated
    always_adapter: bool = False       # the query adapter's coordinates in every round's subset
    rank: int = 4
    max_examples: int = 50             # each box's newest (prefix, next title) examples; the fleet is loaded with it
    local_epochs: int = 2
    batch: int = 64
    lr: float = 5.0
    lr_adapter: float = 0.05
    lr_features: float = 0.5
    server_lr: float = 5.0
    server_shrink: float = 0.0
    server_lr_adapter: float = -1.0
    server_lr_features: float = -1.0
    server_opt: str = "sgd"
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1.0
    average_from: int = 0
    seed: int = 0
    noise_multiplier: float = 0.0      # > 0: this z instead of the one calibrated for epsilon (tests)


@cache
def _noise_and_epsilon(epsilon: float, delta: float, rounds: int, n: int) -> tuple[float, float]:
    from appliance.federation.accounting import calibrate_noise
    from appliance.federation.accounting import epsilon as eps_of

    z = calibrate_noise(epsilon, delta, rounds, "full", n, n)
    return z, eps_of(z, rounds, delta, "full", n, n)


def replay(data, s: Setting, noise_seed: int, log: Callable[[str], None] = lambda m: None,
           bases: list[np.ndarray] | None = None, noise=None) -> tuple[np.ndarray, dict[str, Any]]:
    """The head a run of setting `s` publishes on fleet `data` (all its boxes, every round), with the
    noise and the stochastic rounding drawn from `noise_seed` (`noise`: another source of the Gaussian
    noise, tests); and what the run spent. `data` holds the boxes' examples already (`s.max_examples` is
    the caller's to load the fleet with; `fleets` in `main`)."""
    from appliance.federation.flower_app import part_lrs, soft_threshold
    from appliance.federation.server_opt import ServerOptimizer

    n = len(data.boxes)
    n_feat = data.features.shape[1] if data.features is not None else 0
    shape = HeadShape(data.items.shape[0], data.items.shape[1], s.rank, n_feat)
    feats = data.features.astype(np.float32) if n_feat else None
    items32 = data.items.astype(np.float32)
    if bases is None:
        bases = [q.astype(np.float32) @ items32.T for q, _ in data.boxes]
    z, spent = (s.noise_multiplier, None) if s.noise_multiplier else _noise_and_epsilon(s.epsilon, s.delta, s.rounds, n)
    frozen = frozen_titles(shape, data.popularity, s.federated_titles)
    k = subset_size(n_federated(shape, frozen), s.compression, s.pack)
    spec = packing.plan(s.pack, n, s.clip) if s.pack > 1 else None
    fixed = always_in(shape, data.popularity, s.always_popular, s.always_adapter)
    rng = np.random.default_rng(noise_seed)
    lr = part_lrs(shape, s.server_lr, s.server_lr_adapter, s.server_lr_features)
    opt = ServerOptimizer(shape.n_params, kind=s.server_opt, lr=lr, beta1=s.server_beta1,
                          beta2=s.server_beta2, tau=s.server_tau, average_from=s.average_from)
    theta = shape.initial(seed=s.seed)
    std = z * s.clip / n
    norms: list[float] = []
    shares: list[list[float]] = []
    for r in range(1, s.rounds + 1):
        t0 = time.monotonic()
        sent = theta.astype(np.float32).astype(np.float64)  # the box gets the head as float32
        total = np.zeros(k)
        idx = round_subset(shape.n_params, k, r, s.seed, always=shape.n_feat, fixed=fixed, frozen=frozen)
        part_masks = (idx < shape.n_items, (idx >= shape.n_items) & (idx < shape.n_params - shape.n_feat),
                      idx >= shape.n_params - shape.n_feat)
        for (q, t), base in zip(data.boxes, bases):
            sub, norm = client_update(shape, sent, q.astype(np.float32), t, items32, server_round=r,
                                   run_seed=s.seed, k=k, clip=s.clip, fixed=fixed, frozen=frozen, lr=s.lr,
                                   lr_adapter=s.lr_adapter, lr_features=s.lr_features, epochs=s.local_epochs,
                                   batch=s.batch, seed=r, base=base, features=feats)
            if spec is not None:
                enc = packing.encode(sub, spec, s.clip, rng)
                sub = packing.dequantise(packing.unpack((enc + packing.INT_OFFSET).astype(np.int64), k, spec), spec)
            total += sub
            norms.append(norm)
            sq = sub * sub
            tot = float(sq.sum())
            if tot > 0:
                shares.append([float(sq[m].sum()) / tot for m in part_masks])
        noisy = total / n + (noise or rng).normal(0.0, std, size=k)
        theta = opt.step(theta, idx, soft_threshold(noisy, s.server_shrink * std), r, std)
        log(f"round {r}: {time.monotonic() - t0:.1f}s")
    norms_a = np.asarray(norms)
    info = {"clipped_share": round(float((norms_a > s.clip).mean()), 3) if norms else 0.0,
            "median_update_norm": round(float(np.median(norms_a)), 4) if norms else 0.0,
            "update_norm_share": dict(zip(("bias", "adapter", "features"),
                                          np.round(np.mean(shares, axis=0), 3).tolist())) if shares else {},
            "noise_multiplier": z, "noise_std": std, "subset_k": k, "n_params": shape.n_params,
            "federated_params": n_federated(shape, frozen),
            "epsilon": spent}
    return opt.published(theta), info


def always_in(shape: HeadShape, popularity: np.ndarray, always_popular: int, always_adapter: bool) -> np.ndarray | None:
    """The public coordinates in every round (besides the feature weights): the biases of the panel's
    `always_popular` most watched titles, and the adapter's coordinates when `always_adapter`."""
    parts = []
    if always_popular:
        parts.append(np.argsort(-popularity, kind="stable")[:always_popular])
    if always_adapter:
        parts.append(np.arange(shape.n_items, shape.n_params - shape.n_feat))
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else None


def references(data, s: Setting, central_epochs: int = 2) -> dict[str, np.ndarray]:
    """start_only and centralized heads (as `simulate` makes them) for fleet `data`; the centralized
    fine-tune learns the same parameters as the federated run (`s.federated_titles`)."""
    n_feat = data.features.shape[1] if data.features is not None else 0
    shape = HeadShape(data.items.shape[0], data.items.shape[1], s.rank, n_feat)
    feats = data.features.astype(np.float32) if n_feat else None
    theta0 = shape.initial(seed=s.seed)
    frozen = frozen_titles(shape, data.popularity, s.federated_titles)
    q = np.concatenate([b[0] for b in data.boxes if len(b[1])])
    t = np.concatenate([b[1] for b in data.boxes if len(b[1])])
    central = local_train(shape, theta0, q, t, data.items, lr=s.lr, lr_adapter=s.lr_adapter,
                          lr_features=s.lr_features, epochs=central_epochs, batch=256, seed=s.seed, features=feats,
                          frozen=frozen)
    return {"start_only": theta0, "centralized": central}


def val_metrics(shape: HeadShape, theta: np.ndarray, data, users: np.ndarray) -> dict[str, float]:
    """NDCG@10 (`simulate.metrics10`) and two smoother scores of the same held-out titles: the mean
    reciprocal rank over the full ranking and the mean full-softmax negative log-likelihood (both over
    the titles outside the user's history; a title the bundle does not know is left out of these two).
    One hit more or less moves NDCG@10 of 488 users by up to 0.002, about the whole gap between the
    heads compared here, so the smoother two are reported beside it."""
    from appliance.evaluation.recsys.metrics import exclude_history
    from appliance.federation.model import head_scores
    from appliance.federation.simulate import metrics10

    out = dict(metrics10(shape, theta, data, users))
    rr, nll = [], []
    users = np.asarray(users, dtype=np.int64)
    users = users[data.targets[users] >= 0]
    for a in range(0, len(users), 256):
        u = users[a:a + 256]
        S = head_scores(shape, theta, data.eval_queries[u].astype(np.float64), data.items,
                        data.features if shape.n_feat else None)
        exclude_history(S, [data.histories[i] for i in u], np.arange(len(u)))
        t = data.targets[u]
        ts = S[np.arange(len(u)), t]
        rank = (S > ts[:, None]).sum(axis=1) + 1
        rr.append(np.where(np.isfinite(ts), 1.0 / rank, 0.0))
        mx = S.max(axis=1, keepdims=True)
        lse = np.log(np.exp(S - mx).sum(axis=1)) + mx[:, 0]
        nll.append(np.where(np.isfinite(ts), lse - ts, np.nan))
    out["MRR"] = round(float(np.concatenate(rr).mean()), 5)
    out["NLL"] = round(float(np.nanmean(np.concatenate(nll))), 5)
    return out


def moved(shape: HeadShape, head: np.ndarray, refs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per part of the head (bias, adapter, features): L2 of how far `head` and the centralized head
    moved from the start, and the cosine between the two moves."""
    t0, cen = refs["start_only"], refs["centralized"]
    parts = {"bias": slice(0, shape.n_items), "adapter": slice(shape.n_items, shape.n_params - shape.n_feat),
             "features": slice(shape.n_params - shape.n_feat, shape.n_params)}
    out = {}
    for name, sl in parts.items():
        a, b = head[sl] - t0[sl], cen[sl] - t0[sl]
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        out[name] = {"fed": round(na, 4), "central": round(nb, 4),
                     "cos": round(float(a @ b) / (na * nb), 3) if na > 0 and nb > 0 else 0.0}
    return out


def main(argv: list[str] | None = None) -> None:
    """python -m appliance.federation.tune CONFIGS.json OUT.jsonl [--draws N] [--nodes N]

    CONFIGS.json: a list of {"name": ..., <Setting field>: value, ...}; each is replayed with N noise
    draws (seeds 1..N) and one JSON line per draw is appended to OUT.jsonl (fleet validation NDCG@10)."""
    import argparse

    from appliance.federation.panel import panel_bundle, split_panel
    from appliance.federation.simulate import load_fleet, read_users

    ap = argparse.ArgumentParser(prog="python -m appliance.federation.tune")
    ap.add_argument("configs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--first-draw", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--interactions", type=Path, default=Path("../shared/datasets/movielens-small/ratings.csv"))
    ap.add_argument("--bundle", type=Path, default=Path("models/ranker"))
    ap.add_argument("--start-bundle", type=Path, default=None, help="instead of the panel start (smoke tests)")
    ap.add_argument("--final", action="store_true",
                    help="after the selection only: replay on the run's data (holdout 1) and score the fleet "
                         "users' TEST titles and the panel users' validation titles, as `simulate` does")
    a = ap.parse_args(argv)

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    configs = json.loads(a.configs.read_text())
    start_dir = a.start_bundle or panel_bundle(a.interactions, a.bundle, log=log)[0]
    base_setting = Setting()
    fleets: dict[int, tuple[Any, list[np.ndarray]]] = {}

    def fleet(max_examples: int) -> tuple[Any, list[np.ndarray]]:
        """the fleet with each box's newest `max_examples` examples, and its boxes' base scores (cached);
        the held-out titles and the queries they are scored with do not depend on it"""
        if max_examples not in fleets:
            d = load_fleet(a.interactions, start_dir, a.nodes, max_examples, log, holdout=1 if a.final else 2)
            items32 = d.items.astype(np.float32)
            fleets[max_examples] = d, [q.astype(np.float32) @ items32.T for q, _ in d.boxes]
        return fleets[max_examples]

    data = fleet(base_setting.max_examples)[0]
    n = len(data.boxes)
    split = split_panel(len(read_users(a.interactions)), 0.2, 0)
    val_users = split.fleet[split.fleet < n]
    n_feat = data.features.shape[1]
    if a.final:
        _final(a, configs, fleet, split.fleet[split.fleet < n], split.panel[split.panel < n], log)
        return
    refs = references(data, base_setting)
    ref_full = {name: val_metrics(HeadShape(data.items.shape[0], data.items.shape[1], 4, n_feat), th, data, val_users)
                for name, th in refs.items()}
    ref_scores = {name: m["NDCG@10"] for name, m in ref_full.items()}
    log(f"references: {ref_full}")
    log(f"fleet validation ({len(val_users)} users' second-to-last titles): {ref_scores}")
    shape0 = HeadShape(data.items.shape[0], data.items.shape[1], base_setting.rank, n_feat)
    variant_refs: dict[tuple[int, int], dict[str, float]] = {(0, base_setting.max_examples): ref_full["centralized"]}

    def central_of(s: Setting) -> dict[str, float]:
        """centralized fine-tune of the same parameterisation as `s` (federated_titles) on the same examples
        (max_examples, as `simulate`'s centralized uses the run's fleet), on validation"""
        n_t = s.federated_titles if 0 < s.federated_titles < data.items.shape[0] else 0
        key = (n_t, s.max_examples)
        if key not in variant_refs:
            variant_refs[key] = val_metrics(shape0, references(fleet(s.max_examples)[0], replace(
                base_setting, federated_titles=n_t, max_examples=s.max_examples))["centralized"], data, val_users)
            log(f"centralized with {n_t} federated title biases, max_examples {s.max_examples}: {variant_refs[key]}")
        return variant_refs[key]

    for cfg in configs:
        cfg = dict(cfg)
        name = cfg.pop("name")
        central_epochs = int(cfg.pop("central_epochs", 0))
        s = replace(base_setting, **cfg)
        shape = HeadShape(data.items.shape[0], data.items.shape[1], s.rank, n_feat)
        if central_epochs:  # a centralized variant (no DP): which parts of the head carry the gain
            head = references(fleet(s.max_examples)[0], s, central_epochs)["centralized"]
            vm = val_metrics(shape, head, data, val_users)
            nd = vm["NDCG@10"]
            row = {"name": name, "central_epochs": central_epochs, "fleet_val.NDCG@10": nd, "fleet_val": vm,
                   "over_centralized": round(nd / ref_scores["centralized"], 4), "setting": asdict(s),
                   "moved": moved(shape, head, refs)}
            log(json.dumps({k: row[k] for k in ("name", "fleet_val", "over_centralized")}))
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            continue
        for draw in range(a.first_draw, a.first_draw + a.draws):
            t0 = time.monotonic()
            fd, fb = fleet(s.max_examples)
            head, info = replay(fd, s, noise_seed=draw, bases=fb)
            vm = val_metrics(shape, head, data, val_users)
            nd = vm["NDCG@10"]
            cen = central_of(s)
            row = {"name": name, "draw": draw, "fleet_val.NDCG@10": nd, "fleet_val": vm,
                   "references_full": ref_full, "centralized_same_model": cen,
                   "over_centralized_same_model": round(nd / cen["NDCG@10"], 4) if cen["NDCG@10"] else None,
                   "moved": moved(shape, head, refs),
                   "over_centralized": round(nd / ref_scores["centralized"], 4),
                   "references": ref_scores, "val_users": int(len(val_users)), "setting": asdict(s),
                   **info, "seconds": round(time.monotonic() - t0, 1)}
            log(json.dumps({k: row[k] for k in ("name", "draw", "fleet_val", "over_centralized",
                                                 "over_centralized_same_model", "subset_k", "seconds",
                                                 "clipped_share", "update_norm_share", "moved")}))
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _final(a, configs, fleet, test_users, panel_users, log) -> None:
    """The chosen setting's replay draws scored as `simulate` scores a run (test titles of the fleet users,
    validation titles of the panel users). Only for a setting already chosen on validation. `fleet`:
    max_examples -> (fleet, its boxes' base scores); the references are fitted on the setting's fleet,
    as `simulate` fits them on the run's."""
    from appliance.federation.simulate import metrics10

    base = Setting()
    data = fleet(base.max_examples)[0]
    n_feat = data.features.shape[1]
    shape0 = HeadShape(data.items.shape[0], data.items.shape[1], base.rank, n_feat)
    refs_of: dict[int, dict[str, dict[str, float]]] = {}
    for cfg in configs:
        cfg = dict(cfg)
        name = cfg.pop("name")
        s = replace(base, **cfg)
        fd, fb = fleet(s.max_examples)
        if s.max_examples not in refs_of:
            refs_of[s.max_examples] = {
                name_: {"test.NDCG@10": metrics10(shape0, th, fd, test_users)["NDCG@10"],
                        "validation_panel_users.NDCG@10": metrics10(shape0, th, fd, panel_users)["NDCG@10"]}
                for name_, th in references(fd, replace(base, max_examples=s.max_examples)).items()}
            log(f"references (max_examples {s.max_examples}): {refs_of[s.max_examples]}")
        ref = refs_of[s.max_examples]
        shape = HeadShape(data.items.shape[0], data.items.shape[1], s.rank, n_feat)
        for draw in range(a.first_draw, a.first_draw + a.draws):
            t0 = time.monotonic()
            head, info = replay(fd, s, noise_seed=draw, bases=fb)
            m = metrics10(shape, head, data, test_users)
            row = {"name": name, "draw": draw, "replay": True, "test.NDCG@10": m["NDCG@10"], "test.HR@10": m["HR@10"],
                   "over_centralized": round(m["NDCG@10"] / ref["centralized"]["test.NDCG@10"], 4)
                   if ref["centralized"]["test.NDCG@10"] else None,
                   "validation_panel_users.NDCG@10": metrics10(shape, head, data, panel_users)["NDCG@10"],
                   "references": ref, "setting": asdict(s), **info, "seconds": round(time.monotonic() - t0, 1)}
            log(json.dumps({k: row[k] for k in ("name", "draw", "test.NDCG@10", "over_centralized",
                                                 "validation_panel_users.NDCG@10", "seconds")}))
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
