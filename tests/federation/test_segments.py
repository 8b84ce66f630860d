"""Segment reports: DP counts within their stated bound, HLL distinct counts within theirs, no ids inside."""

from __future__ import annotations

import math

import numpy as np

from appliance.federation.segments import (
    assign_segment,
    box_report,
    box_sketch,
    count_error_bound,
    merge_sketches,
    noise_share,
)


def test_distributed_noise_sums_to_discrete_laplace():
    rng = np.random.default_rng(0)
    n, eps, trials = 50, 0.5, 4000
    total = sum(noise_share(n, eps, trials, rng) for _ in range(n))
    a = math.exp(-eps)
    assert abs(total.mean()) < 0.2
    assert abs(total.var() / (2 * a / (1 - a) ** 2) - 1) < 0.1  # variance of the two-sided geometric
    bound = count_error_bound(eps, beta=0.05)
    assert (np.abs(total) >= bound).mean() <= 0.05 + 0.015


def test_fleet_counts_within_stated_bound():
    rng = np.random.default_rng(1)
    n_boxes, k, eps, beta = 2000, 6, 1.0, 0.01
    centroids = rng.normal(size=(k, 8))
    prefs = centroids[rng.integers(0, k, n_boxes)] + 0.3 * rng.normal(size=(n_boxes, 8))
    segments = np.array([assign_segment(p, centroids) for p in prefs])
    exact = np.bincount(segments, minlength=k)
    noisy = sum(box_report(s, k, n_boxes, eps, rng) for s in segments)  # the securely aggregated sum
    assert noisy.dtype == np.int64 and noisy.shape == (k,)
    assert np.all(np.abs(noisy - exact) < count_error_bound(eps, beta))


def test_hll_distinct_boxes_within_bounds_and_mergeable():
    ids = [f"{i:032x}" for i in range(20_000)]
    halves = [[box_sketch(i) for i in ids[:12_000]], [box_sketch(i) for i in ids[8_000:]]]  # overlap 4,000
    est = merge_sketches(halves[0] + halves[1])
    assert est.lower <= 20_000 <= est.upper
    assert abs(est.estimate - 20_000) / 20_000 < 0.05
    blob = box_sketch(ids[0])
    assert ids[0].encode() not in blob and len(blob) < 64  # a hash register, not the id
