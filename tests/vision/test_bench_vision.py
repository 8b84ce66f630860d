"""`python -m bench vision` end to end on a few frames of the reference clip (ours only: fast)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import vision
from tests.conftest import shared_path


def test_bench_vision_writes_the_documented_keys(tmp_path: Path, capsys):
    video = shared_path("media", "woman2.mp4")
    out = tmp_path / "vision.json"
    assert vision.main(["--video", str(video), "--json", str(out), "--frames", "25", "--no-peer",
                        "--sweep-repeats", "5", "--rounds", "2", "--passes", "2"]) == 0
    r = json.loads(out.read_text())
    assert r["ours"]["fps"] > 0 and r["ours"]["p99_ms"] > 0
    assert r["ours"]["passes"] == 2 and r["ours"]["frames"] == 2 * 25  # two passes over 25 frames
    assert r["peers"]["fer"] is None and r["speedup"] is None and "--no-peer" in r["peers_skipped"]["fer"]
    assert set(r["ours"]["stages_ms"]) == {"decode", "detect", "classify", "track", "publish"}
    assert {run["threads"] for run in r["ours_runs"]} == {1, 2}
    assert {row["batch"] for row in r["batch_sweep"]} == {1, 2, 4, 8, 16}
    assert r["ours"]["faces_per_frame"] > 0.5  # the woman is found
    assert r["ours"]["messages_received_by_subscriber"] >= 1  # publish really went over ZeroMQ
    assert out.with_suffix(".md").read_text().startswith("# Vision benchmark")
