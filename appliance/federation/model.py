"""The part of the ranking bundle that the fleet fine-tunes, and one box's local step on it (numpy only).

The sequence model (`sequence.onnx`) stays frozen: it turns a household's recent titles into a query q
(d floats) and a title's score is <q, e_title> with e_title its row of `sequence_items.npy`. The fleet
learns a small *head* on top of it:

    q'              = q + U (V q)                 low-rank adapter on the query (rank r)
    score(title i)  = <q', e_i> + b_i + <f_i, w>  per-title output bias + a bias from public title
                                                  features f_i (content metadata and the panel's
                                                  popularity: `panel.title_features`)

    parameters: b (n_items) + U (d x r) + V (r x d) + w (n_feat)  ->  n_items + 2 d r + n_feat
    (MovieLens-small bundle, rank 4, 38 features: 9,742 + 512 + 38 = 10,292 floats, 41,168 bytes float32)

Why both biases: under user-level DP the noise on the averaged update is z C / m per coordinate, the
same for every coordinate, while a title's own bias only gets signal from the few boxes that watched it:
per-title biases are learnt only for the most watched titles, whereas w is pushed the same way by
almost every box and is learnt every round (its coordinates are in every round's subset).

The head starts as the identity (b = 0, U = 0, V small and random but fixed by the shared start), so
the start model ranks exactly as the bundle does; what the fleet adds is a popularity/taste shift that
the central panel did not see (biases) and a small rotation of the query (adapter).

One round on one box: train the head on the box's own (prefix -> next title) pairs with full-softmax
cross-entropy, take the delta from the global head, keep only this round's *aligned* coordinate subset
(the same for every box: drawn from the run's public seed and the round number), clip it to L2 norm C
and hand it to secure aggregation. Because every box sends the same coordinates, the masked sum is an
ordinary vector sum and SecAgg+ needs no sparse support; the upload shrinks by n_params / k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE_BYTES_PER_PARAM = 4  # float32
SECAGG_BYTES_PER_PARAM = 8  # SecAgg+ uploads one int64 per coordinate (masked, quantised)


@dataclass(frozen=True)
class HeadShape:
    n_items: int
    dim: int
    rank: int = 4
    n_feat: int = 0

    @property
    def n_params(self) -> int:
        return self.n_items + 2 * self.dim * self.rank + self.n_feat

    def feature_weights(self, theta: np.ndarray) -> np.ndarray:
        """View of w (the last n_feat parameters)."""
        return theta[self.n_params - self.n_feat:]

    def bias(self, theta: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """Every title's total bias b + F w [n_items]."""
        b = theta[:self.n_items]
        if self.n_feat == 0:
            return b
        if features is None or features.shape != (self.n_items, self.n_feat):
            raise ValueError(f"the head needs title features [{self.n_items}, {self.n_feat}]")
        return b + features @ self.feature_weights(theta).astype(features.dtype)

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views (b [n_items], U [d, r], V [r, d]) into a flat parameter vector."""
        if theta.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} parameters, got {theta.shape}")
        n, d, r = self.n_items, self.dim, self.rank
        b = theta[:n]
        u = theta[n:n + d * r].reshape(d, r)
        v = theta[n + d * r:n + 2 * d * r].reshape(r, d)
        return b, u, v

    def initial(self, seed: int = 0, v_scale: float = 0.1) -> np.ndarray:
        """The identity head: b = 0, U = 0, V ~ N(0, v_scale^2 / d) (seeded: part of the shared start)."""
        theta = np.zeros(self.n_params, dtype=np.float64)
        _, _, v = self.split(theta)
        v[:] = np.random.default_rng(seed).normal(0.0, v_scale / np.sqrt(self.dim), size=v.shape)
        return theta


def adapt_queries(shape: HeadShape, theta: np.ndarray, queries: np.ndarray) -> np.ndarray:
    _, u, v = shape.split(theta)
    return queries + (queries @ v.T) @ u.T


def head_scores(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, items: np.ndarray,
                features: np.ndarray | None = None) -> np.ndarray:
    """Scores [batch, n_items] of every title for a batch of queries [batch, d]."""
    return adapt_queries(shape, theta, queries) @ items.T + shape.bias(theta, features)


def loss_and_grad(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                  items: np.ndarray, base: np.ndarray | None = None,
                  features: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Mean full-softmax cross-entropy of the next title, and its gradient w.r.t. theta.

    `base` = queries @ items.T may be given (it does not depend on theta): the rest is then O(n I r),
    because every adapter term goes through the r-dimensional bottleneck (A = items @ U is [I, r]):

        logits = base + (Q V^T) A^T + b
        dL/db = G.sum(0),  dL/dU = items^T (G^T H),  dL/dV = (G A)^T Q      (G = dL/dlogits, H = Q V^T)
    """
    b, u, v = shape.split(theta)
    dt = queries.dtype if queries.dtype in (np.float32, np.float64) else np.float64
    n = len(targets)
    h = queries @ v.T.astype(dt)                        # [n, r]
    a = items @ u.astype(dt)                            # [I, r]
    if base is None:
        base = queries @ items.T
    logits = base + h @ a.T + shape.bias(theta, features).astype(dt)  # [n, I]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits, out=logits)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(-np.mean(np.log(np.maximum(p[rows, targets], 1e-30))))
    g = p
    g[rows, targets] -= 1.0
    g /= n                                              # dL/dlogits
    grad = np.zeros(shape.n_params, dtype=np.float64)
    gb, gu, gv = shape.split(grad)
    gb[:] = g.sum(axis=0)
    if shape.n_feat:
        shape.feature_weights(grad)[:] = features.T @ g.sum(axis=0)  # dL/dw = F^T dL/db
    gu[:] = items.T @ (g.T @ h)                         # [d, r]
    gv[:] = (g @ a).T @ queries                         # [r, d]
    return loss, grad


