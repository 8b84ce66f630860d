"""The ranking evaluation protocol on tiny hand-made interaction files whose numbers we work out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from appliance.evaluation.recsys.data import leave_last_out, read_interactions
from appliance.evaluation.recsys.metrics import evaluate_lists, evaluate_scores, from_ranks


def _write(path: Path, rows: list[tuple[int, int, int]]) -> Path:
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{t}\n" for u, i, t in rows))
    return path


def _catalog(path: Path, ids: list[int]) -> Path:
    genres = ["Comedy", "Drama", "Action", "Horror", "Children"]
    path.write_text("movieId,title,genres\n" + "".join(
        f'{i},"Title {i}, the film ({1990 + i % 20})",{genres[i % 5]}\n' for i in ids))
    return path


def test_split_is_stable_by_time_drops_short_users_and_keeps_their_items(tmp_path: Path) -> None:
    f = _write(tmp_path / "r.csv", [
        (7, 30, 300), (7, 10, 100), (7, 20, 200), (7, 40, 400),  # out of order in the file
        (8, 50, 5), (8, 60, 5), (8, 70, 5),                      # equal timestamps: file order wins
        (9, 99, 1), (9, 98, 2),                                  # 2 interactions: dropped
    ])
    sp = leave_last_out(read_interactions(f))
    assert sp.user_ids.tolist() == [7, 8] and sp.n_dropped_users == 1
    assert sp.item_ids.tolist() == [10, 20, 30, 40, 50, 60, 70, 98, 99]  # items of user 9 stay ranked
    ids = sp.item_ids
    assert [ids[s].tolist() for s in sp.seqs] == [[10, 20, 30, 40], [50, 60, 70]]
    assert [ids[h].tolist() for h in sp.histories("valid")] == [[10, 20], [50]]
    assert ids[sp.targets("valid")].tolist() == [30, 60]
    assert [ids[h].tolist() for h in sp.histories("test")] == [[10, 20, 30], [50, 60]]
    assert ids[sp.targets("test")].tolist() == [40, 70]


def test_metrics_by_hand() -> None:
    # rank 1 -> NDCG 1; rank 3 -> 1/log2(4) = 0.5; rank 12 -> in @20 only: 1/log2(13); rank 25 -> miss.
    hr, nd = from_ranks(np.array([0, 2, 11, 24]), np.zeros(4, dtype=np.int64))
    assert hr[10].tolist() == [1, 1, 0, 0] and hr[20].tolist() == [1, 1, 1, 0]
    assert nd[10] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert nd[20] == pytest.approx([1.0, 0.5, 1 / math.log2(13), 0.0])
    # ties: 8 items above, 3 tied with the target -> rank uniform on 9..12: HR@10 = 2/4
    hr, nd = from_ranks(np.array([8]), np.array([3]))
    assert hr[10][0] == pytest.approx(0.5)
    assert nd[10][0] == pytest.approx((1 / math.log2(10) + 1 / math.log2(11)) / 4)
    assert nd[20][0] == pytest.approx(sum(1 / math.log2(r + 1) for r in (9, 10, 11, 12)) / 4)


def test_history_is_excluded_and_a_target_in_the_history_is_a_miss() -> None:
    S = np.array([[5.0, 4.0, 3.0, 2.0, 1.0] + [0.0] * 20,
                  [5.0, 4.0, 3.0, 2.0, 1.0] + [0.0] * 20])
    hist = [np.array([0, 1]), np.array([2])]
    per = evaluate_scores(S.copy(), hist, np.array([3, 2]))
    # user 0: items 0 and 1 excluded, so item 3 is ranked 2nd; user 1: the target is in the history.
    assert per.hr[10].tolist() == [1.0, 0.0]
    assert per.ndcg[10][0] == pytest.approx(1 / math.log2(3))
    assert 0 not in per.top10[0] and 1 not in per.top10[0]
    lists = evaluate_lists([[3, 4, 5], [9, 8]], np.array([4, 7]))
    assert lists.hr[10].tolist() == [1.0, 0.0] and lists.ndcg[10][0] == pytest.approx(1 / math.log2(3))


def _popularity_file(tmp_path: Path) -> tuple[Path, Path]:
    """25 titles. Users 1-3 each watch title 1 then two more; user 4 watches 21 titles (2..22) in order."""
    rows = [(1, 1, 1), (1, 2, 2), (1, 23, 3),     # train [1], valid 2, test 23
            (2, 1, 1), (2, 2, 2), (2, 24, 3),     # train [1], valid 2, test 24
            (3, 1, 1), (3, 3, 2), (3, 2, 3)]      # train [1], valid 3, test 2
    rows += [(4, i, 10 + i) for i in range(2, 23)]  # train 2..20, valid 21, test 22
    rows += [(5, 25, 1), (5, 24, 2)]              # dropped (2 interactions), items 24 and 25 stay
    return _write(tmp_path / "r.csv", rows), _catalog(tmp_path / "m.csv", list(range(1, 26)))


def test_popularity_end_to_end_by_hand(tmp_path: Path) -> None:
    pytest.importorskip("scipy")  # the `eval` extra
    from appliance.evaluation.ranking import run

    r, m = _popularity_file(tmp_path)
    out = run(r, m, tmp_path / "out.json", with_ours=False, baselines=("popularity",), log=lambda s: None)
    # Fitted for test (train + validation): counts 1 -> 3, 2 -> 3 (u1, u2 valid; u4), 3 -> 2 (u3 valid, u4),
    # 4..21 -> 1, 22..25 -> 0. Ties are broken in expectation; the exclusions are each user's history.
    # u1 (hist {1, 2}, target 23, count 0): above it item 3 and 4..21 = 19 titles; tied 22, 24, 25
    #    -> ranks 20..23: HR@10 0, HR@20 1/4, NDCG@20 = 1/log2(21) / 4.
    # u2: the same with target 24 (tied with 22, 23, 25).
    # u3 (hist {1, 3}, target 2, count 3): nothing above -> rank 1.
    # u4 (hist 2..21, target 22, count 0): above it item 1 -> 1 title; tied 23, 24, 25 -> ranks 2..5.
    u4 = sum(1 / math.log2(k + 1) for k in (2, 3, 4, 5)) / 4
    u12 = (1 / math.log2(21)) / 4
    want = {"HR@10": (0 + 0 + 1 + 1) / 4, "NDCG@10": (0 + 0 + 1 + u4) / 4,
            "HR@20": (0.25 + 0.25 + 1 + 1) / 4, "NDCG@20": (u12 + u12 + 1 + u4) / 4}
    got = out["baselines"]["popularity"]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    assert out["n_users"] == 4 and out["n_items"] == 25
    assert json.loads((tmp_path / "out.json").read_text())["baselines"]["popularity"]["NDCG@10"] == got["NDCG@10"]
    assert out["cold_start"]["users_le5_train"]["n_users"] == 3  # users 1-3 have 1 train interaction


def test_transition_baseline_follows_the_chain(tmp_path: Path) -> None:
    pytest.importorskip("scipy")  # the `eval` extra
    from appliance.evaluation.recsys import baselines as B

    # User 5 watched 0 -> 1 -> 2 -> 3 -> 4; users 0-4 stopped at 3: the chain predicts 4 exactly.
    hist = [np.array([0, 1, 2, 3]) for _ in range(5)] + [np.array([0, 1, 2, 3, 4])]
    tr = B.Transition(n=1, weighting="uniform").fit(hist, None, 30)
    per = evaluate_scores(tr.scores(np.arange(5)), hist, np.array([4] * 5), users=np.arange(5))
    assert per.hr[10].tolist() == [1.0] * 5 and per.ndcg[10].tolist() == [1.0] * 5


def test_every_baseline_runs_on_a_small_log(tmp_path: Path) -> None:
    pytest.importorskip("implicit")
    rng = np.random.default_rng(3)
    rows = []
    for u in range(1, 41):
        items = rng.choice(np.arange(1, 61), size=12, replace=False)
        rows += [(u, int(i), t) for t, i in enumerate(items)]
    r = _write(tmp_path / "r.csv", rows)
    m = _catalog(tmp_path / "m.csv", list(range(1, 61)))
    out = run_baselines(r, m, tmp_path)
    assert set(out["baselines"]) == {"popularity", "itemknn", "als", "ease", "transition"}
    for v in out["baselines"].values():
        assert {"HR@10", "NDCG@10", "HR@20", "NDCG@20"} <= set(v)
        assert 0.0 <= v["NDCG@10"] <= v["HR@10"] <= v["HR@20"] <= 1.0


def run_baselines(r: Path, m: Path, tmp_path: Path) -> dict:
    from appliance.evaluation.ranking import run

    return run(r, m, tmp_path / "o.json", with_ours=False, log=lambda s: None)


def test_ours_is_the_box_ranker_fitted_by_the_training_job(tmp_path: Path) -> None:
    """End to end on a small "next episode" log: the training job writes real bundles for the validation
    and test fits, the box's Ranker ranks, and the JSON carries every key issue 6 names."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("scipy")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ranking"))
    from test_train_seq import _make_chain_data

    from appliance.evaluation.ranking import run

    r, m = _make_chain_data(tmp_path, n_users=60)
    out = run(r, m, tmp_path / "out.json", baselines=("popularity", "transition"), log=lambda s: None,
              seq_params={"d": 16, "max_len": 12, "epochs": 15, "threads": 1, "batch": 64})
    saved = json.loads((tmp_path / "out.json").read_text())
    for key in ("ours", "n_users", "n_items", "protocol", "baselines", "mmr", "coverage@10", "cold_start"):
        assert key in saved
    for name in ("ours",):
        assert set(saved[name]) == {"HR@10", "NDCG@10", "HR@20", "NDCG@20"}
    # The chain is learnable: ours finds the next episode for nearly everyone, popularity cannot.
    assert out["ours"]["HR@10"] >= 0.9 > out["baselines"]["popularity"]["HR@10"]
    assert out["mmr"]["intra_list_similarity@10_with"] <= out["mmr"]["intra_list_similarity@10_without"]
    assert out["ours_params"]["sequence_epochs"] in (5, 10, 15)
