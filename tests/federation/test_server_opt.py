"""The server's step on the DP release (`server_opt`) and the tuning replay (`tune`)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.federation.server_opt import ServerOptimizer


class ZeroNoise:
    def normal(self, loc, scale, size):
        return np.zeros(size)


def test_sgd_moves_only_the_released_coordinates_by_lr_times_the_mean():
    opt = ServerOptimizer(6, kind="sgd", lr=5.0)
    theta = np.arange(6, dtype=np.float64)
    out = opt.step(theta, np.array([1, 4]), np.array([0.1, -0.2]), server_round=1)
    np.testing.assert_allclose(out, [0, 1.5, 2, 3, 3.0, 5])
    np.testing.assert_array_equal(theta, np.arange(6))  # not modified in place


def test_momentum_keeps_state_per_coordinate_and_only_where_a_round_released():
    opt = ServerOptimizer(3, kind="momentum", lr=1.0, beta1=0.5)
    th = np.zeros(3)
    th = opt.step(th, np.array([0, 1]), np.array([1.0, 1.0]), 1)
    np.testing.assert_allclose(th, [1, 1, 0])
    th = opt.step(th, np.array([0, 2]), np.array([1.0, 1.0]), 2)
    # coordinate 0: buffer 0.5 * 1 + 1 = 1.5; coordinate 1 sat out (no step, buffer kept); 2: first step
    np.testing.assert_allclose(th, [2.5, 1, 1])
    th = opt.step(th, np.array([1]), np.array([0.0]), 3)
    np.testing.assert_allclose(th, [2.5, 1.5, 1])  # the kept buffer of coordinate 1, decayed once


def test_adam_steps_are_bounded_by_lr_and_scale_with_the_noise_level():
    opt = ServerOptimizer(3, kind="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1.0)
    std = 0.01
    th = opt.step(np.zeros(3), np.arange(3), np.array([10.0, 0.01, -0.001]), 1, noise_std=std)
    # first step (bias-corrected): lr * u / (|u| + tau * std)
    np.testing.assert_allclose(th, 0.1 * np.array([10 / 10.01, 0.01 / 0.02, -0.001 / 0.011]))
    for r in range(2, 30):
        prev = th
        th = opt.step(th, np.arange(3), np.array([10.0, 0.01, -0.001]), r, noise_std=std)
        assert np.all(np.abs(th - prev) <= 0.1 + 1e-12)


def test_tail_average_is_published_and_the_iterates_are_untouched():
    opt = ServerOptimizer(2, kind="sgd", lr=1.0, average_from=2)
    th = np.zeros(2)
    heads = []
    for r in range(1, 5):
        th = opt.step(th, np.array([0]), np.array([1.0]), r)
        heads.append(th)
    np.testing.assert_allclose(th, [4, 0])
    np.testing.assert_allclose(opt.published(th), np.mean(heads[1:], axis=0))  # rounds 2, 3, 4
    assert np.array_equal(ServerOptimizer(2).published(th), th)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        ServerOptimizer(2, kind="yogi")
    with pytest.raises(ValueError):
        ServerOptimizer(2, kind="adam", tau=0.0)
    with pytest.raises(ValueError):
        ServerOptimizer(2, beta1=1.0)


def test_the_servers_round_uses_the_optimiser():
    pytest.importorskip("flwr")
    from appliance.federation.flower_app import RunSettings, SubsetFedAvg
    from appliance.federation.model import round_subset

    s = RunSettings(rounds=2, n_items=40, dim=8, rank=2, compression=2.0, server_lr=2.0, server_opt="momentum",
                    server_beta1=0.5, average_from=2)
    inner = SubsetFedAvg(s, s.shape.initial())
    k = inner.k
    t0 = inner.theta.copy()
    inner.apply(1, np.ones(k))
    i1 = round_subset(s.shape.n_params, k, 1, s.run_seed)
    np.testing.assert_allclose(inner.theta[i1] - t0[i1], 2.0)
    h1 = inner.theta.copy()
    inner.apply(2, np.ones(k))
    i2 = round_subset(s.shape.n_params, k, 2, s.run_seed)
    both = np.intersect1d(i1, i2)
    np.testing.assert_allclose(inner.theta[both] - h1[both], 2.0 * 1.5)  # momentum carried over
    np.testing.assert_allclose(inner.published, inner.theta)  # average of round 2's head only


@pytest.mark.parametrize("federated_titles", [0, 20])
def test_the_replay_matches_a_flower_run_of_the_same_settings(quiet_flower, federated_titles):
    """tune.replay does the run's arithmetic: with (almost) no noise and no packing it lands on the head
    the real ServerApp/ClientApps (SecAgg+, clipping) produce, up to SecAgg+'s quantisation; with only the
    20 most watched titles' biases federated, the others stay at the start in both."""
    pytest.importorskip("flwr")
    from appliance.federation.flower_app import RunSettings, make_client_app, run_server
    from appliance.federation.local_grid import LocalGrid
    from appliance.federation.simulate import FleetData
    from appliance.federation.tune import Setting, replay

    rng = np.random.default_rng(3)
    n_items, d, n_feat = 40, 8, 3
    items = rng.normal(size=(n_items, d))
    feats = rng.uniform(-1, 1, size=(n_items, n_feat))
    boxes = [(rng.normal(size=(12, d)), rng.integers(0, 6, size=12)) for _ in range(4)]
    pop = rng.random(n_items)
    data = FleetData(items, boxes, np.zeros((4, d)), [np.zeros(0, np.int64)] * 4, np.zeros(4, np.int64),
                     feats, pop)
    st = Setting(rounds=3, noise_multiplier=1.0, clip=0.5, compression=2.0, pack=1, always_popular=5, rank=2,
                 lr=0.5, lr_adapter=0.05, lr_features=0.5, server_lr=2.0, server_opt="momentum", server_beta1=0.5,
                 federated_titles=federated_titles)
    head, info = replay(data, st, noise_seed=0, noise=ZeroNoise())
    fixed = np.sort(np.argsort(-pop, kind="stable")[:5])
    fed_rows = np.sort(np.argsort(-pop, kind="stable")[:federated_titles])
    s = RunSettings(rounds=3, noise_multiplier=1.0, epsilon=1e9, clip=0.5, population=4, cohort=4, sampling="full", compression=2.0,
                    always_rows=",".join(map(str, fixed)),
                    federated_rows=",".join(map(str, fed_rows)), n_items=n_items, dim=d, rank=2, n_feat=n_feat, lr=0.5,
                    lr_adapter=0.05, lr_features=0.5, server_lr=2.0, server_opt="momentum", server_beta1=0.5,
                    timeout=5)
    f32 = feats.astype(np.float32)
    app = make_client_app(lambda cfg: (boxes[int(cfg["box"])][0].astype(np.float32), boxes[int(cfg["box"])][1],
                                       items.astype(np.float32), None, f32))
    grid = LocalGrid(app, [{"box": i} for i in range(4)], s.to_run_config())
    res = run_server(grid, grid.server_context(), rng=ZeroNoise())
    assert len(res.rounds) == 3 and info["subset_k"] == res.subset_k
    theta0 = s.shape.initial()
    assert np.abs(res.head - theta0).max() > 1e-2
    np.testing.assert_allclose(head, res.head, atol=2e-4)
    if federated_titles:
        frozen = np.setdiff1d(np.arange(n_items), fed_rows)
        assert res.subset_k < 40 and np.abs(res.head[fed_rows] - theta0[fed_rows]).max() > 1e-3
        np.testing.assert_array_equal(res.head[frozen], theta0[frozen])
        np.testing.assert_array_equal(head[frozen], theta0[frozen])


