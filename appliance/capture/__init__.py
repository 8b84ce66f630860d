"""Capture layer: camera/file/GStreamer/synthetic sources with latest-frame-wins and a reconnect watchdog.

The vision process needs only `make_source(cfg)` and the `FrameSource` contract:
open() / read(timeout_s) -> Frame | None / close() / is_open / stats.
"""

from appliance.capture.factory import choose_gst_backend, make_source, source_factory
from appliance.capture.frame import Frame, FrameSource, LatestFrame, SourceStats, fit_frame, redact
from appliance.capture.gstreamer_source import (
    GStreamerSource,
    find_gst_launch,
    opencv_gstreamer_source,
    opencv_has_gstreamer,
)
from appliance.capture.opencv_source import OpenCVSource
from appliance.capture.resilient import ResilientSource, frame_digest
from appliance.capture.synthetic_source import SyntheticFaceSource
from appliance.capture.templates import PIPELINES_DIR
from appliance.capture.templates import available as available_pipelines
from appliance.capture.templates import resolve as resolve_pipeline

__all__ = [
    "PIPELINES_DIR",
    "Frame",
    "FrameSource",
    "GStreamerSource",
    "LatestFrame",
    "OpenCVSource",
    "ResilientSource",
    "SourceStats",
    "SyntheticFaceSource",
    "available_pipelines",
    "choose_gst_backend",
    "find_gst_launch",
    "fit_frame",
    "frame_digest",
    "make_source",
    "opencv_gstreamer_source",
    "opencv_has_gstreamer",
    "redact",
    "resolve_pipeline",
    "source_factory",
]
