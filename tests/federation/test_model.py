"""The federated head: size, identity start, gradients, local training, clipping, aligned subsets."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.federation.model import (
    DENSE_BYTES_PER_PARAM,
    SECAGG_BYTES_PER_PARAM,
    HeadShape,
    client_update,
    clip_l2,
    examples_from_history,
    frozen_titles,
    head_scores,
    local_train,
    loss_and_grad,
    n_federated,
    round_subset,
    subset_size,
)


def _toy(n_items=50, d=8, n=40, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, d))
    queries = rng.normal(size=(n, d))
    targets = rng.integers(0, 5, size=n)  # a "fleet" that likes the first five titles
    return items, queries, targets


def test_parameter_count_of_the_bundle_head():
    shape = HeadShape(n_items=9742, dim=64, rank=4)
    assert shape.n_params == 9742 + 2 * 64 * 4 == 10254


def test_identity_start_scores_like_the_bundle():
    items, queries, _ = _toy()
    shape = HeadShape(len(items), items.shape[1], rank=3)
    theta = shape.initial(seed=1)
    np.testing.assert_allclose(head_scores(shape, theta, queries, items), queries @ items.T)


def test_gradient_matches_finite_differences():
    items, queries, targets = _toy(n_items=12, d=5, n=7)
    shape = HeadShape(12, 5, rank=2)
    rng = np.random.default_rng(3)
    theta = rng.normal(scale=0.3, size=shape.n_params)
    _, grad = loss_and_grad(shape, theta, queries, targets, items)
    eps = 1e-6
    for i in rng.choice(shape.n_params, size=15, replace=False):
        e = np.zeros_like(theta)
        e[i] = eps
        num = (loss_and_grad(shape, theta + e, queries, targets, items)[0]
               - loss_and_grad(shape, theta - e, queries, targets, items)[0]) / (2 * eps)
        assert grad[i] == pytest.approx(num, rel=1e-4, abs=1e-7)


def test_local_training_lowers_the_loss_and_leaves_the_input_alone():
    items, queries, targets = _toy()
    shape = HeadShape(len(items), items.shape[1])
    theta = shape.initial()
    before = theta.copy()
    new = local_train(shape, theta, queries, targets, items, lr=0.5, epochs=3)
    np.testing.assert_array_equal(theta, before)
    assert (loss_and_grad(shape, new, queries, targets, items)[0]
            < loss_and_grad(shape, theta, queries, targets, items)[0] - 0.1)


def test_clip_scales_down_never_up():
    v = np.array([3.0, 4.0])
    clipped, norm = clip_l2(v, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.linalg.norm(clipped) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped / np.linalg.norm(clipped), v / 5.0)  # direction kept
    small, _ = clip_l2(np.array([0.1, 0.0]), 1.0)
    np.testing.assert_array_equal(small, [0.1, 0.0])
    np.testing.assert_array_equal(clip_l2(np.zeros(3), 1.0)[0], np.zeros(3))
    with pytest.raises(ValueError):
        clip_l2(v, 0.0)


def test_round_subset_is_aligned_across_boxes_and_changes_per_round():
    n, k = 10254, 320
    a = round_subset(n, k, server_round=3, run_seed=7)
    b = round_subset(n, k, server_round=3, run_seed=7)   # another box, same public inputs
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == k and a.min() >= 0 and a.max() < n and np.all(np.diff(a) > 0)
    c = round_subset(n, k, server_round=4, run_seed=7)
    assert len(np.intersect1d(a, c)) == 0                # a fresh block each round
    assert not np.array_equal(a, round_subset(n, k, server_round=3, run_seed=8))
    # every coordinate gets its turn once per ceil(n / k) rounds, then once again, never twice in a round
    seen = np.zeros(1000, dtype=int)
    for r in range(1, 21):                                # 20 rounds x 50 = one full pass
        seen[round_subset(1000, 50, r, 7)] += 1
    assert seen.min() == seen.max() == 1
    seen[:] = 0
    for r in range(1, 15):                                # k does not divide n: 14 blocks per pass
        seen[round_subset(1000, 70, r, 7)] += 1
    assert seen.max() == 1 and seen.sum() == 980


def test_aligned_subset_sum_equals_subset_of_sum():
    # what secure aggregation computes (sum of the boxes' sub-vectors) is the subset of the dense sum
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(5, 1000))
    idx = round_subset(1000, 40, 2, 11)
    np.testing.assert_allclose(sum(d[idx] for d in deltas), deltas.sum(axis=0)[idx])


def test_subset_size_meets_the_compression_target():
    n = HeadShape(9742, 64, 4).n_params
    for ratio in (10, 16, 32):
        k = subset_size(n, ratio)
        upload = (k + 1) * SECAGG_BYTES_PER_PARAM   # + the weight coordinate SecAgg+ prepends
        assert n * DENSE_BYTES_PER_PARAM / upload >= ratio
    assert subset_size(n, 16) == 319


def test_client_update_is_clipped_and_on_the_subset():
    items, queries, targets = _toy()
    shape = HeadShape(len(items), items.shape[1])
    theta = shape.initial()
    k = 20
    sub, norm = client_update(shape, theta, queries, targets, items, server_round=1, run_seed=5, k=k,
                              clip=0.05, lr=0.5, epochs=2)
    assert sub.shape == (k,) and norm > 0.05
    assert np.linalg.norm(sub) == pytest.approx(0.05)
    full = local_train(shape, theta, queries, targets, items, lr=0.5, epochs=2) - theta
    idx = round_subset(shape.n_params, k, 1, 5)
    np.testing.assert_allclose(sub, full[idx] * 0.05 / np.linalg.norm(full[idx]))


def test_examples_from_history_keeps_the_newest():
    pairs = examples_from_history(np.array([4, 2, 9, 7]), max_examples=2)
    assert [(p.tolist(), t) for p, t in pairs] == [([4, 2], 9), ([4, 2, 9], 7)]


def test_feature_weights_gradient_and_every_round_subset():
    items, queries, targets = _toy(n_items=12, d=5, n=7)
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(12, 3))
    shape = HeadShape(12, 5, rank=2, n_feat=3)
    assert shape.n_params == 12 + 20 + 3
    theta = rng.normal(scale=0.3, size=shape.n_params)
    np.testing.assert_allclose(shape.bias(theta, feats), theta[:12] + feats @ theta[-3:])
    _, grad = loss_and_grad(shape, theta, queries, targets, items, features=feats)
    eps = 1e-6
    for i in [*range(shape.n_params - 3, shape.n_params), 0, 13, 25]:
        e = np.zeros_like(theta)
        e[i] = eps
        num = (loss_and_grad(shape, theta + e, queries, targets, items, features=feats)[0]
               - loss_and_grad(shape, theta - e, queries, targets, items, features=feats)[0]) / (2 * eps)
        assert grad[i] == pytest.approx(num, rel=1e-4, abs=1e-7)
    # the feature weights are in every round's subset; the rest rotates in disjoint blocks
    seen = np.zeros(1000, dtype=int)
    for r in range(1, 11):
        sub = round_subset(1000, 60, r, 3, always=10)
        assert len(np.unique(sub)) == 60 and set(range(990, 1000)) <= set(sub.tolist())
        seen[sub] += 1
    assert (seen[990:] == 10).all() and seen[:990].max() == 1 and seen[:990].sum() == 500


def test_soft_threshold_is_the_identity_at_zero_and_shrinks_towards_zero():
    from appliance.federation.flower_app import soft_threshold

    x = np.array([-3.0, -0.5, 0.0, 0.2, 2.0])
    np.testing.assert_array_equal(soft_threshold(x, 0.0), x)
    np.testing.assert_allclose(soft_threshold(x, 1.0), [-2.0, 0.0, 0.0, 0.0, 1.0])


def test_fixed_coordinates_are_in_every_round_and_the_rest_rotate():
    n, k, always = 500, 60, 8
    fixed = np.array([3, 77, 150, 151, 400])
    seen = set()
    for r in range(1, 30):
        idx = round_subset(n, k, r, run_seed=5, always=always, fixed=fixed)
        assert len(idx) == k and len(set(idx.tolist())) == k and np.all(np.diff(idx[:-always]) > 0)
        assert set(fixed.tolist()) <= set(idx.tolist()) and set(range(n - always, n)) <= set(idx.tolist())
        np.testing.assert_array_equal(idx, round_subset(n, k, r, run_seed=5, always=always, fixed=fixed))
        seen |= set(idx.tolist())
    assert len(seen) > 0.9 * n                                   # the others still rotate through
    # without fixed coordinates the subsets are the ones the earlier runs used
    np.testing.assert_array_equal(round_subset(n, k, 4, 5, always=always),
                                  round_subset(n, k, 4, 5, always=always, fixed=np.zeros(0, dtype=np.int64)))
    with pytest.raises(ValueError):
        round_subset(n, k, 1, 5, always=always, fixed=np.arange(n - 3, n))  # inside the `always` block
    with pytest.raises(ValueError):
        round_subset(n, k, 1, 5, always=always, fixed=np.arange(k))          # leaves nothing to rotate


def test_frozen_title_biases_are_never_sent_nor_trained():
    shape = HeadShape(n_items=40, dim=6, rank=2, n_feat=3)
    pop = np.arange(40, dtype=float)[::-1]                     # title 0 the most watched
    frozen = frozen_titles(shape, pop, 10)
    np.testing.assert_array_equal(frozen, np.arange(10, 40))
    assert frozen_titles(shape, pop, 0) is None and frozen_titles(shape, pop, 40) is None
    assert n_federated(shape, frozen) == shape.n_params - 30 and n_federated(shape, None) == shape.n_params
    k = 12
    for r in range(1, 15):
        idx = round_subset(shape.n_params, k, r, run_seed=1, always=shape.n_feat, fixed=np.array([0, 1]), frozen=frozen)
        assert len(idx) == k and not set(idx.tolist()) & set(frozen.tolist())
    # without frozen coordinates the subsets are the ones the earlier runs used
    np.testing.assert_array_equal(round_subset(shape.n_params, k, 3, 1, always=shape.n_feat),
                                  round_subset(shape.n_params, k, 3, 1, always=shape.n_feat, frozen=None))
    with pytest.raises(ValueError):
        round_subset(shape.n_params, k, 1, 1, always=shape.n_feat, fixed=np.array([12]), frozen=frozen)
    rng = np.random.default_rng(0)
    items = rng.normal(size=(40, 6))
    q, t = rng.normal(size=(20, 6)), rng.integers(0, 40, size=20)
    theta = shape.initial(seed=0)
    new = local_train(shape, theta, q, t, items, lr=1.0, frozen=frozen, features=rng.normal(size=(40, 3)))
    np.testing.assert_array_equal(new[frozen], theta[frozen])
    assert np.abs(new[:10] - theta[:10]).max() > 0
