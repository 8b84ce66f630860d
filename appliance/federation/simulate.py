"""`appliance federation simulate`: the fleet-size run in one process (LocalGrid, no Ray).

One node per user of an interactions file (time-ordered leave-last-out split of the ranking issue's
protocol): each box trains the head on (prefix -> next title) pairs of its own history without the
held-out test title; the server runs the real Flower ServerApp (SecAgg+, client-side clipping, central
DP noise, budget ledger). Reported, on the same users' test titles with full ranking over the bundle's
titles minus the user's history:

    start_only      the shared start, no fine-tuning (the identity head = the bundle as shipped)
    ours_federated_dp
    centralized     the same head and start, fine-tuned without DP on the pooled examples of the same
                    users (same local optimiser, epochs = rounds x local epochs)

SKELETON STATUS: the start is the shipped bundle, which was trained on every user (the issue wants a
start trained on a disjoint 20% panel only); until that start exists these numbers say nothing about
what the fleet adds. The plumbing, the accounting, the byte counts and the JSON are the real thing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.evaluation.recsys.data import leave_last_out, read_interactions
from appliance.evaluation.recsys.metrics import evaluate_scores
from appliance.federation.model import (
    DENSE_BYTES_PER_PARAM,
    HeadShape,
    examples_from_history,
    head_scores,
    local_train,
)


@dataclass
class FleetData:
    items: np.ndarray                           # [n_items, d] the bundle's sequence item table
    boxes: list[tuple[np.ndarray, np.ndarray]]  # per box: queries [n, d], targets [n] (bundle rows)
    eval_queries: np.ndarray                    # [n_boxes, d] query of the history before the test title
    histories: list[np.ndarray]                 # bundle rows each box has seen (excluded when ranking)
    targets: np.ndarray                         # test title (bundle row, -1 = not in the bundle)


def auto_num_shares(cohort: int) -> float | int:
    """All boxes share with all up to 50; beyond, an odd O(log n) neighbourhood (SecAgg+)."""
    if cohort <= 50:
        return 1.0
    k = 2 * math.ceil(math.log2(cohort)) + 5
    return min(cohort, k | 1)


def load_fleet(interactions: Path, bundle_dir: Path, nodes: int | None, max_examples: int,
               log: Callable[[str], None]) -> FleetData:
    from appliance.ranking.bundle import RankerBundle

    split = leave_last_out(read_interactions(interactions))
    bundle = RankerBundle.load(bundle_dir)
    if bundle.sequence is None:
        raise ValueError(f"{bundle_dir}: the bundle has no sequence model to fine-tune a head on")
    seq = bundle.sequence
    # split item index -> bundle row (-1: the bundle does not know the title)
    pos = np.searchsorted(bundle.item_ids, split.item_ids)
    pos = np.clip(pos, 0, len(bundle.item_ids) - 1)
    to_row = np.where(bundle.item_ids[pos] == split.item_ids, pos, -1)
    n = split.n_users if nodes is None else min(nodes, split.n_users)
    log(f"{n} boxes (of {split.n_users} users), {len(bundle.item_ids)} titles in the bundle")
    boxes, eval_hist, hists, targets = [], [], [], []
    for u in range(n):
        rows = to_row[split.seqs[u]]
        hist = rows[:-1][rows[:-1] >= 0]
        pairs = examples_from_history(hist, max_examples)
        if pairs:
            q = seq.encode_batch([p for p, _ in pairs])
            t = np.array([t for _, t in pairs], dtype=np.int64)
        else:
            q, t = np.zeros((0, seq.dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
        boxes.append((q, t))
        eval_hist.append(hist)
        hists.append(hist)
        targets.append(int(rows[-1]))
    eval_q = np.concatenate([seq.encode_batch(eval_hist[i:i + 256]) for i in range(0, n, 256)])
    return FleetData(seq.table.astype(np.float64), boxes, eval_q, hists, np.array(targets, dtype=np.int64))


def ndcg10(shape: HeadShape, theta: np.ndarray, data: FleetData) -> float:
    ok = data.targets >= 0
    scores = head_scores(shape, theta, data.eval_queries, data.items)
    per = evaluate_scores(scores, data.histories, np.where(ok, data.targets, 0), ks=(10,))
    return float(np.where(ok, per.ndcg[10], 0.0).mean())


def simulate(interactions: Path, bundle_dir: Path, *, nodes: int | None = None, rounds: int = 20,
             epsilon: float = 2.0, delta: float = 1e-5, clip: float = 0.5, cohort: int | None = None,
             compression: float = 16.0, rank: int = 4, max_examples: int = 50, local_epochs: int = 2,
             lr: float = 0.5, dropout: float = 0.0, seed: int = 0, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    from appliance.federation.flower_app import RunSettings, make_client_app, run_server
    from appliance.federation.local_grid import LocalGrid

    t0 = time.monotonic()
    data = load_fleet(interactions, bundle_dir, nodes, max_examples, log)
    n = len(data.boxes)
    m = cohort or n
    shape = HeadShape(data.items.shape[0], data.items.shape[1], rank)
    s = RunSettings(rounds=rounds, epsilon=epsilon, delta=delta, clip=clip, population=n, cohort=m,
                    compression=compression, run_seed=seed, num_shares=auto_num_shares(m),
                    n_items=shape.n_items, dim=shape.dim, rank=rank, head_seed=seed, lr=lr,
                    local_epochs=local_epochs, timeout=60.0)
    rng = np.random.default_rng(seed)
    n_drop = int(round(dropout * n))
    drop = {1000 + int(i): "collect_masked_vectors" for i in rng.choice(n, size=n_drop, replace=False)}
    app = make_client_app(lambda cfg: (*data.boxes[int(cfg["box"])], data.items))
    grid = LocalGrid(app, [{"box": i} for i in range(n)], s.to_run_config(), drop_from=drop)
    log(f"federated: {n} boxes, cohort {m}, {rounds} rounds, epsilon {epsilon}, head {shape.n_params} params")
    t_fed = time.monotonic()
    res = run_server(grid, grid.server_context())
    fed_seconds = time.monotonic() - t_fed
    theta0 = shape.initial(seed=seed)

    log("centralized: same head, same start, pooled examples, no DP")
    q = np.concatenate([b[0] for b in data.boxes if len(b[1])])
    t = np.concatenate([b[1] for b in data.boxes if len(b[1])])
    central = local_train(shape, theta0, q, t, data.items, lr=lr, epochs=max(1, rounds * local_epochs // 4),
                          batch=256, seed=seed)

    uploads = [v for v in grid.wire.upload_per_box("1", "collect_masked_vectors").values()]
    uploads_all = [v for v in grid.wire.upload_per_box("1").values()]
    out = {
        "epsilon": res.epsilon,
        "delta": delta,
        "rounds": len(res.rounds),
        "nodes": n,
        "cohort": m,
        "federated_params": shape.n_params,
        "ours_federated_dp.NDCG@10": round(ndcg10(shape, res.head, data), 5),
        "centralized.NDCG@10": round(ndcg10(shape, central, data), 5),
        "start_only.NDCG@10": round(ndcg10(shape, theta0, data), 5),
        "upload_bytes_per_client_round": int(np.median(uploads)) if uploads else 0,
        "upload_bytes_per_client_round_all_secagg_stages": int(np.median(uploads_all)) if uploads_all else 0,
        "dense_bytes_per_client_round": shape.n_params * DENSE_BYTES_PER_PARAM,
        "dropout_rate": n_drop / n if n else 0.0,
        "noise_multiplier": res.noise_multiplier,
        "epsilon_per_round": [r.epsilon for r in res.rounds],
        "survivors_per_round": [r.survivors for r in res.rounds],
        "subset_k": res.subset_k,
        "num_shares": s.num_shares,
        "stopped": res.stopped,
        "federated_seconds": round(fed_seconds, 2),
        "wall_seconds": round(time.monotonic() - t0, 2),
        "start": "shipped bundle (trained on all users; not yet the 20% panel start)",
    }
    return out


def write_json(result: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