def lr_vector(shape: HeadShape, lr: float, lr_adapter: float | None = None,
              lr_features: float | None = None) -> np.ndarray:
    """Per-parameter step size: `lr` for the title biases, `lr_adapter` (default: lr) for U and V,
    `lr_features` (default: lr) for w."""
    out = np.full(shape.n_params, float(lr))
    out[shape.n_items:shape.n_params - shape.n_feat] = float(lr if lr_adapter is None else lr_adapter)
    if shape.n_feat:
        out[shape.n_params - shape.n_feat:] = float(lr if lr_features is None else lr_features)
    return out


def local_train(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                items: np.ndarray, *, lr: float = 0.5, lr_adapter: float | None = None,
                lr_features: float | None = None, epochs: int = 2, batch: int = 64, weight_decay: float = 0.0,
                seed: int = 0, dtype: type = np.float32, base: np.ndarray | None = None,
                features: np.ndarray | None = None, frozen: np.ndarray | None = None) -> np.ndarray:
    """A few epochs of SGD on one box's own examples; returns the new head (theta is not modified).

    The biases and the adapter have their own step sizes (a bias step moves one title's score by lr x
    its gradient; an adapter step moves every score, so it wants a much smaller one). The frozen part
    of the logits (`base` = queries @ items.T, which a box may keep between rounds) is computed once
    per call when not given; arithmetic is float32 by default."""
    theta = np.array(theta, dtype=np.float64, copy=True)
    if len(targets) == 0:
        return theta
    queries = np.asarray(queries, dtype=dtype)
    targets = np.asarray(targets, dtype=np.int64)
    items = np.asarray(items, dtype=dtype)
    if base is None:
        base = queries @ items.T
    step = lr_vector(shape, lr, lr_adapter, lr_features)
    if frozen is not None and len(frozen):
        step[np.asarray(frozen, dtype=np.int64)] = 0.0  # not federated: stays at the shared start's value
    feats = None if features is None else np.asarray(features, dtype=dtype)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(targets))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            _, grad = loss_and_grad(shape, theta, queries[idx], targets[idx], items, base[idx], feats)
            if weight_decay:
                grad += weight_decay * theta
            theta -= step * grad
    return theta


