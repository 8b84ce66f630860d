"""GStreamer child-process route with real gst-launch-1.0 pipelines."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from appliance.capture import (
    GStreamerSource,
    ResilientSource,
    make_source,
    opencv_gstreamer_source,
    opencv_has_gstreamer,
    resolve_pipeline,
)
from appliance.capture.factory import choose_gst_backend
from appliance.config.schema import CaptureConfig
from appliance.errors import CaptureError
from tests.capture.conftest import needs_gst, read_frames, wait_until, write_video

pytestmark = needs_gst

BALL = "videotestsrc pattern=ball is-live=true ! video/x-raw,framerate=30/1"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_test_pipeline_delivers_configured_shape() -> None:
    cfg = CaptureConfig(kind="gstreamer", pipeline="test", width=320, height=200, fps=30)
    with make_source(cfg) as src:
        frames = read_frames(src, 10)
        assert src.online
    for f in frames:
        assert f.image.shape == (200, 320, 3) and f.image.dtype.name == "uint8"
    assert [f.index for f in frames] == sorted({f.index for f in frames})
    assert all(b.capture_ns > a.capture_ns for a, b in itertools.pairwise(frames))
    assert src.name == "gstreamer:test" and not src.is_open


def test_source_scales_whatever_the_camera_sends() -> None:
    # the "camera" sends 1280x720 I420; the source still hands out BGR at the configured size
    desc = "videotestsrc pattern=ball is-live=true ! video/x-raw,format=I420,width=1280,height=720,framerate=30/1"
    with GStreamerSource(desc, 96, 64, 30) as src:
        f = read_frames(src, 3)[-1]
    assert f.image.shape == (64, 96, 3)


def test_ended_pipeline_is_reconnected_and_frames_resume(caplog: pytest.LogCaptureFixture) -> None:
    desc = "videotestsrc num-buffers=15 pattern=ball is-live=true ! video/x-raw,framerate=30/1"
    src = ResilientSource(lambda: GStreamerSource(desc, 64, 48, 30), initial_backoff_s=0.05,
                          max_backoff_s=0.2, stall_timeout_s=2.0, name="ending")
    with src:
        frames = read_frames(src, 40, timeout_s=10)  # 15 per child: needs at least two restarts
        assert src.stats.reconnects >= 1
    assert "end of stream" in caplog.text  # the log says why it reconnected
    assert frames[-1].index > 30


def test_latest_frame_wins_for_a_slow_reader() -> None:
    with GStreamerSource(BALL, 64, 48, 30) as src:
        read_frames(src, 1)
        seen = []
        for _ in range(5):
            time.sleep(0.2)  # a consumer 6x slower than the camera
            f = src.read(1.0)
            assert f is not None
            seen.append(f)
            assert time.monotonic_ns() - f.capture_ns < 100_000_000  # recent, not a backlog
        stats = src.stats
    gaps = [b.index - a.index for a, b in itertools.pairwise(seen)]
    assert min(gaps) >= 3, gaps
    assert stats.frames_skipped > 0
    assert stats.frames_delivered >= stats.frames_read + stats.frames_skipped >= stats.frames_delivered - 1


def test_close_ends_the_child_within_100ms() -> None:
    src = GStreamerSource(BALL, 64, 48, 30)
    src.open()
    read_frames(src, 2)
    pid = src.pid
    assert pid is not None and _pid_alive(pid)
    t0 = time.monotonic()
    src.close()
    elapsed = time.monotonic() - t0
    assert not _pid_alive(pid), "gst-launch-1.0 child still running after close()"
    assert elapsed < 0.1, f"close() took {elapsed * 1000:.0f} ms"
    src.close()  # idempotent
    assert not src.is_open


def test_bad_pipeline_fails_open_with_gstreamer_words() -> None:
    with pytest.raises(CaptureError, match='no element "nosuchcamerasrc"'):
        GStreamerSource("nosuchcamerasrc", 64, 48, 30).open()
    with pytest.raises(CaptureError, match="No such file"):
        GStreamerSource("filesrc location=/nonexistent/clip.avi ! decodebin", 64, 48, 30).open()


def test_missing_gst_launch_names_the_packages() -> None:
    with pytest.raises(CaptureError, match="gstreamer1.0-tools gstreamer1.0-plugins-base"):
        GStreamerSource(BALL, 64, 48, 30, gst_launch="gst-launch-9.9-not-installed").open()


def test_file_template_plays_an_mjpeg_avi_paced(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip with space.avi", frames=20, fps=20.0)
    desc = resolve_pipeline("file", device=str(clip), uri=str(clip), width=80, height=60, fps=20)
    with GStreamerSource(desc, 80, 60, 20) as src:
        t0 = time.monotonic()
        frames = read_frames(src, 10)
        elapsed = time.monotonic() - t0
        assert elapsed > 0.3, "a file must play at its own rate, not as fast as it decodes"
        assert wait_until(lambda: src.failed, 3.0)  # the end of the file ends the child
    assert frames[0].image.shape == (60, 80, 3)
    assert "end of stream" in (src.failure or "")


def test_frozen_stream_is_detected_and_reconnected(caplog: pytest.LogCaptureFixture) -> None:
    desc = "videotestsrc pattern=solid-color foreground-color=0xff336699 is-live=true ! video/x-raw,framerate=30/1"
    src = ResilientSource(lambda: GStreamerSource(desc, 64, 48, 30), initial_backoff_s=0.05,
                          max_backoff_s=0.1, stall_timeout_s=0.4, name="frozen")
    with src:
        assert wait_until(lambda: src.stats.frozen >= 1 and src.stats.reconnects >= 1, 5.0)
    assert "frozen stream: the same frame for" in caplog.text


def test_stalled_stream_is_detected_and_reconnected(caplog: pytest.LogCaptureFixture) -> None:
    # one frame, then nothing for 10 s: the child lives on but the camera went quiet
    desc = "videotestsrc pattern=ball is-live=true ! video/x-raw,framerate=1/10"
    src = ResilientSource(lambda: GStreamerSource(desc, 64, 48, 30), initial_backoff_s=0.05,
                          max_backoff_s=0.1, stall_timeout_s=0.4, name="stalling")
    with src:
        assert wait_until(lambda: src.stats.stalls >= 1 and src.stats.reconnects >= 1, 5.0)
    assert "stalled: no frame for" in caplog.text


def test_close_while_the_camera_is_still_starting() -> None:
    # identity sleeps 5 s before the first buffer: open() is still waiting for a first frame
    desc = "videotestsrc is-live=true ! identity sleep-time=5000000"
    src = ResilientSource(lambda: GStreamerSource(desc, 64, 48, 30), initial_backoff_s=0.05, max_backoff_s=0.1, stall_timeout_s=2.0)
    src.open()
    assert wait_until(lambda: src.inner is not None and getattr(src.inner, "pid", None) is not None, 3.0)
    pid = src.inner.pid  # type: ignore[union-attr]
    time.sleep(0.2)
    t0 = time.monotonic()
    src.close()
    elapsed = time.monotonic() - t0
    assert not _pid_alive(pid)
    assert elapsed < 0.3, f"close() took {elapsed * 1000:.0f} ms while the source was opening"


@pytest.mark.skipif(not opencv_has_gstreamer(), reason="this cv2 has no GStreamer (the PyPI wheels)")
def test_opencv_gstreamer_backend_delivers_frames() -> None:
    """The in-process route where cv2 has GStreamer (JetPack): appsink keeps only the newest buffer."""
    with opencv_gstreamer_source(BALL, 64, 48, 30) as src:
        frames = read_frames(src, 5)
    assert frames[-1].image.shape == (48, 64, 3)


@pytest.mark.skipif(opencv_has_gstreamer(), reason="this cv2 has GStreamer")
def test_opencv_gstreamer_backend_absent_is_a_clear_error() -> None:
    with pytest.raises(CaptureError, match="no GStreamer"):
        opencv_gstreamer_source(BALL, 64, 48, 30)
    with pytest.raises(CaptureError, match="no GStreamer"):
        choose_gst_backend("opencv")
    assert choose_gst_backend("auto") == "launch"
