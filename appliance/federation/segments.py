"""Audience segments the service may learn about, and only in aggregate.

Each box assigns itself to a segment locally (nearest centroid of its preference vector) and reports:

- a one-hot segment vector plus its share of *distributed* discrete-Laplace noise: every box adds the
  difference of two Pólya variables so that the noise in the (securely aggregated) sum over n boxes is
  exactly two-sided geometric with parameter exp(-epsilon) — no trusted party ever sees an exact count;
- a DataSketches HLL sketch of its own random box id for that segment, whose union in the cloud counts
  distinct boxes per segment (compact serialisation, the format Druid's DataSketches extension merges).

Nothing in a report names a title, an event or the household.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import datasketches
import numpy as np

HLL_LG_K = 12
HLL_TYPE = datasketches.tgt_hll_type.HLL_4


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS's entropy (noise must not be predictable from a seed)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def assign_segment(preferences: np.ndarray, centroids: np.ndarray) -> int:
    """Nearest centroid (cosine) of this box's preference vector; computed on the box."""
    p = preferences / max(float(np.linalg.norm(preferences)), 1e-12)
    c = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return int(np.argmax(c @ p))


def noise_share(n_boxes: int, epsilon: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """One box's share: Polya(1/n, a) - Polya(1/n, a), a = exp(-eps); n shares sum to discrete Laplace."""
    if n_boxes < 1 or epsilon <= 0:
        raise ValueError("n_boxes >= 1 and epsilon > 0 are required")
    a = math.exp(-epsilon)
    r = 1.0 / n_boxes
    # numpy's negative_binomial(n, p) counts failures before n successes with success prob p; Polya(r, a)
    # has failure probability a, so p = 1 - a.
    return (rng.negative_binomial(r, 1 - a, size) - rng.negative_binomial(r, 1 - a, size)).astype(np.int64)


def box_report(segment: int, n_segments: int, n_boxes: int, epsilon: float,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """What one box contributes to the per-segment counts (its L1 sensitivity is 1: one segment)."""
    onehot = np.zeros(n_segments, dtype=np.int64)
    onehot[segment] = 1
    return onehot + noise_share(n_boxes, epsilon, n_segments, rng or secure_rng())


def count_error_bound(epsilon: float, beta: float) -> float:
    """|noise| of one DP count stays below this with probability >= 1 - beta (two-sided geometric)."""
    a = math.exp(-epsilon)
    # P(|X| >= t) = 2 a^t / (1 + a) for integer t >= 1
    return math.ceil(math.log(beta * (1 + a) / 2) / math.log(a))


def box_sketch(box_id: str, lg_k: int = HLL_LG_K) -> bytes:
    sk = datasketches.hll_sketch(lg_k, HLL_TYPE)
    sk.update(box_id)
    return sk.serialize_compact()


@dataclass(frozen=True)
class DistinctCount:
    estimate: float
    lower: float  # bounds at `num_std_dev` standard deviations (DataSketches' own error model)
    upper: float


def merge_sketches(sketches: list[bytes], lg_k: int = HLL_LG_K, num_std_dev: int = 2) -> DistinctCount:
    union = datasketches.hll_union(lg_k)
    for blob in sketches:
        union.update(datasketches.hll_sketch.deserialize(blob))
    result = union.get_result(HLL_TYPE)
    return DistinctCount(result.get_estimate(), result.get_lower_bound(num_std_dev),
                         result.get_upper_bound(num_std_dev))