def clip_l2(update: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """Scale `update` down to L2 norm <= clip (never up); returns (clipped copy, norm before clipping)."""
    if clip <= 0:
        raise ValueError("clip must be positive")
    norm = float(np.linalg.norm(update))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return np.asarray(update, dtype=np.float64) * scale, norm


def subset_size(n_params: int, compression: float, pack: int = 1) -> int:
    """Coordinates per round so that the SecAgg+ upload (int64 per coordinate, plus the one weight
    coordinate SecAgg+ prepends) is `compression` times smaller than dense float32 of all n_params.
    With `pack` values per SecAgg+ integer (`packing`) the same upload carries `pack` times as many."""
    if compression < 1:
        raise ValueError("compression must be >= 1")
    if pack < 1:
        raise ValueError("pack must be >= 1")
    k = int(n_params * DENSE_BYTES_PER_PARAM // (SECAGG_BYTES_PER_PARAM * compression)) - 1
    if k < 1:
        raise ValueError(f"{n_params} parameters cannot be compressed {compression}x")
    return min(k * pack, n_params)


def round_subset(n_params: int, k: int, server_round: int, run_seed: int, always: int = 0,
                 fixed: np.ndarray | None = None, frozen: np.ndarray | None = None) -> np.ndarray:
    """This round's coordinates (sorted, distinct): a function of public values only, so every box and
    the server derive the same subset and the masked sum of the boxes' sub-vectors stays aligned.

    Rounds walk through a seeded random permutation of all coordinates in blocks of k (floor(n/k)
    blocks per pass; the n mod k left over wait for a later pass, which uses a fresh permutation): every
    coordinate is updated about once per n/k rounds. A fresh uniform draw each round would, over 20
    rounds at 1/20 of the head per round, leave e^-1 = 37% of the head never updated.

    The last `always` coordinates (the feature weights w) and the coordinates in `fixed` (public, e.g.
    the biases of the titles the central panel watched most) are in every round's subset; the blocks
    rotate over the others. Without `fixed` the subset is what it always was. Coordinates in `frozen`
    (not federated: `frozen_titles`) are in no round's subset; the blocks rotate over the rest."""
    if not 0 < k <= n_params:
        raise ValueError(f"k must be within 1..{n_params}, got {k}")
    fixed = np.zeros(0, dtype=np.int64) if fixed is None else np.unique(np.asarray(fixed, dtype=np.int64))
    if fixed.size and (fixed[0] < 0 or fixed[-1] >= n_params - always):
        raise ValueError("fixed coordinates must lie outside the last `always` ones")
    if not 0 <= always + fixed.size < k:
        raise ValueError(f"always + fixed must be within 0..{k - 1}, got {always} + {fixed.size}")
    if server_round < 1:
        raise ValueError("rounds count from 1")
    frozen = np.zeros(0, dtype=np.int64) if frozen is None else np.unique(np.asarray(frozen, dtype=np.int64))
    if frozen.size and (np.intersect1d(frozen, fixed).size or frozen[0] < 0 or frozen[-1] >= n_params - always):
        raise ValueError("frozen coordinates must lie outside `fixed` and the last `always` ones")
    skip = np.union1d(fixed, frozen)
    pool = np.setdiff1d(np.arange(n_params - always), skip) if skip.size else np.arange(n_params - always)
    n_rot, k_rot = len(pool), k - always - fixed.size
    epoch, block = divmod(int(server_round) - 1, n_rot // k_rot)
    perm = np.random.default_rng([int(run_seed), epoch]).permutation(n_rot)
    rot = pool[np.sort(perm[block * k_rot:(block + 1) * k_rot])]
    return np.concatenate([np.sort(np.concatenate([rot, fixed])), np.arange(n_params - always, n_params)])


def client_update(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                  items: np.ndarray, *, server_round: int, run_seed: int, k: int, clip: float,
                  fixed: np.ndarray | None = None, frozen: np.ndarray | None = None,
                  **train_kw) -> tuple[np.ndarray, float]:
    """One box's round: local training (the `frozen` coordinates held), delta, this round's aligned
    subset, clipped to `clip`.

    Returns (clipped sub-vector [k], norm of the sub-vector before clipping)."""
    new = local_train(shape, theta, queries, targets, items, frozen=frozen, **train_kw)
    idx = round_subset(shape.n_params, k, server_round, run_seed, always=shape.n_feat, fixed=fixed, frozen=frozen)
    return clip_l2((new - theta)[idx], clip)


def frozen_titles(shape: HeadShape, popularity: np.ndarray, federated_titles: int) -> np.ndarray | None:
    """The title biases the fleet does not learn: all but the panel's `federated_titles` most watched
    titles (public, central information). A rare title's bias gets a few boxes' signal under the same
    z C / m noise per coordinate as a popular one's, so federating it mostly adds noise that pushes it
    into everyone's top 10. None (every bias federated) when federated_titles <= 0 or >= n_items."""
    if federated_titles <= 0 or federated_titles >= shape.n_items:
        return None
    order = np.argsort(-np.asarray(popularity)[:shape.n_items], kind="stable")
    return np.sort(order[federated_titles:]).astype(np.int64)


def n_federated(shape: HeadShape, frozen: np.ndarray | None) -> int:
    """Parameters the fleet learns (what the compression target and the upload are measured against)."""
    return shape.n_params - (0 if frozen is None else len(frozen))


def examples_from_history(rows: np.ndarray, max_examples: int | None = None) -> list[tuple[np.ndarray, int]]:
    """(prefix, next title) pairs of one box's history (bundle rows, oldest first); the newest ones kept."""
    rows = np.asarray(rows, dtype=np.int64)
    pairs = [(rows[:t], int(rows[t])) for t in range(1, len(rows))]
    if max_examples is not None:
        pairs = pairs[-max_examples:]
    return pairs
