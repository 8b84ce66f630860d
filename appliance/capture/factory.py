"""Build the configured capture source, always wrapped in the reconnecting watchdog.

Problems no retry can fix (unknown pipeline name, gst-launch-1.0 missing) raise CaptureError here, at
start; problems a retry may fix (camera unplugged, file briefly missing, network down) are retried.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from appliance.capture.frame import FrameSource, redact
from appliance.capture.gstreamer_source import (
    GStreamerSource,
    find_gst_launch,
    opencv_gstreamer_source,
    opencv_has_gstreamer,
)
from appliance.capture.opencv_source import OpenCVSource
from appliance.capture.resilient import ResilientSource
from appliance.capture.synthetic_source import SyntheticFaceSource
from appliance.capture.templates import resolve
from appliance.config.schema import CaptureConfig
from appliance.errors import CaptureError

GstBackend = Literal["auto", "launch", "opencv"]
#: overrides the GStreamer backend choice on one box without a config change
GST_BACKEND_ENV = "APPLIANCE_GST_BACKEND"


def choose_gst_backend(requested: str | None = None) -> Literal["launch", "opencv"]:
    """'launch' (gst-launch-1.0 child, the default) or 'opencv' (cv2 built with GStreamer).

    auto: the child route when gst-launch-1.0 exists, else OpenCV's GStreamer backend when this cv2
    has one, else a CaptureError that says which packages to install.
    """
    choice = (requested or os.environ.get(GST_BACKEND_ENV) or "auto").strip().lower()
    if choice not in ("auto", "launch", "opencv"):
        raise CaptureError(f"{GST_BACKEND_ENV}={choice!r}: expected auto, launch or opencv")
    if choice == "opencv":
        if not opencv_has_gstreamer():
            raise CaptureError("GStreamer backend 'opencv' asked for, but this OpenCV build has no "
                               "GStreamer (cv2.getBuildInformation()); use 'launch'")
        return "opencv"
    if choice == "launch" or not opencv_has_gstreamer():
        find_gst_launch()  # raises with the Debian packages to install
        return "launch"
    try:
        find_gst_launch()
        return "launch"
    except CaptureError:
        return "opencv"


def source_factory(cfg: CaptureConfig, pipelines_dir: Path | None = None,
                   gst_backend: GstBackend | None = None) -> tuple[Callable[[], FrameSource], str]:
    """(a function making a fresh, unopened inner source, its display name) for this config."""
    w, h, fps = cfg.width, cfg.height, cfg.fps
    if cfg.kind == "synthetic":
        return (lambda: SyntheticFaceSource(w, h, fps)), "synthetic:astronaut"
    if cfg.kind == "opencv":
        name = redact(f"opencv:{cfg.uri}")
        return (lambda: OpenCVSource(cfg.uri, w, h, fps, loop=cfg.loop, name=name,
                                     decode_threads=cfg.decode_threads)), name
    if cfg.kind == "gstreamer":
        desc = resolve(cfg.pipeline, device=cfg.device, uri=cfg.device or cfg.uri, width=w, height=h,
                       fps=fps, pipelines_dir=pipelines_dir)
        label = cfg.pipeline.strip() if " " not in cfg.pipeline.strip() else desc.split("!", 1)[0].strip()
        name = redact(f"gstreamer:{label}")
        if choose_gst_backend(gst_backend) == "opencv":
            return (lambda: opencv_gstreamer_source(desc, w, h, fps, name=name)), name
        return (lambda: GStreamerSource(desc, w, h, fps, name=name)), name
    raise CaptureError(f"unknown capture.kind {cfg.kind!r}")  # pragma: no cover - the schema forbids it


def _path_probe(path: str) -> Callable[[], bool]:
    return lambda: os.path.exists(path)


def _tcp_probe(uri: str, default_port: int = 554, timeout_s: float = 0.15) -> Callable[[], bool] | None:
    parts = urlsplit(uri)
    if not parts.hostname:
        return None
    host, port = parts.hostname, parts.port or default_port

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return True
        except OSError:
            return False

    return probe


def availability_probe(cfg: CaptureConfig) -> Callable[[], bool] | None:
    """A cheap check that the configured camera is there (device node, file, RTSP port), or None.

    The watchdog uses it to reconnect as soon as an unplugged camera or a dropped stream returns
    instead of sleeping out its backoff. Sources we cannot probe (synthetic, arbitrary pipelines) get
    None and plain backoff.
    """
    if cfg.kind == "opencv":
        target = cfg.uri.strip()
        if target.isdigit():
            return _path_probe(f"/dev/video{int(target)}")
    elif cfg.kind == "gstreamer":
        target = (cfg.device or cfg.uri).strip()
        if not target:
            return None
    else:
        return None
    if "://" in target and not target.lower().startswith("file://"):
        scheme = target.split("://", 1)[0].lower()
        return _tcp_probe(target, default_port={"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}.get(scheme, 554))
    path = target[len("file://"):] if target.lower().startswith("file://") else target
    return _path_probe(path) if path.startswith("/") or os.path.sep in path or Path(path).suffix else None


def make_source(cfg: CaptureConfig, pipelines_dir: Path | None = None,
                gst_backend: GstBackend | None = None) -> ResilientSource:
    """The configured source behind the watchdog (not yet open: open it only with consent)."""
    factory, name = source_factory(cfg, pipelines_dir, gst_backend)
    return ResilientSource(factory, initial_backoff_s=cfg.reconnect_initial_s,
                           max_backoff_s=cfg.reconnect_max_s, stall_timeout_s=cfg.stall_timeout_s, name=name,
                           probe=availability_probe(cfg))
