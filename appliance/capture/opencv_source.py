"""Frames through OpenCV's VideoCapture: a device index, a video file, or an rtsp:// URL.

Files are paced at their own frame rate and optionally looped, so a file behaves like a live camera
(tests, demos, benchmarks). The same class runs a GStreamer description when OpenCV was built with
GStreamer (JetPack's OpenCV), via api_preference=cv2.CAP_GSTREAMER.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import cv2
import numpy as np

from appliance.capture.base import ThreadedSource
from appliance.capture.frame import redact
from appliance.errors import CaptureError

#: network streams: fail an open or a read after this long instead of blocking forever
NETWORK_TIMEOUT_MS = 5000


def _kind(uri: str) -> str:
    u = uri.strip()
    if u.isdigit():
        return "device"
    if "://" in u and not u.lower().startswith("file://"):
        return "network"
    return "file"


class OpenCVSource(ThreadedSource):
    """cv2.VideoCapture on a reader thread; end of file (loop=False) or a read error = failed."""

    def __init__(self, uri: str, width: int, height: int, fps: float, loop: bool = True,
                 api_preference: int = cv2.CAP_ANY, name: str | None = None, decode_threads: int = 1) -> None:
        super().__init__(name or f"opencv:{uri}", width, height)
        self.uri = uri.strip()
        self.fps = float(fps)
        self.loop = loop
        self.api_preference = api_preference
        self.decode_threads = int(decode_threads)
        self.kind = "pipeline" if api_preference == cv2.CAP_GSTREAMER else _kind(self.uri)
        self._cap: cv2.VideoCapture | None = None
        self._period_s = 1.0 / self.fps
        self._next_due = 0.0
        self._reason = "end of stream"

    # -- device ----------------------------------------------------------------------------------------
    def _path(self) -> str:
        return self.uri[len("file://"):] if self.uri.lower().startswith("file://") else self.uri

    def _make_capture(self) -> cv2.VideoCapture:
        if self.kind == "device":
            cap = cv2.VideoCapture(int(self.uri), self.api_preference)
            if cap.isOpened():  # hints only; fit_frame scales whatever the device delivers
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
                cap.set(cv2.CAP_PROP_FPS, self.fps)
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # do not let the driver queue stale frames
            return cap
        if self.kind == "network":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS,
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, *self._decoder_params()]
            api = cv2.CAP_FFMPEG if self.api_preference == cv2.CAP_ANY else self.api_preference
            return cv2.VideoCapture(self.uri, api, params)
        if self.kind == "pipeline":
            return cv2.VideoCapture(self.uri, cv2.CAP_GSTREAMER)
        return cv2.VideoCapture(self._path(), self.api_preference, self._decoder_params())

    def _decoder_params(self) -> list[int]:
        """Software decoder threads (CAP_PROP_N_THREADS; 0 leaves FFmpeg's one per core)."""
        return [cv2.CAP_PROP_N_THREADS, self.decode_threads] if self.decode_threads > 0 else []

    def _start(self) -> None:
        if self.kind == "file":
            p = Path(self._path())
            if not p.is_file():
                raise CaptureError(f"{self.name}: video file not found: {p}")
            if not os.access(p, os.R_OK):
                raise CaptureError(f"{self.name}: video file not readable (permissions): {p}")
        cap = self._make_capture()
        if not cap.isOpened():
            cap.release()
            hint = {
                "device": "is the camera plugged in, and may this user open /dev/video*?",
                "network": "is the stream reachable, and are the URL and credentials right?",
                "file": "is it a video container/codec OpenCV's FFmpeg can decode?",
                "pipeline": "run the description with gst-launch-1.0 to see GStreamer's error",
            }[self.kind]
            raise CaptureError(f"{self.name}: OpenCV cannot open {redact(self.uri)} ({hint})")
        if self.kind == "file":
            file_fps = cap.get(cv2.CAP_PROP_FPS)
            if math.isfinite(file_fps) and 0.5 <= file_fps <= 240:
                self._period_s = 1.0 / file_fps  # play at the file's own speed, like a live camera
        self._cap = cap
        self._next_due = time.monotonic()

    def _reopen_file(self) -> bool:
        """Start a file again from the top (reopening is more robust than seeking across backends)."""
        if self._cap is not None:
            self._cap.release()
        self._cap = self._make_capture()
        return self._cap.isOpened()

    def _pace(self) -> None:
        """Sleep until the next frame is due; if we fell behind, restart the schedule (no bursts)."""
        now = time.monotonic()
        if self._next_due > now:
            self._stop.wait(self._next_due - now)
            self._next_due += self._period_s
        else:
            self._next_due = now + self._period_s

    def _next_image(self) -> np.ndarray | None:
        cap = self._cap
        if cap is None:
            return None
        ok, image = cap.read()
        if not ok and self.kind == "file" and self.loop and not self._stop.is_set():
            if self._reopen_file():
                ok, image = self._cap.read()
            if not ok:
                self._reason = "file cannot be read again from the start"
                return None
        if not ok:
            self._reason = {"file": "end of file", "device": "camera read failed (unplugged?)",
                            "network": "stream read failed or timed out",
                            "pipeline": "GStreamer pipeline ended or failed"}[self.kind]
            return None
        if self.kind == "file":
            self._pace()
        return image

    def _end_reason(self) -> str:
        return self._reason

    def _release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
