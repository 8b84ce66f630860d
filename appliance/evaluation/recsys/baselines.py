"""The five baselines of issue 6, each a small class: fit(histories, ...) then scores(users).

All of them see exactly what "ours" sees: the users' fitted histories (train for validation, train +
validation for test), as item-index sequences, oldest first, plus their timestamps. Each has a small
grid (`GRID`) that `tune` searches on the validation split.

- popularity   interaction counts over all fitted histories, optionally time-decayed (half-life in days,
               relative to the newest fitted timestamp)
- itemknn      item-item cosine on the binary user x item matrix, each item keeps its top-k neighbours;
               score(u, j) = sum over the user's items i of sim(i, j)
- als          implicit ALS (`implicit` package, CPU), confidence 1 + alpha * x; score = <p_u, q_j>
- ease         EASE (Steck 2019): B = I - P diag(1/diag P), P = (X'X + lambda I)^-1, diag B = 0
- transition   first-order Markov chain P(j | i) from consecutive pairs of the fitted histories; score
               = sum over the last n items i_k (k = 1 newest) of w_k P(. | i_k), w_k = 1 or 1/k
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.linalg as sl
import scipy.sparse as sp


def user_item(histories: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    rows = np.concatenate([np.full(len(h), u, dtype=np.int64) for u, h in enumerate(histories)])
    cols = np.concatenate(histories).astype(np.int64)
    X = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                      shape=(len(histories), n_items))
    X.data[:] = 1.0  # duplicates summed by the constructor -> binary
    X.sum_duplicates()
    X.data[:] = 1.0
    return X


class Baseline:
    name: ClassVar[str] = ""
    GRID: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **params: Any) -> None:
        self.params = params

    def fit(self, histories: Sequence[np.ndarray], ts: Sequence[np.ndarray], n_items: int) -> Baseline:
        raise NotImplementedError

    def scores(self, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Popularity(Baseline):
    name = "popularity"
    GRID: ClassVar[list[dict[str, Any]]] = [{"half_life_days": h} for h in (0.0, 30.0, 180.0, 730.0)]

    def fit(self, histories, ts, n_items):
        items = np.concatenate(histories)
        h = float(self.params.get("half_life_days", 0.0))
        if h > 0:
            t = np.concatenate(ts).astype(np.float64)
            w = 0.5 ** ((t.max() - t) / (h * 86400.0))
        else:
            w = None
        self.pop = np.bincount(items, weights=w, minlength=n_items).astype(np.float64)
        return self

    def scores(self, users):
        return np.tile(self.pop, (len(users), 1))


class ItemKNN(Baseline):
    name = "itemknn"
    GRID: ClassVar[list[dict[str, Any]]] = [{"k": k} for k in (20, 50, 100, 200, 0)]  # 0 = all neighbours

    def fit(self, histories, ts, n_items):
        X = user_item(histories, n_items)
        self.X = X
        C = (X.T @ X).toarray().astype(np.float32)
        norms = np.sqrt(np.diag(C)).astype(np.float32)
        np.fill_diagonal(C, 0.0)
        inv = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        C *= inv[:, None]
        C *= inv[None, :]
        k = int(self.params.get("k", 0))
        if 0 < k < n_items - 1:
            idx = np.argpartition(-C, k - 1, axis=1)[:, :k]
            rows = np.repeat(np.arange(n_items), k)
            vals = C[rows, idx.ravel()]
            C = sp.csr_matrix((vals, (rows, idx.ravel())), shape=(n_items, n_items))
        self.S = C
        return self

    def scores(self, users):
        out = self.X[users] @ self.S
        return out.toarray() if sp.issparse(out) else np.asarray(out)


class ALS(Baseline):
    name = "als"
    GRID: ClassVar[list[dict[str, Any]]] = [
        {"factors": f, "regularization": r, "alpha": a, "iterations": 15}
        for f in (64, 128) for r in (0.01, 0.1) for a in (1.0, 10.0)
    ]

    def fit(self, histories, ts, n_items):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        X = user_item(histories, n_items)
        model = AlternatingLeastSquares(factors=int(self.params["factors"]),
                                        regularization=float(self.params["regularization"]),
                                        alpha=float(self.params["alpha"]),
                                        iterations=int(self.params["iterations"]),
                                        random_state=0, num_threads=2, calculate_training_loss=False)
        with threadpool_limits(1, "blas"):  # implicit's own threads; BLAS threads would oversubscribe
            model.fit(X, show_progress=False)
        self.U = np.asarray(model.user_factors, dtype=np.float32)
        self.V = np.asarray(model.item_factors, dtype=np.float32)
        return self

    def scores(self, users):
        return self.U[users] @ self.V.T


class EASE(Baseline):
    name = "ease"
    GRID: ClassVar[list[dict[str, Any]]] = [{"lambda": lam} for lam in (20.0, 50.0, 200.0, 500.0)]

    def fit(self, histories, ts, n_items):
        X = user_item(histories, n_items)
        self.X = X
        G = (X.T @ X).toarray().astype(np.float32)
        G[np.diag_indices(n_items)] += float(self.params["lambda"])
        # Cholesky inverse of the SPD Gram matrix (potrf + potri: ~5x faster than a general inverse).
        c, info = sl.lapack.spotrf(G, lower=1, overwrite_a=1)
        if info != 0:
            raise RuntimeError(f"EASE: Cholesky failed ({info})")
        P, info = sl.lapack.spotri(c, lower=1, overwrite_c=1)
        if info != 0:
            raise RuntimeError(f"EASE: inverse failed ({info})")
        P = np.tril(P) + np.tril(P, -1).T
        d = np.diag(P).copy()
        P /= -d[None, :]
        np.fill_diagonal(P, 0.0)
        self.B = P
        return self

    def scores(self, users):
        return np.asarray(self.X[users] @ self.B)


class Transition(Baseline):
    name = "transition"
    GRID: ClassVar[list[dict[str, Any]]] = [{"n": n, "weighting": w} for n in (1, 2, 3, 5, 10, 20)
                                            for w in ("uniform", "harmonic")]

    def fit(self, histories, ts, n_items):
        src = np.concatenate([h[:-1] for h in histories if len(h) > 1])
        dst = np.concatenate([h[1:] for h in histories if len(h) > 1])
        T = sp.csr_matrix((np.ones(len(src), dtype=np.float64), (src, dst)), shape=(n_items, n_items))
        T.sum_duplicates()
        out = np.asarray(T.sum(axis=1)).ravel()
        T = sp.diags(np.where(out > 0, 1.0 / np.maximum(out, 1e-12), 0.0)) @ T
        self.T = T.tocsr()
        self.hist = list(histories)
        return self

    def scores(self, users):
        n = int(self.params["n"])
        harmonic = self.params.get("weighting") == "harmonic"
        rows, cols, vals = [], [], []
        for j, u in enumerate(users):
            last = self.hist[u][::-1][:n]
            for k, i in enumerate(last):
                rows.append(j)
                cols.append(int(i))
                vals.append(1.0 / (k + 1) if harmonic else 1.0)
        W = sp.csr_matrix((vals, (rows, cols)), shape=(len(users), self.T.shape[0]))
        return (W @ self.T).toarray()


ALL: tuple[type[Baseline], ...] = (Popularity, ItemKNN, ALS, EASE, Transition)
