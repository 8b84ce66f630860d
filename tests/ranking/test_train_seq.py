"""The sequence training job end to end on a small log we generate: a "watch the next episode" chain.

Needs the `train` extra (PyTorch CPU); skipped without it. The box side (ONNX Runtime) is what we check.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from appliance.fusion.state import COMPLETE, ProfileState, SessionState
from appliance.ranking.bundle import RankerBundle, sha256_file
from appliance.ranking.ranker import RankContext, Ranker, SignalWeights

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

N_CHAIN, N_COLD = 50, 10


def _make_chain_data(d: Path, n_users: int = 120, seed: int = 5) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    movies = d / "movies.csv"
    genres = ["Comedy", "Drama", "Action", "Horror", "Children"]
    with movies.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["movieId", "title", "genres"])
        for i in range(N_CHAIN + N_COLD):
            w.writerow([i + 1, f"Episode {i + 1} ({1990 + i % 30})", genres[i % 5]])
    ratings = d / "ratings.csv"
    with ratings.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for u in range(n_users):
            start, length = int(rng.integers(0, N_CHAIN)), int(rng.integers(8, 16))
            for t in range(length):  # episode i is always followed by episode i + 1 (wrapping round)
                w.writerow([u + 1, (start + t) % N_CHAIN + 1, 4.0, 1_000_000 + 60 * t])
    return ratings, movies


@pytest.fixture(scope="module")
def chain_bundle(tmp_path_factory) -> Path:
    from appliance.ranking import train_seq

    d = tmp_path_factory.mktemp("chain")
    ratings, movies = _make_chain_data(d)
    out = d / "bundle"
    assert train_seq.main(["--ratings", str(ratings), "--movies", str(movies), "--out", str(out),
                           "--version", "chain-1", "--d", "16", "--max-len", "12", "--threads", "1",
                           "--batch", "64"]) == 0
    return out


def test_training_job_writes_a_verified_bundle_with_onnx_parity(chain_bundle: Path) -> None:
    b = RankerBundle.load(chain_bundle)
    m = json.loads((chain_bundle / "manifest.json").read_text())
    assert b.version == "chain-1" and b.sequence is not None and b.transition is not None
    assert set(m["files"]) == {p.name for p in chain_bundle.iterdir()} - {"manifest.json"}
    assert all(m["files"][n]["sha256"] == sha256_file(chain_bundle / n) for n in m["files"])
    seq = m["sequence"]
    assert seq["opset"] == 17 and seq["parity"]["max_abs_diff"] <= seq["parity"]["atol"] == 1e-4
    assert seq["params"]["d"] == 16 and seq["params"]["max_len"] == 12
    assert m["training"]["validation_curve"], "epochs are chosen on the validation split"
    assert seq["params"]["epochs"] == max(m["training"]["validation_curve"], key=lambda r: r.get("NDCG@10", -1))["epoch"]
    # Titles nobody watched get no sequence embedding (no evidence), but stay rankable by content.
    assert not b.sequence.known[N_CHAIN:].any() and b.sequence.known[:N_CHAIN].all()


def test_the_box_predicts_the_next_episode_and_says_why(chain_bundle: Path) -> None:
    b = RankerBundle.load(chain_bundle)
    cat = b.catalog()
    ranker = Ranker(b, cat, affect_weight=0.0, diversity=0.0, affect_stale_s=1.0,
                    weights=SignalWeights(sequence=1.0, next=0.0, collaborative=0.0, content=0.0,
                                          popularity=0.0, popularity_cold=0.0, session=0.0))
    hits = 0
    for start in range(0, N_CHAIN, 5):
        p, s = ProfileState("p", cat), SessionState("p", "s", cat)
        watched = [(start + t) % N_CHAIN + 1 for t in range(4)]
        for t, item in enumerate(watched):
            p.apply_event(COMPLETE, item, 1_000 + t, 0.0)
            s.apply_event(COMPLETE, item, 1_000 + t, 0.0)
        res = ranker.rank(p, s, None, False, RankContext(1, -1, -1, 5), None, 5, 0)
        want = (start + 4) % N_CHAIN + 1
        hits += res.items[0].item_id == want
        top = res.items[0]
        assert top.reasons[0].signal == "sequence" and top.reasons[0].text.startswith("Because you just watched")
    assert hits >= 8, f"next episode first for only {hits}/10 histories"
