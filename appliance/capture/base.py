"""Shared life cycle of every concrete source: a reader thread feeding a one-slot holder.

Subclasses only say how to start the device, how to get the next image, and how to stop; the base
makes open/read/close/stats behave the same everywhere, so the resilient wrapper can treat them alike.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

import numpy as np
from typing_extensions import Self

from appliance.capture.frame import Frame, LatestFrame, SourceStats, fit_frame, redact
from appliance.errors import CaptureError

log = logging.getLogger(__name__)


class ThreadedSource(ABC):
    """A FrameSource whose reader thread overwrites a one-slot holder (latest frame wins)."""

    #: how long close() waits for the reader thread; it finishes on its own after that
    join_timeout_s: float = 0.5

    def __init__(self, name: str, width: int, height: int) -> None:
        self.name = redact(name)
        self.width = int(width)
        self.height = int(height)
        self._slot = LatestFrame()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._open = False
        self._failure: str | None = None

    # -- what a concrete source provides ---------------------------------------------------------
    @abstractmethod
    def _start(self) -> None:
        """Open the device (or start the child); raise CaptureError with a clear message."""

    @abstractmethod
    def _next_image(self) -> np.ndarray | None:
        """Block until the next image; None means the stream ended. Runs on the reader thread."""

    def _interrupt(self) -> None:
        """Called by close() first, from any thread: unblock _next_image or a slow _start (kill a child)."""

    def _release(self) -> None:
        """Release the device. Runs on the reader thread when it exits, so no read races a release."""

    def _end_reason(self) -> str:
        return "end of stream"

    # -- FrameSource ------------------------------------------------------------------------------
    def open(self) -> None:
        """Start capturing; a second call while open does nothing."""
        with self._lock:
            if self._open:
                return
            self._stop.clear()
            self._failure = None
            self._slot.reset()
            self._start()
            self._open = True
            self._thread = threading.Thread(target=self._run, name=f"capture:{self.name}", daemon=True)
            self._thread.start()

    def read(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet returned; None on timeout, or at once once the source has failed."""
        if not self._open:
            raise CaptureError(f"{self.name}: read() on a source that is not open")
        return self._slot.take(timeout_s)

    def close(self) -> None:
        """Stop the reader and release the device; safe to call twice."""
        # Interrupt before taking the lock: an open() still waiting for its first frame holds it.
        self._stop.set()
        self._slot.wake(closed=True)
        self._interrupt()
        with self._lock:
            if not self._open:
                return
            t = self._thread
            if t is not None and t is not threading.current_thread():
                t.join(self.join_timeout_s)
            self._thread = None
            self._open = False

    @property
    def is_open(self) -> bool:
        """True while the device is held and delivering (opened, not failed, not closed)."""
        return self._open and self._failure is None

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def failure(self) -> str | None:
        """Why the source stopped (end of file, child exited, read error), or None."""
        return self._failure

    @property
    def stats(self) -> SourceStats:
        s = self._slot
        return SourceStats(frames_delivered=s.delivered, frames_read=s.reads, frames_skipped=s.skipped)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.width}x{self.height}>"

    # -- reader thread ------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        self._failure = redact(reason)
        log.warning("capture source %s failed: %s", self.name, self._failure)
        self._slot.wake(closed=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                image = self._next_image()
                taken_ns = time.monotonic_ns()
                if image is None:
                    if not self._stop.is_set():
                        self._fail(self._end_reason())
                    return
                if self._stop.is_set():
                    return
                self._slot.put(fit_frame(image, self.width, self.height), taken_ns)
        except Exception as exc:  # noqa: BLE001 - a device error must end as a reported failure, never a dead thread
            if not self._stop.is_set():
                self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            try:
                self._release()
            except Exception:  # pragma: no cover - release errors are only logged
                log.exception("capture source %s: release failed", self.name)
