"""Capture-test helpers: real sources, small videos written on the spot, and a GStreamer gate."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.capture import Frame, FrameSource

needs_gst = pytest.mark.skipif(shutil.which("gst-launch-1.0") is None,
                               reason="gst-launch-1.0 not installed (make sysdeps)")


def write_video(path: Path, frames: int = 30, fps: float = 30.0, size: tuple[int, int] = (160, 120),
                fourcc: str = "MJPG") -> Path:
    """A small video whose frames differ (a moving bar and the frame number drawn in)."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"cannot write {fourcc} video to {path}"
    for i in range(frames):
        img = np.full((h, w, 3), 40, np.uint8)
        x = (i * 7) % (w - 20)
        cv2.rectangle(img, (x, 10), (x + 20, h - 10), (0, 200, 255), -1)
        cv2.putText(img, str(i), (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        writer.write(img)
    writer.release()
    return path


def read_frames(src: FrameSource, n: int, timeout_s: float = 5.0) -> list[Frame]:
    """n frames from an open source, failing the test if they do not come within timeout_s."""
    out: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)}/{n} frames from {src.name} in {timeout_s}s"
        f = src.read(0.5)
        if f is not None:
            out.append(f)
    return out


def wait_until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()
