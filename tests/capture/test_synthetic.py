"""The no-camera default: a real face that moves, found by a real detector."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from appliance.capture import SyntheticFaceSource, make_source
from appliance.capture.synthetic_source import ASSET
from appliance.config.schema import CaptureConfig
from tests.capture.conftest import read_frames


@pytest.fixture(scope="module")
def haar() -> cv2.CascadeClassifier:
    c = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    assert not c.empty()
    return c


def test_asset_is_small_and_attributed() -> None:
    assert ASSET.stat().st_size <= 60_000
    assert "public domain" in (ASSET.parent / "ATTRIBUTION.md").read_text(encoding="utf-8").lower()


def test_default_config_gives_a_moving_detectable_face(haar: cv2.CascadeClassifier) -> None:
    cfg = CaptureConfig(fps=30)  # the default kind is synthetic, 640x360
    assert cfg.kind == "synthetic"
    with make_source(cfg) as src:
        frames = read_frames(src, 30)
    boxes = []
    for f in frames:
        assert f.image.shape == (360, 640, 3)
        gray = cv2.cvtColor(f.image, cv2.COLOR_BGR2GRAY)
        found = haar.detectMultiScale(gray, 1.1, 5, minSize=(40, 40))
        if len(found):
            boxes.append(max(found.tolist(), key=lambda b: b[2] * b[3]))
    assert len(boxes) >= 27, f"face found on {len(boxes)}/30 frames"
    xs = [b[0] for b in boxes]
    assert max(xs) - min(xs) >= 5, "the face should move"
    assert min(b[3] for b in boxes) >= 0.2 * 360, "face too small for a 128x128 BlazeFace input"


@pytest.mark.parametrize("size", [(320, 240), (1280, 720), (360, 640)])
def test_face_stays_in_frame_at_any_size(size: tuple[int, int], haar: cv2.CascadeClassifier) -> None:
    w, h = size
    src = SyntheticFaceSource(w, h, fps=15)
    hits = 0
    for n in range(0, 15 * 20, 10):  # 20 s of the path, every 10th frame
        x, y, sw, sh = src.placement(n)
        assert 0 <= x and 0 <= y and x + sw <= w and y + sh <= h
        fx, fy, fw, fh = src.face_box(n)
        assert 0 <= fx and 0 <= fy and fx + fw <= w and fy + fh <= h  # the whole face is in frame
        assert fh >= 0.19 * h
        if n % 50 == 0:
            img = src.render(n)
            assert img.shape == (h, w, 3) and img.dtype == np.uint8
            hits += len(haar.detectMultiScale(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 1.1, 5,
                                              minSize=(40, 40))) >= 1
    assert hits >= 5


def test_path_is_deterministic() -> None:
    a, b = SyntheticFaceSource(160, 120, 10), SyntheticFaceSource(160, 120, 10)
    assert np.array_equal(a.render(17), b.render(17))
    assert not np.array_equal(a.render(17), a.render(18))


def test_synthetic_is_paced_and_latest_frame_wins() -> None:
    import time

    with SyntheticFaceSource(160, 120, fps=20) as src:
        read_frames(src, 1)
        time.sleep(0.5)
        f = src.read(1.0)
        assert f is not None and f.index >= 8  # ~10 frames made while we slept, only the newest returned
        assert src.stats.frames_skipped >= 7
        assert src.stats.frames_delivered <= 16  # paced at 20 fps, not as fast as the CPU goes
