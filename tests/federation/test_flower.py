"""Flower federation, in process (LocalGrid): SecAgg+ with client-side clipping and central DP noise.

The ServerApp body, the ClientApp and its mods are Flower's real code; only the transport is the
in-process grid (every message still goes through Flower's protobuf serialisation)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from appliance.federation.flower_app import RunSettings, make_client_app, run_server  # noqa: E402
from appliance.federation.local_grid import LocalGrid  # noqa: E402
from appliance.federation.model import DENSE_BYTES_PER_PARAM, HeadShape, client_update, round_subset  # noqa: E402


class ZeroNoise:
    """Stands in for the DP noise generator where a test checks the aggregate itself."""

    def normal(self, loc, scale, size):
        return np.zeros(size)


pytestmark = pytest.mark.usefixtures("quiet_flower")


def _fleet(n_boxes, n_items=40, d=8, n=30, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, d))
    return items, {b: (rng.normal(size=(n, d)), rng.integers(0, 5, size=n), items) for b in range(n_boxes)}


def _grid(data, settings, **kw):
    app = make_client_app(lambda cfg: data[int(cfg["partition-id"])])
    return LocalGrid(app, [{"partition-id": i} for i in range(len(data))], settings.to_run_config(), **kw)


def _expected_mean(settings, data, boxes, theta, server_round, k):
    shape = settings.shape
    theta32 = theta.astype(np.float32).astype(np.float64)  # what the boxes receive
    subs = [client_update(shape, theta32, *data[b], server_round=server_round, run_seed=settings.run_seed,
                          k=k, clip=settings.clip, lr=settings.lr, lr_adapter=settings.lr_adapter,
                          epochs=settings.local_epochs,
                          batch=settings.batch, seed=server_round)[0] for b in boxes]
    return np.mean(subs, axis=0)


def test_secure_aggregate_is_the_mean_of_the_clipped_updates():
    items, data = _fleet(4)
    s = RunSettings(rounds=1, epsilon=50.0, clip=0.5, population=4, cohort=4, n_items=40, dim=8, rank=2,
                    compression=2.0, timeout=5)
    grid = _grid(data, s)
    res = run_server(grid, grid.server_context(), rng=ZeroNoise())
    assert not grid.errors
    assert [(r.round, r.sampled, r.survivors) for r in res.rounds] == [(1, 4, 4)]
    theta0 = s.shape.initial(seed=s.head_seed)
    idx = round_subset(s.shape.n_params, res.subset_k, 1, s.run_seed)
    expected = _expected_mean(s, data, range(4), theta0, 1, res.subset_k)
    assert np.abs(expected).max() > 1e-3
    # SecAgg+ quantisation (2C / 2^22 per box) is all that separates the two
    np.testing.assert_allclose(res.head[idx] - theta0[idx], expected, atol=1e-5)
    untouched = np.setdiff1d(np.arange(s.shape.n_params), idx)
    np.testing.assert_array_equal(res.head[untouched], theta0[untouched])


def test_round_completes_when_30_percent_drop_after_sharing_keys():
    items, data = _fleet(10)
    s = RunSettings(rounds=1, epsilon=50.0, clip=0.5, population=10, cohort=10, n_items=40, dim=8, rank=2,
                    compression=2.0, num_shares=1.0, reconstruction_threshold=0.5, timeout=5)
    dropped = [1002, 1005, 1007]                                # node ids of boxes 2, 5, 7
    grid = _grid(data, s, drop_from={nid: "collect_masked_vectors" for nid in dropped})
    res = run_server(grid, grid.server_context(), rng=ZeroNoise())
    assert [(r.sampled, r.survivors) for r in res.rounds] == [(10, 7)]
    # the dropped boxes did share their keys, then sent nothing
    assert all(grid.wire.upload_per_box("1", "share_keys").get(nid) for nid in dropped)
    assert not any(grid.wire.upload_per_box("1", "collect_masked_vectors").get(nid) for nid in dropped)
    theta0 = s.shape.initial(seed=s.head_seed)
    idx = round_subset(s.shape.n_params, res.subset_k, 1, s.run_seed)
    survivors = [b for b in range(10) if 1000 + b not in dropped]
    expected = _expected_mean(s, data, survivors, theta0, 1, res.subset_k)
    np.testing.assert_allclose(res.head[idx] - theta0[idx], expected, atol=1e-5)


def test_a_round_that_loses_too_many_boxes_releases_nothing_and_spends_nothing():
    items, data = _fleet(4)
    s = RunSettings(rounds=1, epsilon=50.0, clip=0.5, population=4, cohort=4, n_items=40, dim=8, rank=2,
                    compression=2.0, num_shares=1.0, reconstruction_threshold=0.75, timeout=5)
    grid = _grid(data, s, drop_from={1001: "collect_masked_vectors", 1002: "collect_masked_vectors"})
    res = run_server(grid, grid.server_context())
    assert res.rounds == [] and res.epsilon == 0.0      # SecAgg+ halted: no aggregate, no noise, no epsilon
    np.testing.assert_array_equal(res.head, s.shape.initial(seed=s.head_seed))


def test_cohort_too_large_for_the_secagg_modulus_is_refused():
    from appliance.federation.flower_app import secagg_workflow

    with pytest.raises(ValueError, match="modulus"):
        secagg_workflow(RunSettings(population=2000, cohort=1500, n_items=4, dim=2))
    secagg_workflow(RunSettings(population=2000, cohort=1500, n_items=4, dim=2, quantization_range=2**21))


def test_noise_is_scaled_to_the_survivors():
    items, data = _fleet(4)
    s = RunSettings(rounds=1, noise_multiplier=3.0, epsilon=100.0, clip=0.5, population=4, cohort=4,
                    n_items=40, dim=8, rank=2, compression=2.0, timeout=5)
    grid = _grid(data, s, drop_from={1003: "collect_masked_vectors"})
    res = run_server(grid, grid.server_context())
    (r,) = res.rounds
    assert r.survivors == 3 and r.noise_std == pytest.approx(3.0 * 0.5 / 3)


def test_full_participation_releases_the_sum_over_the_planned_cohort():
    # everyone every round: the denominator is the planned cohort (public), not the survivors, so one box
    # more or less moves the release by at most C / m, the sensitivity the "full" accounting assumes
    items, data = _fleet(4)
    s = RunSettings(rounds=1, noise_multiplier=3.0, epsilon=100.0, clip=0.5, population=4, cohort=4,
                    sampling="full", n_items=40, dim=8, rank=2, compression=2.0, timeout=5)
    grid = _grid(data, s, drop_from={1003: "collect_masked_vectors"})
    res = run_server(grid, grid.server_context(), rng=ZeroNoise())
    (r,) = res.rounds
    assert r.survivors == 3 and r.noise_std == pytest.approx(3.0 * 0.5 / 4)
    theta0 = s.shape.initial(seed=s.head_seed)
    idx = round_subset(s.shape.n_params, res.subset_k, 1, s.run_seed)
    survivors_mean = _expected_mean(s, data, range(3), theta0, 1, res.subset_k)
    np.testing.assert_allclose(res.head[idx] - theta0[idx], survivors_mean * 3 / 4, atol=1e-5)
    with pytest.raises(ValueError, match="cohort must equal population"):
        bad = RunSettings(rounds=1, epsilon=2.0, population=4, cohort=3, sampling="full", n_items=40, dim=8)
        run_server(_grid(data, bad), _grid(data, bad).server_context())


def test_run_stops_when_the_budget_is_spent():
    items, data = _fleet(3)
    # z = 2, everyone every round (replace-one): epsilon 4.75 after one round, 7.09 after two, 9.09 after three
    s = RunSettings(rounds=5, noise_multiplier=2.0, epsilon=7.5, clip=0.5, population=3, cohort=3,
                    n_items=40, dim=8, rank=2, compression=2.0, timeout=5)
    grid = _grid(data, s)
    res = run_server(grid, grid.server_context())
    assert res.stopped == "budget"
    assert len(res.rounds) == 2 and res.epsilon <= 7.5
    assert [r.epsilon for r in res.rounds] == sorted(r.epsilon for r in res.rounds)


def test_calibrated_run_spends_at_most_its_budget(tmp_path):
    items, data = _fleet(3)
    s = RunSettings(rounds=3, epsilon=2.0, delta=1e-5, clip=0.5, population=3, cohort=3, n_items=40, dim=8,
                    rank=2, compression=2.0, timeout=5, out_dir=str(tmp_path))
    grid = _grid(data, s)
    res = run_server(grid, grid.server_context())
    assert len(res.rounds) == 3 and res.stopped == "" and res.epsilon <= 2.0
    assert (tmp_path / "result.json").exists() and np.load(tmp_path / "head.npy").shape == (s.shape.n_params,)


@pytest.mark.parametrize("pack", [1, 2])
def test_upload_of_the_bundle_head_is_over_10x_smaller_than_dense(pack):
    # the real head's size (MovieLens-small bundle: 9,742 titles, d = 64, rank 4), three boxes
    rng = np.random.default_rng(1)
    n_items, d = 9742, 64
    items = rng.normal(scale=0.1, size=(n_items, d)).astype(np.float32)
    data = {b: (rng.normal(size=(8, d)), rng.integers(0, n_items, size=8), items) for b in range(3)}
    s = RunSettings(rounds=1, epsilon=50.0, clip=0.5, population=3, cohort=3, n_items=n_items, dim=d, rank=4,
                    compression=16.0, timeout=10, local_epochs=1, pack=pack)
    grid = _grid(data, s)
    res = run_server(grid, grid.server_context())
    assert res.rounds and res.federated_params == HeadShape(n_items, d, 4).n_params == 10254
    assert res.subset_k == pack * res.upload_ints      # packing: the same upload moves pack x the coordinates
    dense = res.federated_params * DENSE_BYTES_PER_PARAM
    vector = grid.wire.upload_per_box("1", "collect_masked_vectors")   # the masked update message
    total = grid.wire.upload_per_box("1")                               # + keys, shares, unmasking
    assert len(vector) == 3
    for nid in vector:
        assert dense / vector[nid] >= 10.0, (dense, vector[nid])
        # the SecAgg+ key agreement adds a per-round cost that grows with num_shares, not with the head
        assert total[nid] - vector[nid] < 4000, (total[nid], vector[nid])


def test_cli_simulate_on_a_few_movielens_users(tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from appliance.cli import app
    from tests.conftest import shared_path

    ratings = shared_path("datasets", "movielens-small", "ratings.csv")
    bundle = Path(__file__).resolve().parents[2] / "models" / "ranker"
    if not (bundle / "sequence.onnx").exists():
        pytest.skip("no ranking bundle with a sequence model")
    out = tmp_path / "sim.json"
    res = CliRunner().invoke(app, ["federation", "simulate", "--interactions", str(ratings), "--bundle",
                                   str(bundle), "--start-bundle", str(bundle), "--nodes", "4", "--rounds", "1", "--epsilon", "2",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    import json

    r = json.loads(out.read_text())
    for key in ("epsilon", "delta", "rounds", "nodes", "federated_params", "ours_federated_dp.NDCG@10",
                "centralized.NDCG@10", "start_only.NDCG@10", "upload_bytes_per_client_round",
                "dense_bytes_per_client_round", "dropout_rate"):
        assert key in r
    assert r["nodes"] == 4 and r["rounds"] == 1 and r["epsilon"] <= 2.0
    assert r["federated_params"] == 9742 + 2 * 64 * 4 + 38 == 10292   # title bias + adapter + feature weights
    assert r["federated_parts"] == {"title_bias": 9742, "query_adapter": 512, "feature_weights": 38}
    assert r["dense_bytes_per_client_round"] / r["upload_bytes_per_client_round"] >= 10


def test_the_server_only_ever_sees_masked_updates_and_no_metrics():
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    items, data = _fleet(4)
    s = RunSettings(rounds=1, epsilon=50.0, clip=0.5, population=4, cohort=4, n_items=40, dim=8, rank=2,
                    compression=2.0, timeout=5)
    grid = _grid(data, s, keep_raw=True)
    res = run_server(grid, grid.server_context(), rng=ZeroNoise())
    theta32 = s.shape.initial(seed=s.head_seed).astype(np.float32).astype(np.float64)
    seen = 0
    for nid, _, stage, raw in grid.wire.raw_uploads:
        proto = ProtoMessage()
        proto.ParseFromString(raw)
        msg = message_from_proto(proto)
        assert not any(len(r) for r in msg.content.array_records.values())  # no parameters in clear
        if stage != "collect_masked_vectors":
            continue
        seen += 1
        metrics = msg.content.config_records["fitres.metrics"]
        assert dict(metrics) == {}                                            # nothing said about the box
        assert msg.content.metric_records["fitres.num_examples"]["num_examples"] == 1
        masked = [bytes_to_ndarray(b) for b in msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        as_if_clear = dequantize(masked[1:], s.clip, s.quantization_range)[0]
        own = client_update(s.shape, theta32, *data[nid - 1000], server_round=1, run_seed=s.run_seed,
                            k=res.subset_k, clip=s.clip, lr=s.lr, lr_adapter=s.lr_adapter,
                            epochs=s.local_epochs, batch=s.batch,
                            seed=1)[0]
        assert np.abs(as_if_clear).max() > 100 * s.clip          # masked values span the whole modulus
        assert abs(np.corrcoef(as_if_clear, own)[0, 1]) < 0.9    # and carry no visible trace of the update
    assert seen == 4
