"""What the server does with each round's DP release: its optimiser step and iterate averaging.

Everything here is post-processing of the noised aggregate (the boxes' clipped, securely summed updates
plus the Gaussian noise `flower_app.FleetDP` adds): it reads only the released noisy mean, public
settings and the public noise standard deviation, so it costs no privacy (the accounting is unchanged).

Each round moves only that round's aligned coordinate subset (`model.round_subset`), so the optimiser
keeps per-coordinate state and touches only the coordinates a round released:

    sgd       theta[S] += lr * u                                   (FedAvg with a server step size)
    momentum  buf[S] = beta1 * buf[S] + u;  theta[S] += lr * buf[S]             (FedAvgM)
    adam      m[S] = beta1 m[S] + (1 - beta1) u;  v[S] = beta2 v[S] + (1 - beta2) u^2   (FedAdam,
              theta[S] += lr * mhat / (sqrt(vhat) + tau)             Reddi et al. 2021)
              with bias corrections counted per coordinate (a coordinate that moved t times divides by
              1 - beta^t), and tau = server_tau * the round's noise std on the mean: a coordinate whose
              release is at the noise level moves about lr * u / tau, a strong one about lr (its step is
              bounded), so lr is in units of the head's parameters.

The step size may differ per part of the head (title biases, adapter, feature weights: `lr` is then
one entry per parameter). The feature weights w are pushed the same way by almost every box (strong
signal), but noise on one w_j shifts the bias of every title with feature j at once, so they may want
a smaller server step than the biases, whose signal per coordinate is weak.

Iterate averaging (`average_from` = r > 0): the head the run publishes is the mean of the heads after
rounds r, r+1, ..., R (Polyak-Ruppert tail averaging), which averages out part of the noise carried in
the last rounds' heads. The per-round heads stay what the optimiser made; only the published one is the
average.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("sgd", "momentum", "adam")


@dataclass
class ServerOptimizer:
    n_params: int
    kind: str = "sgd"
    lr: float | np.ndarray = 1.0   # one step size, or one per parameter (`model.lr_vector`: per part of the head)
    beta1: float = 0.9             # momentum / Adam's first moment
    beta2: float = 0.99            # Adam's second moment
    tau: float = 1.0               # Adam's adaptivity, in noise std of the round (public); > 0
    average_from: int = 0          # publish the mean of the heads after rounds >= this (0: the last head)
    m: np.ndarray = field(init=False, repr=False)
    v: np.ndarray = field(init=False, repr=False)
    t: np.ndarray = field(init=False, repr=False)
    avg_sum: np.ndarray | None = field(init=False, default=None, repr=False)
    avg_count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"server optimiser must be one of {KINDS}, got {self.kind!r}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("beta1 and beta2 must lie in [0, 1)")
        if self.kind == "adam" and not self.tau > 0:
            raise ValueError("adam needs tau > 0")
        if isinstance(self.lr, np.ndarray) and self.lr.shape != (self.n_params,):
            raise ValueError(f"per-parameter lr must have {self.n_params} entries")
        if self.average_from < 0:
            raise ValueError("average_from counts rounds from 1 (0: off)")
        self.m = np.zeros(self.n_params)
        self.v = np.zeros(self.n_params)
        self.t = np.zeros(self.n_params, dtype=np.int64)

    def step(self, theta: np.ndarray, idx: np.ndarray, update: np.ndarray, server_round: int,
             noise_std: float = 0.0) -> np.ndarray:
        """The head after this round: `update` is the released (noisy) mean for coordinates `idx`.
        Returns a new array (theta is not modified)."""
        idx = np.asarray(idx, dtype=np.int64)
        u = np.asarray(update, dtype=np.float64)
        if u.shape != idx.shape:
            raise ValueError(f"update of {u.shape} for {idx.shape} coordinates")
        theta = np.array(theta, dtype=np.float64, copy=True)
        lr = self.lr[idx] if isinstance(self.lr, np.ndarray) else self.lr
        if self.kind == "sgd":
            theta[idx] += lr * u
        elif self.kind == "momentum":
            self.m[idx] = self.beta1 * self.m[idx] + u
            theta[idx] += lr * self.m[idx]
        else:
            self.t[idx] += 1
            t = self.t[idx]
            self.m[idx] = self.beta1 * self.m[idx] + (1 - self.beta1) * u
            self.v[idx] = self.beta2 * self.v[idx] + (1 - self.beta2) * u * u
            mhat = self.m[idx] / (1 - self.beta1 ** t)
            vhat = self.v[idx] / (1 - self.beta2 ** t)
            tau = self.tau * noise_std if noise_std > 0 else self.tau
            theta[idx] += lr * mhat / (np.sqrt(vhat) + tau)
        if self.average_from and server_round >= self.average_from:
            self.avg_sum = theta.copy() if self.avg_sum is None else self.avg_sum + theta
            self.avg_count += 1
        return theta

    def published(self, theta: np.ndarray) -> np.ndarray:
        """The head the run publishes: the tail average when averaging is on and has started, else theta."""
        if self.avg_sum is None or self.avg_count == 0:
            return np.asarray(theta, dtype=np.float64)
        return self.avg_sum / self.avg_count
