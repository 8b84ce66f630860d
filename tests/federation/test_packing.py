"""Packing several quantised values per SecAgg+ integer (`federation.packing`): exact through a masked
modular sum, refused when it would overflow, norm-preserving for the DP sensitivity, and end to end
through Flower's real SecAgg+ (the aggregate equals the sum of the boxes' dequantised updates)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.federation import packing
from appliance.federation.packing import INT_OFFSET, INT_RANGE, PackSpec, plan

RNG = np.random.default_rng(0)


def test_plan_for_the_fleet_packs_two_10_bit_values_with_10_headroom_bits():
    spec = plan(2, 610, 0.25)
    assert (spec.fields, spec.bits, spec.headroom, spec.shift) == (2, 10, 10, 20)
    assert 610 * spec.top < 2**spec.shift              # the sum of every box's field never carries
    assert spec.max_packed <= INT_RANGE < 2**31         # Flower's quantiser casts to int32
    assert spec.modulus >= (610 + 1) * INT_RANGE and spec.modulus.bit_length() - 1 <= packing.MAX_EXACT_BITS


@pytest.mark.parametrize("fields,boxes", [(2, 610), (2, 1024), (3, 4), (2, 3), (1, 610)])
def test_unpacked_sum_of_extreme_values_equals_the_sum_of_unpacked_values(fields, boxes):
    spec = plan(fields, boxes, 0.25)
    k = 101
    for trial in range(20):
        # at the extremes of the range (all top / all zero) and random in between
        if trial == 0:
            u = np.full((boxes, k), spec.top)
        elif trial == 1:
            u = np.zeros((boxes, k), dtype=np.int64)
        else:
            u = RNG.choice([0, spec.top, *RNG.integers(0, spec.top + 1, size=3)], size=(boxes, k))
        packed = np.stack([packing.pack(row, spec) for row in u])
        assert packed.max() <= spec.max_packed <= INT_RANGE
        # the masked modular sum, as SecAgg+ forms it: random masks that cancel, everything mod M
        m = spec.modulus
        masks = RNG.integers(0, m, size=packed.shape, dtype=np.int64)
        masks[-1] = (-masks[:-1].sum(axis=0)) % m
        masked = (packed + masks) % m
        total = masked.sum(axis=0) % m
        np.testing.assert_array_equal(packing.unpack(total, k, spec), u.sum(axis=0))


def test_refuses_packings_that_would_overflow():
    with pytest.raises(ValueError, match="headroom bits"):
        plan(3, 610, 0.25)                # 3 x (q + 10) bits in 31: q would be 0
    with pytest.raises(ValueError, match="headroom bits"):
        plan(4, 100, 0.25)
    with pytest.raises(ValueError, match="exact range"):
        plan(1, 2**20, 0.25)              # the weight coordinate alone overflows 2^48
    spec = plan(2, 10, 0.25)
    with pytest.raises(ValueError, match="headroom"):
        packing.unpack_mean(np.zeros(3), 11, 6, spec)  # more boxes than the fields have room for
    with pytest.raises(ValueError, match=r"\[0, "):
        packing.pack(np.array([spec.top + 1]), spec)
    with pytest.raises(ValueError, match="clip norm"):
        packing.check_norm_room(PackSpec(2, 6, 10, 610, 0.25), 5000, 0.25)


def test_encode_keeps_the_dequantised_update_within_the_clip_norm_and_is_unbiased():
    spec = plan(2, 610, 0.25)
    k = 854
    x = RNG.normal(size=k)
    x *= 0.25 / np.linalg.norm(x)                     # a box clipped exactly at C
    rng = np.random.default_rng(1)
    outs = []
    for _ in range(200):
        v = packing.encode(x, spec, 0.25, rng)
        assert v.shape == (427,) and np.all(v == np.rint(v))
        y = packing.dequantise(packing.unpack(v.astype(np.int64) + INT_OFFSET, k, spec), spec)
        assert np.linalg.norm(y) <= 0.25
        outs.append(y)
    mean = np.mean(outs, axis=0)
    # unbiased up to the small shrink that keeps the norm (sqrt(C^2 - k step^2) / C)
    assert np.abs(mean - x).max() < 6 * spec.step / np.sqrt(200) + 0.01 * np.abs(x).max()
    with pytest.raises(ValueError, match="clip before packing"):
        packing.encode(x * 1.01, spec, 0.25, rng)


def test_encoded_values_pass_flowers_quantiser_one_to_one():
    from flwr.common.secure_aggregation.quantization import quantize

    spec = plan(2, 610, 0.25)
    packed = np.array([0, 1, spec.max_packed, spec.max_packed - 1, 12345678], dtype=np.int64)
    v = (packed - INT_OFFSET).astype(np.float64)
    for _ in range(20):  # stochastic rounding never moves an integer
        np.testing.assert_array_equal(quantize([v], float(INT_OFFSET), INT_RANGE)[0], packed)


def test_unpack_mean_rejects_a_non_integer_aggregate():
    spec = plan(2, 10, 0.25)
    with pytest.raises(ValueError, match="not a sum of packed integers"):
        packing.unpack_mean(np.array([0.4 - INT_OFFSET]), 1, 2, spec)


@pytest.mark.usefixtures("quiet_flower")
def test_secagg_aggregate_of_packed_updates_is_the_exact_sum_of_the_dequantised_updates():
    pytest.importorskip("flwr")
    from appliance.federation.flower_app import RunSettings, make_client_app, run_server
    from appliance.federation.local_grid import LocalGrid
    from appliance.federation.model import subset_size

    rng = np.random.default_rng(3)
    items = rng.normal(size=(40, 8))
    data = {b: (rng.normal(size=(30, 8)), rng.integers(0, 5, size=30), items) for b in range(5)}
    s = RunSettings(rounds=1, epsilon=50.0, clip=0.5, population=5, cohort=5, n_items=40, dim=8, rank=2,
                    compression=2.0, pack=2, timeout=5)
    sent: dict[int, np.ndarray] = {}  # node id -> the encoded vector the box handed SecAgg+

    def capture_encoded(msg, ctxt, call_next):  # between SecAgg+ and packing: the box's encoded floats
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        out = call_next(msg, ctxt)
        if not out.has_error() and "fitres.parameters" in out.content.array_records:
            sent[ctxt.node_id] = parameters_to_ndarrays(compat.recorddict_to_fitres(out.content, True).parameters)[0]
        return out

    from flwr.client.mod import fixedclipping_mod, secaggplus_mod
    from flwr.clientapp import ClientApp

    from appliance.federation.flower_app import HeadClient, packing_mod

    base = make_client_app(lambda cfg: data[int(cfg["i"])])
    assert [m.__name__ for m in base._mods] == ["secaggplus_mod", "packing_mod", "fixedclipping_mod"]
    app = ClientApp(client_fn=lambda c: HeadClient(*data[int(c.node_config["i"])]).to_client(),
                    mods=[secaggplus_mod, capture_encoded, packing_mod, fixedclipping_mod])
    grid = LocalGrid(app, [{"i": i} for i in range(5)], s.to_run_config())

    released = []

    class Spy:
        def normal(self, loc, scale, size):
            return np.zeros(size)

    res = run_server(grid, grid.server_context(), rng=Spy(),
                     audit=lambda rnd, ups: released.append(ups))
    k = subset_size(s.shape.n_params, s.compression, s.pack)
    assert res.subset_k == k and len(sent) == 5
    spec = plan(2, 5, 0.5)
    per_box = [packing.dequantise(packing.unpack(v.astype(np.int64) + INT_OFFSET, k, spec), spec) for v in sent.values()]
    assert all(np.linalg.norm(y) <= s.clip for y in per_box)
    expected_mean = np.sum(per_box, axis=0) / 5
    theta0 = s.shape.initial(seed=s.head_seed)
    from appliance.federation.model import round_subset

    idx = round_subset(s.shape.n_params, k, 1, s.run_seed)
    step = res.head[idx] - theta0[idx]
    np.testing.assert_allclose(step, s.server_lr * expected_mean, rtol=1e-12, atol=1e-12)
    # the server-side code only ever got the packed aggregate, never a box's own vector
    assert all(not np.allclose(u, sent[nid]) for ups in released for u in ups for nid in sent)