def test_per_part_server_step_sizes():
    pytest.importorskip("flwr")
    from appliance.federation.flower_app import RunSettings, server_lrs

    s = RunSettings(n_items=5, dim=2, rank=1, n_feat=3, server_lr=4.0, server_lr_features=0.5)
    lr = server_lrs(s)
    np.testing.assert_allclose(lr, [4.0] * 5 + [4.0] * 4 + [0.5] * 3)
    assert server_lrs(RunSettings(n_items=5, dim=2, server_lr=4.0)) == 4.0
    frozen = server_lrs(RunSettings(n_items=5, dim=2, rank=1, n_feat=3, server_lr=4.0, server_lr_features=0.0))
    np.testing.assert_allclose(frozen, [4.0] * 9 + [0.0] * 3)
    opt = ServerOptimizer(12, lr=lr)
    out = opt.step(np.zeros(12), np.array([0, 11]), np.array([1.0, 1.0]), 1)
    assert out[0] == 4.0 and out[11] == 0.5
    with pytest.raises(ValueError):
        ServerOptimizer(11, lr=lr)


def test_always_in_coordinates_are_public_and_every_round():
    from appliance.federation.model import HeadShape, round_subset
    from appliance.federation.tune import always_in

    shape = HeadShape(n_items=50, dim=4, rank=2, n_feat=3)
    pop = np.arange(50, dtype=np.float64)  # title 49 the most watched
    fixed = always_in(shape, pop, 5, True)
    adapter = np.arange(50, 50 + 16)
    np.testing.assert_array_equal(fixed, np.r_[45:50, adapter])
    assert always_in(shape, pop, 0, False) is None
    for r in range(1, 6):
        idx = round_subset(shape.n_params, 30, r, run_seed=7, always=shape.n_feat, fixed=fixed)
        assert len(idx) == 30 and np.isin(fixed, idx).all() and np.isin(np.arange(66, 69), idx).all()


def test_tune_defaults_are_simulates():
    """tune.Setting's knobs default to `simulate`'s (max_examples included: tune loads the fleet with it)."""
    import inspect

    from appliance.federation.simulate import simulate
    from appliance.federation.tune import Setting

    params = inspect.signature(simulate).parameters
    for name in ("rounds", "clip", "compression", "pack", "always_popular", "federated_titles", "rank",
                 "max_examples", "local_epochs", "lr_adapter", "lr_features"):
        assert getattr(Setting(), name) == params[name].default, name
