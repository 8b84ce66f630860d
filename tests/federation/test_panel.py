"""The federated run's start: a bundle trained on the central panel only, evaluated on everyone else."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.federation.panel import panel_bundle, split_panel
from appliance.federation.simulate import auto_num_shares


def test_panel_split_is_disjoint_seeded_and_20_percent():
    a = split_panel(610, 0.2, seed=0)
    assert len(a.panel) == 122 and len(a.fleet) == 488
    assert len(np.intersect1d(a.panel, a.fleet)) == 0
    assert np.array_equal(np.union1d(a.panel, a.fleet), np.arange(610))
    b = split_panel(610, 0.2, seed=0)
    assert np.array_equal(a.panel, b.panel)
    assert not np.array_equal(a.panel, split_panel(610, 0.2, seed=1).panel)
    with pytest.raises(ValueError):
        split_panel(10, 1.0)


def test_secagg_neighbourhood_is_small_and_absolute_for_large_cohorts():
    assert auto_num_shares(10) == (1.0, 0.5) and auto_num_shares(50) == (1.0, 0.5)
    shares, threshold = auto_num_shares(610)
    assert (shares, threshold) == (7, 4) and isinstance(shares, int) and threshold > shares / 2


@pytest.mark.slow
def test_panel_bundle_is_trained_on_panel_users_only_and_cached(tmp_path):
    pytest.importorskip("torch")  # the panel start is trained by the offline job (the `train` extra)
    pytest.importorskip("onnx")
    from appliance.ranking.bundle import RankerBundle
    from appliance.ranking.train_seq import SeqParams
    from tests.conftest import REPO, shared_path

    ratings = shared_path("datasets", "movielens-small", "ratings.csv")
    ref = REPO / "models" / "ranker"
    if not (ref / "sequence.onnx").exists():
        pytest.skip("no reference bundle")
    # a small fleet: the first 60 users of MovieLens-small
    lines = ratings.read_text().splitlines()
    keep = [lines[0]] + [x for x in lines[1:] if int(x.split(",")[0]) <= 60]
    small = tmp_path / "ratings.csv"
    small.write_text("\n".join(keep) + "\n")
    p = SeqParams(d=16, blocks=1, epochs=2, eval_every=1, patience=0, threads=1)
    logs: list[str] = []
    out, split = panel_bundle(small, ref, share=0.2, seed=3, params=p, cache=tmp_path / "cache", log=logs.append)
    assert len(split.panel) == 12 and len(split.fleet) == 48
    b = RankerBundle.load(out)
    assert np.array_equal(b.item_ids, RankerBundle.load(ref).item_ids)   # the catalog: content metadata
    # the bundle's popularity counts are those of the panel's titles and nothing else
    user_ids = sorted({int(x.split(",")[0]) for x in keep[1:]})
    panel_users = {user_ids[i] for i in split.panel}
    panel_items = {int(x.split(",")[1]) for x in keep[1:] if int(x.split(",")[0]) in panel_users}
    seen = set(b.item_ids[np.expm1(b.popularity[:, 0]) > 0.5].tolist())
    assert seen == panel_items
    fitted_on = json.loads((out / "manifest.json").read_text())["training"]["fitted_on"]
    assert "12 of 60 users" in fitted_on
    again, _ = panel_bundle(small, ref, share=0.2, seed=3, params=p, cache=tmp_path / "cache", log=logs.append)
    assert again == out and any("cached" in m for m in logs)
