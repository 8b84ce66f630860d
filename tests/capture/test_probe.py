"""The watchdog's availability probe: a returning camera is retried at once, not after the backoff."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from appliance.capture import ResilientSource, SyntheticFaceSource
from appliance.capture.factory import availability_probe
from appliance.config.schema import CaptureConfig
from appliance.errors import CaptureError


def test_probe_per_camera_kind(tmp_path: Path) -> None:
    clip = tmp_path / "clip.avi"
    probe = availability_probe(CaptureConfig(kind="gstreamer", pipeline="file", device=str(clip)))
    assert probe is not None and probe() is False
    clip.write_bytes(b"x")
    assert probe() is True
    assert availability_probe(CaptureConfig(kind="opencv", uri=str(clip)))() is True
    usb = availability_probe(CaptureConfig(kind="opencv", uri="7"))
    assert usb is not None and usb() == Path("/dev/video7").exists()
    assert availability_probe(CaptureConfig(kind="synthetic")) is None
    assert availability_probe(CaptureConfig(kind="gstreamer", pipeline="test")) is None


def test_rtsp_probe_is_a_tcp_connect() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    probe = availability_probe(CaptureConfig(kind="gstreamer", pipeline="rtsp",
                                             device=f"rtsp://user:secret@127.0.0.1:{port}/stream"))
    assert probe is not None and probe() is False  # bound, not listening: refused
    server.listen(1)
    try:
        assert probe() is True
    finally:
        server.close()


def test_backoff_is_cut_short_when_the_camera_returns() -> None:
    present = threading.Event()

    def factory():
        if not present.is_set():
            raise CaptureError("camera unplugged")
        return SyntheticFaceSource(64, 48, 30)

    src = ResilientSource(factory, initial_backoff_s=4.0, max_backoff_s=8.0, probe=present.is_set, jitter=0.0)
    with src:
        time.sleep(0.3)  # first open failed: now in a 4 s backoff
        assert src.stats.open_failures == 1 and src.read(0.1) is None
        present.set()
        t0 = time.monotonic()
        assert src.read(3.0) is not None
        assert time.monotonic() - t0 < 1.0


def test_a_present_but_failing_camera_keeps_its_backoff() -> None:
    src = ResilientSource(lambda: (_ for _ in ()).throw(CaptureError("broken")), initial_backoff_s=0.6,
                          max_backoff_s=0.6, probe=lambda: True, jitter=0.0)
    with src:
        time.sleep(1.0)
        assert 1 <= src.stats.open_failures <= 2  # at 0 s and 0.6 s: the probe did not make it spin
