"""Pipeline templates and make_source(): names, placeholders, secrets, backend choice."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from appliance.capture import (
    PIPELINES_DIR,
    ResilientSource,
    available_pipelines,
    make_source,
    resolve_pipeline,
)
from appliance.capture.factory import choose_gst_backend
from appliance.capture.gstreamer_source import GStreamerSource, gst_fraction
from appliance.config.schema import CaptureConfig
from appliance.errors import CaptureError
from tests.capture.conftest import needs_gst, read_frames


def _fill(name: str, device: str = "") -> str:
    return resolve_pipeline(name, device=device, uri=device, width=320, height=180, fps=15)


def test_every_camera_kind_has_a_template() -> None:
    assert {"csi", "usb", "rtsp", "test", "file"} <= set(available_pipelines())
    assert (PIPELINES_DIR / "README.md").is_file()


def test_templates_fill_placeholders_and_defaults() -> None:
    assert _fill("usb").startswith("v4l2src device=/dev/video0 ")  # default from the template
    assert "sensor-id=1" in _fill("csi", "1")
    assert "width=320,height=180,framerate=15/1" in _fill("test")
    assert 'location="/media/my clip.mp4"' in _fill("file", "/media/my clip.mp4")
    assert "{" not in _fill("rtsp", "rtsp://cam.local/stream")
    assert gst_fraction(15.0) == "15/1" and gst_fraction(29.97) in ("2997/100", "30000/1001")


def test_template_needing_a_device_says_so() -> None:
    with pytest.raises(CaptureError, match="needs capture.device"):
        _fill("rtsp")


def test_unknown_pipeline_lists_the_known_ones() -> None:
    cfg = CaptureConfig(kind="gstreamer", pipeline="webcam9")
    with pytest.raises(CaptureError, match=r"unknown capture pipeline 'webcam9'.*usb"):
        make_source(cfg)


def test_full_description_passes_through(tmp_path: Path) -> None:
    desc = "videotestsrc ! video/x-raw,format={ I420, NV12 },width={width}"
    assert resolve_pipeline(desc, device="", uri="", width=8, height=8, fps=5) == \
        "videotestsrc ! video/x-raw,format={ I420, NV12 },width=8"


def test_rtsp_credentials_never_reach_the_name() -> None:
    cfg = CaptureConfig(kind="opencv", uri="rtsp://admin:hunter2@10.0.0.5/live")
    src = make_source(cfg)
    assert "hunter2" not in src.name and "***@10.0.0.5" in src.name
    if shutil.which("gst-launch-1.0"):
        g = make_source(CaptureConfig(kind="gstreamer", pipeline="rtsp",
                                      device="rtsp://admin:hunter2@10.0.0.5/live"))
        assert "hunter2" not in g.name
        inner = GStreamerSource(_fill("rtsp", "rtsp://admin:hunter2@10.0.0.5/live"), 64, 48, 15)
        assert "hunter2" not in inner.name


@needs_gst
@pytest.mark.parametrize("name", ["usb", "rtsp", "file"])
def test_portable_templates_parse_in_gstreamer(name: str, tmp_path: Path) -> None:
    """gst-launch-1.0 accepts each description (elements exist, caps parse); only the device is absent."""
    device = {"usb": "/dev/video-none", "rtsp": "rtsp://127.0.0.1:9/none", "file": str(tmp_path / "x.avi")}
    with pytest.raises(CaptureError) as err:
        GStreamerSource(_fill(name, device[name]), 64, 48, 15).open()
    assert "erroneous pipeline" not in str(err.value) and "no element" not in str(err.value)
    assert "exited with code" in str(err.value)


def test_make_source_kinds_are_resilient(tmp_path: Path) -> None:
    for cfg in (CaptureConfig(), CaptureConfig(kind="opencv", uri=str(tmp_path / "a.mp4"))):
        src = make_source(cfg)
        assert isinstance(src, ResilientSource) and not src.is_open


@needs_gst
def test_backend_choice() -> None:
    assert choose_gst_backend("launch") == "launch"
    assert choose_gst_backend("auto") in ("launch", "opencv")
    with pytest.raises(CaptureError):
        choose_gst_backend("vaapi")


def test_make_source_latest_frame_wins_through_the_watchdog() -> None:
    with make_source(CaptureConfig(width=96, height=64, fps=30)) as src:
        first = read_frames(src, 1)[0]
        assert first.image.shape == (64, 96, 3)
        time.sleep(0.4)  # ~12 frames arrive while the consumer is busy
        newest = src.read(1.0)
        assert newest is not None and newest.index - first.index >= 6
        again = src.read(0.0)  # never a backlog, never the same frame twice
        assert again is None or again.index > newest.index
        stats = src.stats
    assert stats.frames_skipped >= 5 and stats.frames_read in (2, 3)
    assert stats.frames_delivered >= stats.frames_read + stats.frames_skipped


@needs_gst
def test_pipelines_dir_holds_site_templates(tmp_path: Path) -> None:
    (tmp_path / "lobby.gst").write_text(
        "# a site-specific camera\n# default: device=0\n"
        "videotestsrc pattern=ball is-live=true\n  ! video/x-raw,framerate={fps}\n", encoding="utf-8")
    cfg = CaptureConfig(kind="gstreamer", pipeline="lobby", width=48, height=32, fps=25)
    with make_source(cfg, pipelines_dir=tmp_path) as src:
        assert read_frames(src, 3)[-1].image.shape == (32, 48, 3)
    assert src.name == "gstreamer:lobby"
