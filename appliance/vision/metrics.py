"""Prometheus figures of the vision process, named as Frigate names its camera stats, with our prefix.

Frigate users read `frigate_camera_fps`, `frigate_process_fps`, `frigate_skipped_fps`,
`frigate_detection_fps` and `frigate_detector_inference_speed_seconds`; we export the same figures as
`appliance_camera_fps`, `appliance_process_fps`, `appliance_skipped_fps`, `appliance_detection_fps` and
`appliance_detector_inference_seconds`, plus the camera's health (`appliance_camera_online`,
`appliance_camera_open` = the capture device is held, `appliance_camera_reconnects_total`, stalls,
frozen streams) and the analysis itself (frames, faces, per-frame time, detect interval).

Each `VisionMetrics` has its own registry (so tests can build several in one process); it also
re-exports the process-wide default registry (governor, process and platform collectors). Served on
loopback only, on `metrics.host:metrics.vision_port` (0 = any free port).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

FRAME_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25)


class _DefaultRegistry:
    """Collector that yields whatever the default registry holds (the governor's gauges, process_*)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class VisionMetrics:
    def __init__(self, include_default: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        if include_default:
            self.registry.register(_DefaultRegistry())
        r = self.registry
        self.camera_fps = Gauge("appliance_camera_fps", "Frames per second arriving from the camera", registry=r)
        self.process_fps = Gauge("appliance_process_fps", "Frames per second analysed", registry=r)
        self.skipped_fps = Gauge("appliance_skipped_fps",
                                 "Frames per second dropped because a newer one arrived (latest frame wins)",
                                 registry=r)
        self.detection_fps = Gauge("appliance_detection_fps", "Detector runs per second", registry=r)
        self.detector_inference = Gauge("appliance_detector_inference_seconds",
                                        "Mean detector time per run over the last second", registry=r)
        self.frame_seconds = Histogram("appliance_frame_processing_seconds",
                                       "Per-frame analysis time: detect + classify + track + publish",
                                       buckets=FRAME_BUCKETS, registry=r)
        self.camera_online = Gauge("appliance_camera_online",
                                   "1 while the camera delivers fresh frames, else 0", registry=r)
        self.camera_open = Gauge("appliance_camera_open",
                                 "1 while the capture device is held (a consented session is open)", registry=r)
        self.reconnects = Counter("appliance_camera_reconnects",
                                  "Times the camera was torn down and tried again", registry=r)
        self.stalls = Counter("appliance_camera_stalls", "Camera streams that stopped delivering", registry=r)
        self.frozen = Counter("appliance_camera_frozen", "Camera streams that repeated the same frame", registry=r)
        self.camera_opens = Counter("appliance_camera_opens", "Times consent opened the capture device",
                                    registry=r)
        self.frames = Counter("appliance_frames_processed", "Frames analysed", registry=r)
        self.faces = Gauge("appliance_faces", "Confirmed faces in the latest analysed frame", registry=r)
        self.detect_interval = Gauge("appliance_detect_interval", "The detector runs every N frames", registry=r)
        self.consented_sessions = Gauge("appliance_consented_sessions",
                                        "Open sessions whose profile allows the camera", registry=r)
        self._server = None
        self._thread = None
        self.port: int | None = None
        # per-source baselines: the watchdog's counters start from 0 on each open
        self._seen = {"reconnects": 0, "stalls": 0, "frozen": 0}

    def new_source(self) -> None:
        self._seen = {"reconnects": 0, "stalls": 0, "frozen": 0}
        self.camera_opens.inc()

    def source_counters(self, reconnects: int, stalls: int, frozen: int) -> None:
        for key, counter, value in (("reconnects", self.reconnects, reconnects), ("stalls", self.stalls, stalls),
                                    ("frozen", self.frozen, frozen)):
            delta = value - self._seen[key]
            if delta > 0:
                counter.inc(delta)
                self._seen[key] = value

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        log.info("vision metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
