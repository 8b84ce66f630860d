"""OpenCV VideoCapture route: files written here, the shared reference clip, errors and backoff."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import cv2
import pytest

from appliance.capture import OpenCVSource, ResilientSource, make_source
from appliance.config.schema import CaptureConfig
from appliance.errors import CaptureError
from tests.capture.conftest import read_frames, wait_until, write_video
from tests.conftest import shared_path


@pytest.mark.parametrize("fourcc,suffix", [("MJPG", ".avi"), ("mp4v", ".mp4")])
def test_file_source_loops_and_scales(tmp_path: Path, fourcc: str, suffix: str) -> None:
    clip = write_video(tmp_path / f"clip{suffix}", frames=12, fps=60.0, fourcc=fourcc)
    with OpenCVSource(str(clip), 64, 48, fps=15, loop=True) as src:
        frames = read_frames(src, 20, timeout_s=5)  # more frames than the file has: it looped
        assert not src.failed
    assert all(f.image.shape == (48, 64, 3) for f in frames)
    assert frames[-1].index >= 20


@pytest.mark.parametrize("threads", [1, 0])
def test_decoder_threads_follow_the_config(tmp_path: Path, threads: int) -> None:
    """capture.decode_threads reaches FFmpeg (1 by default: the other core is inference's); 0 = FFmpeg's own."""
    clip = write_video(tmp_path / "clip.mp4", frames=12, fps=30.0, fourcc="mp4v")
    assert CaptureConfig(kind="opencv", uri=str(clip)).decode_threads == 1
    src = make_source(CaptureConfig(kind="opencv", uri=str(clip), width=64, height=48, decode_threads=threads))
    assert isinstance(src, ResilientSource)
    inner = src._factory()  # the OpenCV source the appliance would open
    assert isinstance(inner, OpenCVSource) and inner.decode_threads == threads
    cap = inner._make_capture()
    try:
        assert cap.isOpened() and cap.read()[0]
        assert cap.getBackendName() == "FFMPEG"
        got = cap.get(cv2.CAP_PROP_N_THREADS)
        assert got == 1 if threads == 1 else got >= 1
    finally:
        cap.release()


def test_file_is_paced_at_its_own_fps(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.avi", frames=40, fps=20.0)
    with OpenCVSource(str(clip), 64, 48, fps=15, loop=False) as src:
        t0 = time.monotonic()
        read_frames(src, 10)
        elapsed = time.monotonic() - t0
    assert 0.35 < elapsed < 1.5, f"10 frames of a 20 fps file took {elapsed:.2f} s"


def test_end_of_file_without_loop_fails_the_source(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "short.avi", frames=5, fps=60.0)
    with OpenCVSource(str(clip), 64, 48, fps=15, loop=False) as src:
        read_frames(src, 5)
        assert wait_until(lambda: src.failed, 2.0)
        assert src.failure == "end of file"
        assert src.read(0.5) is None and not src.is_open


def test_reference_clip_woman2() -> None:
    clip = shared_path("media", "woman2.mp4")
    cfg = CaptureConfig(kind="opencv", uri=str(clip), width=320, height=180, fps=15)
    with make_source(cfg) as src:
        frames = read_frames(src, 10)
        assert src.online and src.stats.reconnects == 0
    assert frames[0].image.shape == (180, 320, 3)
    assert frames[-1].image.mean() > 10  # real picture content, not a blank buffer


def test_missing_file_fails_open_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(CaptureError, match=r"video file not found: .*nope\.mp4"):
        OpenCVSource(str(missing), 64, 48, fps=15).open()


def test_unopenable_file_says_why(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(CaptureError, match="OpenCV cannot open"):
        OpenCVSource(str(junk), 64, 48, fps=15).open()


def test_resilient_backoff_grows_while_the_file_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "later.avi"
    attempts: list[float] = []

    def factory() -> OpenCVSource:
        attempts.append(time.monotonic())
        return OpenCVSource(str(missing), 64, 48, fps=30, loop=True)

    src = ResilientSource(factory, initial_backoff_s=0.02, max_backoff_s=0.32, stall_timeout_s=1.0,
                          name="late-file", seed=1)
    with src:
        assert wait_until(lambda: len(attempts) >= 6, 5.0)
        assert not src.online and src.read(0.05) is None
        assert "video file not found" in (src.last_error or "")
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps[3] > gaps[0] * 3, gaps  # 0.02 -> 0.04 -> 0.08 -> 0.16 (+ jitter)
        assert all(b <= 0.32 * 1.2 + 0.1 for b in src.backoffs)
        assert src.stats.open_failures >= 6 and src.stats.reconnects >= 5
        # the file appears: the wrapper picks it up by itself and goes online
        write_video(missing, frames=30, fps=30.0)
        frames = read_frames(src, 3, timeout_s=3.0)
        assert src.online and frames[-1].image.shape == (48, 64, 3)
    assert not src.is_open and not src.online
