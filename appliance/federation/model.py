"""The part of the ranking bundle that the fleet fine-tunes, and one box's local step on it (numpy only).

The sequence model (`sequence.onnx`) stays frozen: it turns a household's recent titles into a query q
(d floats) and a title's score is <q, e_title> with e_title its row of `sequence_items.npy`. The fleet
learns a small *head* on top of it:

    q'              = q + U (V q)                 low-rank adapter on the query (rank r)
    score(title i)  = <q', e_i> + b_i             per-title output bias

    parameters: b (n_items) + U (d x r) + V (r x d)  ->  n_items + 2 d r
    (MovieLens-small bundle: 9,742 + 2*64*4 = 10,254 floats, 41,016 bytes as dense float32)

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

    @property
    def n_params(self) -> int:
        return self.n_items + 2 * self.dim * self.rank

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views (b [n_items], U [d, r], V [r, d]) into a flat parameter vector."""
        if theta.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} parameters, got {theta.shape}")
        n, d, r = self.n_items, self.dim, self.rank
        b = theta[:n]
        u = theta[n:n + d * r].reshape(d, r)
        v = theta[n + d * r:].reshape(r, d)
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


def head_scores(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Scores [batch, n_items] of every title for a batch of queries [batch, d]."""
    b, _, _ = shape.split(theta)
    return adapt_queries(shape, theta, queries) @ items.T + b


def loss_and_grad(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                  items: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean full-softmax cross-entropy of the next title, and its gradient w.r.t. theta."""
    b, u, v = shape.split(theta)
    n = len(targets)
    h = queries @ v.T                                   # [n, r]
    qa = queries + h @ u.T                              # [n, d]
    logits = qa @ items.T + b                           # [n, I]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(n), targets], 1e-30))))
    g = p
    g[np.arange(n), targets] -= 1.0
    g /= n                                              # dL/dlogits
    grad = np.zeros_like(theta)
    gb, gu, gv = shape.split(grad)
    gb[:] = g.sum(axis=0)
    dqa = g @ items                                     # [n, d]
    gu[:] = dqa.T @ h                                   # [d, r]
    gv[:] = (dqa @ u).T @ queries                       # [r, d]
    return loss, grad


def local_train(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                items: np.ndarray, *, lr: float = 0.5, epochs: int = 2, batch: int = 64,
                weight_decay: float = 0.0, seed: int = 0) -> np.ndarray:
    """A few epochs of SGD on one box's own examples; returns the new head (theta is not modified)."""
    theta = np.array(theta, dtype=np.float64, copy=True)
    queries = np.asarray(queries, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    items = np.asarray(items, dtype=np.float64)
    if len(targets) == 0:
        return theta
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(targets))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            _, grad = loss_and_grad(shape, theta, queries[idx], targets[idx], items)
            if weight_decay:
                grad += weight_decay * theta
            theta -= lr * grad
    return theta


def clip_l2(update: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """Scale `update` down to L2 norm <= clip (never up); returns (clipped copy, norm before clipping)."""
    if clip <= 0:
        raise ValueError("clip must be positive")
    norm = float(np.linalg.norm(update))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return np.asarray(update, dtype=np.float64) * scale, norm


def subset_size(n_params: int, compression: float) -> int:
    """Coordinates per round so that the SecAgg+ upload (int64 per coordinate, plus the one weight
    coordinate SecAgg+ prepends) is `compression` times smaller than dense float32 of all n_params."""
    if compression < 1:
        raise ValueError("compression must be >= 1")
    k = int(n_params * DENSE_BYTES_PER_PARAM // (SECAGG_BYTES_PER_PARAM * compression)) - 1
    if k < 1:
        raise ValueError(f"{n_params} parameters cannot be compressed {compression}x")
    return k


def round_subset(n_params: int, k: int, server_round: int, run_seed: int) -> np.ndarray:
    """This round's coordinates (sorted, distinct): a function of public values only, so every box and
    the server derive the same subset and the masked sum of the boxes' sub-vectors stays aligned."""
    if not 0 < k <= n_params:
        raise ValueError(f"k must be within 1..{n_params}, got {k}")
    rng = np.random.default_rng([int(run_seed), int(server_round)])
    return np.sort(rng.choice(n_params, size=k, replace=False))


def client_update(shape: HeadShape, theta: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                  items: np.ndarray, *, server_round: int, run_seed: int, k: int, clip: float,
                  **train_kw) -> tuple[np.ndarray, float]:
    """One box's round: local training, delta, this round's aligned subset, clipped to `clip`.

    Returns (clipped sub-vector [k], norm of the sub-vector before clipping)."""
    new = local_train(shape, theta, queries, targets, items, **train_kw)
    idx = round_subset(shape.n_params, k, server_round, run_seed)
    return clip_l2((new - theta)[idx], clip)


def examples_from_history(rows: np.ndarray, max_examples: int | None = None) -> list[tuple[np.ndarray, int]]:
    """(prefix, next title) pairs of one box's history (bundle rows, oldest first); the newest ones kept."""
    rows = np.asarray(rows, dtype=np.int64)
    pairs = [(rows[:t], int(rows[t])) for t in range(1, len(rows))]
    if max_examples is not None:
        pairs = pairs[-max_examples:]
    return pairs
