"""The sequence training job end to end on a small log we generate: a "watch the next episode" chain.

Needs the `train` extra (PyTorch CPU); skipped without it. The box side (ONNX Runtime) is what we check.
"""

from __future__ import annotations

import csv
import dataclasses
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


def test_early_stopping_keeps_the_best_validation_epoch(tmp_path: Path) -> None:
    """With `patience`, training stops once validation NDCG@10 has not improved for that many evaluations,
    and the model returned is the best epoch's (the epoch count the refit then uses)."""
    from appliance.ranking import train_seq

    rng = np.random.default_rng(0)
    hist = [(int(rng.integers(0, N_CHAIN)) + np.arange(12)) % N_CHAIN for _ in range(80)]
    tr, vt = [h[:-1] for h in hist], np.array([h[-1] for h in hist])
    p = train_seq.SeqParams(d=16, max_len=12, epochs=60, eval_every=1, patience=2, threads=1, batch=64)
    model, curve = train_seq.train_sasrec(tr, N_CHAIN + N_COLD, p, (tr, vt))
    assert len(curve) < p.epochs and "stopped" in curve[-1]
    best = train_seq.best_epoch(curve)
    assert curve[-1]["epoch"] - best == p.patience * p.eval_every
    from appliance.evaluation.recsys.metrics import evaluate_scores

    # the snapshot is the best epoch's: scoring it again gives the best validation score
    s = evaluate_scores(train_seq.score_histories(model, tr), tr, vt).summary()
    assert s["NDCG@10"] == pytest.approx(max(r["NDCG@10"] for r in curve if "NDCG@10" in r), abs=1e-9)


def _metrics(v: float) -> dict[str, float]:
    return {"HR@10": v, "NDCG@10": v, "HR@20": v, "NDCG@20": v}


def test_shipped_training_reuses_the_setting_the_evaluation_chose(tmp_path: Path) -> None:
    """`--eval-json`: the sequence setting and epoch count chosen on validation by `appliance eval ranking`
    are trained as they are (no second validation run), and its weights and curve are recorded."""
    from appliance.ranking import train_seq

    ratings, movies = _make_chain_data(tmp_path, n_users=40)
    sp = {**dataclasses.asdict(train_seq.SeqParams()), "d": 16, "max_len": 12, "epochs": 3, "threads": 1}
    curve = [{"epoch": 3, "loss": 1.0, "NDCG@10": 0.5}]
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"ours_params": {"weights": {"collaborative": 0.25}, "sequence_params": sp},
                              "validation": {"ours_epoch_curve": curve}, "ours": _metrics(0.5)}))
    out = tmp_path / "b"
    assert train_seq.main(["--ratings", str(ratings), "--movies", str(movies), "--out", str(out),
                           "--eval-json", str(ev)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["version"] == train_seq.DEFAULT_VERSION
    assert m["sequence"]["params"] == sp
    assert m["training"]["validation_curve"] == curve
    assert "appliance eval ranking" in m["training"]["sequence_setting_chosen_by"]
    assert m["ranker"]["weights"]["collaborative"] == 0.25
    RankerBundle.load(out)
    # A bundle trained with that setting can get a later evaluation's weights and metrics recorded ...
    ev.write_text(json.dumps({"ours_params": {"weights": {"collaborative": 1.0}, "sequence_params": sp},
                              "validation": {"ours_epoch_curve": curve}, "ours": _metrics(0.6)}))
    files = {n: v for n, v in m["files"].items() if n != "MODEL_CARD.md"}
    assert train_seq.main(["--ratings", str(ratings), "--movies", str(movies), "--out", str(out),
                           "--eval-json", str(ev), "--record-eval"]) == 0
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["ranker"]["weights"]["collaborative"] == 1.0 and m2["evaluation"]["ours"]["NDCG@10"] == 0.6
    assert {n: v for n, v in m2["files"].items() if n != "MODEL_CARD.md"} == files
    assert "| ours (shipped, with MMR) | 0.6000 | 0.6000 |" in (out / "MODEL_CARD.md").read_text()
    RankerBundle.load(out)
    # ... but not the evaluation of another setting.
    ev.write_text(json.dumps({"ours_params": {"weights": {}, "sequence_params": {**sp, "epochs": 4}}}))
    with pytest.raises(SystemExit, match="epochs"):
        train_seq.main(["--ratings", str(ratings), "--movies", str(movies), "--out", str(out),
                        "--eval-json", str(ev), "--record-eval"])
