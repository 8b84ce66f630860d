"""The frame contract every capture source honours, and the one-slot holder behind "latest frame wins".

A slow consumer must never make the camera queue up (DESIGN §2, §4c): each source's reader thread
overwrites a single slot, and `read()` hands out the newest frame not yet returned.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np


@dataclass(frozen=True)
class Frame:
    """One camera frame, already scaled to the configured size."""

    image: np.ndarray  # HxWx3 BGR uint8
    capture_ns: int  # time.monotonic_ns() when the frame was taken from the source
    index: int  # running count of frames the source delivered (gaps = frames skipped)


@dataclass(frozen=True)
class SourceStats:
    """Counters for the Frigate-style per-camera figures (camera fps, skipped fps, reconnects).

    frames_delivered: frames the source delivered from the device (camera fps; Frame.index counts them).
    frames_read: frames handed to the consumer by read() (an upper bound of process fps).
    frames_skipped: frames overwritten before anyone read them (skipped fps, "latest frame wins").
    frames_delivered = frames_read + frames_skipped (+ at most one frame waiting in the slot).
    reconnects: times the source was torn down (or failed to open) and tried again.
    """

    frames_delivered: int = 0
    frames_read: int = 0
    frames_skipped: int = 0
    reconnects: int = 0
    stalls: int = 0
    frozen: int = 0
    open_failures: int = 0


@runtime_checkable
class FrameSource(Protocol):
    """What the vision process reads frames from."""

    name: str

    def open(self) -> None: ...

    def read(self, timeout_s: float) -> Frame | None: ...

    def close(self) -> None: ...

    @property
    def is_open(self) -> bool: ...

    @property
    def stats(self) -> SourceStats: ...


class LatestFrame:
    """A one-slot holder: put() overwrites, take() waits for a frame newer than the last one taken."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._taken = True
        self._closed = False
        self.delivered = 0  # put() calls: frames from the device
        self.reads = 0  # frames returned by take()
        self.skipped = 0
        self.last_put_ns = 0

    def put(self, image: np.ndarray, capture_ns: int | None = None) -> Frame:
        """Store a new frame (numbered here), counting the unread one it replaces as skipped."""
        ns = time.monotonic_ns() if capture_ns is None else capture_ns
        with self._cond:
            self.delivered += 1
            if not self._taken:
                self.skipped += 1
            frame = Frame(image=image, capture_ns=ns, index=self.delivered)
            self._frame = frame
            self._taken = False
            self.last_put_ns = time.monotonic_ns()
            self._cond.notify_all()
            return frame

    def take(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet returned, or None after timeout_s (or at once when woken to stop)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while self._taken and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._taken:
                return None
            self._taken = True
            self.reads += 1
            return self._frame

    def wake(self, closed: bool) -> None:
        """Wake waiting readers; closed=True makes take() return None at once until reset()."""
        with self._cond:
            self._closed = closed
            self._cond.notify_all()

    def reset(self) -> None:
        """Forget the pending frame (used when a source is reopened); counters keep running."""
        with self._cond:
            self._frame = None
            self._taken = True
            self._closed = False


def fit_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Return an HxWx3 BGR uint8 image of exactly width x height, whatever the device sent.

    A camera that changes resolution or pixel layout must not garble the pipeline (DESIGN §4c).
    """
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.shape[2] == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    if (w, h) != (width, height):
        shrink = w * h > width * height
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(image)


_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s\"']+@")


def redact(text: str) -> str:
    """Strip user:password from any URL in text, so names and log lines carry no secrets."""
    return _CREDENTIALS.sub(r"\1***@", text)
