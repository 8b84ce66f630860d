"""The command line as a user runs it: demo, doctor, catalog import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from appliance.store import Store

REPO = Path(__file__).resolve().parents[2]


def appliance(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, check=False)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo.json"
    r = appliance("demo", "--duration", "8", "--json", str(out), cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["frames"] > 0 and d["frames_with_face"] / d["frames"] >= 0.9
    assert d["affect_samples_received"] > 0
    assert d["rank_calls"] >= 20 and d["rank_ok"] == d["rank_calls"]
    assert d["reasons_share"] == 1.0
    assert d["rank_p50_ms"] > 0 and d["rank_p99_ms"] >= d["rank_p50_ms"]
    assert {"appliance", "ranker_bundle", "onnxruntime"} <= set(d["versions"])


def test_doctor_reports_this_box():
    r = appliance("doctor", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert "CPUExecutionProvider" in rep["onnxruntime_providers"]
    assert rep["firmware_config"] == "cpu-only"  # no Jetson device tree, no nvidia-smi here
    assert rep["models"] == {"blazeface_short_range": "ok", "emotion_cnn48": "ok", "emotion_cnn48_int8": "ok",
                             "emotion_vgg48_ms": "ok", "fer_mini_xception": "ok"}
    assert rep["gstreamer"] and "1." in rep["gstreamer"]


def test_doctor_picks_configs():
    from appliance.ops.doctor import pick_firmware_config

    assert pick_firmware_config("NVIDIA Jetson Orin Nano Developer Kit", None) == "jetson-orin-nano"
    assert pick_firmware_config("NVIDIA Jetson AGX Orin", None) == "jetson-agx-orin"
    assert pick_firmware_config(None, "NVIDIA H100") == "x86-cuda"
    assert pick_firmware_config(None, None) == "cpu-only"


def test_catalog_import_and_bad_file(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "run_dir": str(tmp_path / "run")}))
    good = tmp_path / "movies.csv"
    good.write_text('movieId,title,genres\n1,"Toy Story (1995)",Adventure|Animation|Children\n'
                    '2,"Heat, The (1995)",Action|Crime|Thriller\n3,Nothing (2001),(no genres listed)\n')
    r = appliance("catalog", "import", str(good), "--replace", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    rows = Store(tmp_path / "data" / "appliance.db").catalog_rows()
    assert [(i, t) for i, t, *_ in rows] == [(1, "Toy Story (1995)"), (2, "Heat, The (1995)"), (3, "Nothing (2001)")]
    bad = tmp_path / "bad.csv"
    bad.write_text("movieId,title,genres\nabc,Oops,Drama\n")
    r = appliance("catalog", "import", str(bad), "-c", str(cfg))
    assert r.returncode == 2 and "line 2" in r.stderr
    assert len(Store(tmp_path / "data" / "appliance.db").catalog_rows()) == 3  # nothing changed
