"""A watchdog around any source: reconnect with backoff on failure, stall or frozen stream.

Camera trouble is the top complaint of edge-camera users (restart loops, "no frames received", stuck
streams). This wrapper notices each case, logs why (never pixels), keeps an `online` flag for the
camera indicator and status, and counts reconnects for the per-camera figures.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections.abc import Callable

import numpy as np
from typing_extensions import Self

from appliance.capture.frame import Frame, FrameSource, LatestFrame, SourceStats
from appliance.errors import CaptureError

log = logging.getLogger(__name__)


def frame_digest(image: np.ndarray) -> int:
    """A cheap fingerprint of a frame (CRC of a sparse subsample) to spot a frozen stream."""
    h, w = image.shape[:2]
    sub = image[:: max(1, h // 24), :: max(1, w // 32)]
    return zlib.crc32(np.ascontiguousarray(sub).data)


class ResilientSource:
    """A FrameSource that keeps an inner source alive: open, watch, tear down, back off, repeat."""

    #: how often the supervisor wakes to check the watchdog when no frame arrives
    poll_s: float = 0.05

    #: how often a backoff wait asks the availability probe whether the camera is back
    probe_every_s: float = 0.2

    def __init__(self, factory: Callable[[], FrameSource], initial_backoff_s: float = 0.2,
                 max_backoff_s: float = 5.0, stall_timeout_s: float = 2.0, name: str | None = None,
                 first_frame_timeout_s: float | None = None, jitter: float = 0.2,
                 seed: int | None = None, probe: Callable[[], bool] | None = None) -> None:
        """`probe`, if given, is a cheap "is the camera there?" check (device node or file exists, RTSP
        port accepts a connection). While the watchdog backs off it asks the probe every
        `probe_every_s`; when the camera was absent and is present again it retries at once, so a long
        backoff never delays a returning camera (vision is back within a second or two)."""
        self._factory = factory
        self._probe = probe
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max(max_backoff_s, initial_backoff_s)
        self.stall_timeout_s = stall_timeout_s
        #: a camera may take longer for its first frame than between frames
        self.first_frame_timeout_s = first_frame_timeout_s or max(2 * stall_timeout_s, 5.0)
        self.jitter = jitter
        self._rng = random.Random(seed)
        self.name = name or "capture"
        self._slot = LatestFrame()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._inner: FrameSource | None = None
        self._inner_lock = threading.Lock()
        self._open = False
        self._online = False
        self._reconnects = self._stalls = self._frozen = self._open_failures = 0
        self._inner_skipped = 0
        self.last_error: str | None = None
        self.backoffs: list[float] = []  # recent waits before a retry (kept short), for status and tests
        self.online_since_ns: int | None = None

    # -- FrameSource --------------------------------------------------------------------------------
    def open(self) -> None:
        """Start the supervisor; source errors do not raise here, they are retried (see last_error)."""
        with self._lock:
            if self._open:
                return
            self._stop.clear()
            self._slot.reset()
            self._open = True
            self._thread = threading.Thread(target=self._supervise, name=f"capture-watchdog:{self.name}",
                                            daemon=True)
            self._thread.start()

    def read(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet returned; None within timeout_s while offline or reconnecting."""
        if not self._open:
            raise CaptureError(f"{self.name}: read() on a source that is not open")
        return self._slot.take(timeout_s)

    def close(self) -> None:
        """Stop reconnecting and close the inner source (a GStreamer child is gone on return)."""
        with self._lock:
            if not self._open:
                return
            self._stop.set()
            self._slot.wake(closed=True)
            inner = self._inner
            if inner is not None:
                inner.close()  # wakes a supervisor blocked in the inner open() or read() at once
            t = self._thread
            if t is not None and t is not threading.current_thread():
                t.join(2.0)
            self._close_inner()  # in case the supervisor is stuck in a slow open()
            self._thread = None
            self._open = False
            self._online = False
            self.online_since_ns = None

    @property
    def is_open(self) -> bool:
        """True from open() to close(): the box means to capture (whether or not frames flow)."""
        return self._open

    @property
    def online(self) -> bool:
        """True while the inner source is open and delivering fresh, changing frames."""
        return self._online

    @property
    def inner(self) -> FrameSource | None:
        return self._inner

    @property
    def stats(self) -> SourceStats:
        s = self._slot
        inner = self._inner
        # frames the inner source dropped before the watchdog saw them still count as camera frames
        dropped = self._inner_skipped + (inner.stats.frames_skipped if inner is not None else 0)
        return SourceStats(frames_delivered=s.delivered + dropped, frames_read=s.reads,
                           frames_skipped=s.skipped + dropped, reconnects=self._reconnects,
                           stalls=self._stalls, frozen=self._frozen, open_failures=self._open_failures)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ResilientSource {self.name} online={self._online} reconnects={self._reconnects}>"

    # -- supervisor ---------------------------------------------------------------------------------
    def _next_backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * (2 ** attempt))
        return base * (1.0 + self.jitter * self._rng.random())

    def _close_inner(self) -> None:
        with self._inner_lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            self._inner_skipped += inner.stats.frames_skipped
            try:
                inner.close()
            except Exception:
                log.exception("capture %s: closing the source failed", self.name)

    def _supervise(self) -> None:
        attempt = 0
        first = True
        while not self._stop.is_set():
            if not first:
                self._reconnects += 1
            first = False
            started = time.monotonic()
            try:
                reason = self._run_once()
            except Exception as exc:  # noqa: BLE001 - the watchdog itself must never die
                reason = f"source error: {type(exc).__name__}: {exc}"
            self._online = False
            self.online_since_ns = None
            self._close_inner()
            if self._stop.is_set():
                return
            healthy_for = time.monotonic() - started
            if reason.startswith("open failed") or healthy_for < max(self.stall_timeout_s, 1.0):
                attempt += 1  # keeps failing fast: back off further
            else:
                attempt = 1  # it ran well for a while: retry soon
            delay = self._next_backoff(attempt - 1)
            self.backoffs = (self.backoffs + [delay])[-20:]
            self.last_error = reason
            log.warning("capture %s offline: %s; reconnecting in %.2f s", self.name, reason, delay)
            if self._wait_backoff(delay):
                return

    def _probe_ok(self) -> bool | None:
        if self._probe is None:
            return None
        try:
            return bool(self._probe())
        except Exception:  # noqa: BLE001 - a failing probe only means "do not know"
            return None

    def _wait_backoff(self, delay: float) -> bool:
        """Wait `delay` s, or less if the probe sees the camera come back; True if stopped meanwhile."""
        if self._probe is None:
            return self._stop.wait(delay)
        deadline = time.monotonic() + delay
        was_absent = self._probe_ok() is False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._stop.is_set()
            if self._stop.wait(min(left, self.probe_every_s)):
                return True
            present = self._probe_ok()
            if present is False:
                was_absent = True
            elif present and was_absent:
                log.info("capture %s: the camera is back; reconnecting now", self.name)
                return self._stop.is_set()

    def _run_once(self) -> str:
        """Open one inner source and pump its frames until it fails, stalls or freezes; return why."""
        try:
            inner = self._factory()
            self._inner = inner
            inner.open()
        except CaptureError as exc:
            self._open_failures += 1
            return f"open failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - an unexpected device error is still a retryable failure
            self._open_failures += 1
            return f"open failed: {type(exc).__name__}: {exc}"
        opened = time.monotonic()
        last_new = None  # monotonic time of the last frame that differed from the one before
        last_frame = opened
        digest: int | None = None
        while not self._stop.is_set():
            try:
                frame = inner.read(self.poll_s)
            except CaptureError as exc:
                return f"source failed: {exc}"
            now = time.monotonic()
            if frame is not None:
                last_frame = now
                d = frame_digest(frame.image)
                if d != digest or last_new is None:
                    digest, last_new = d, now
                elif now - last_new >= self.stall_timeout_s:
                    self._frozen += 1
                    return f"frozen stream: the same frame for {now - last_new:.1f} s"
                self._slot.put(frame.image, frame.capture_ns)
                if not self._online:
                    self._online = True
                    self.online_since_ns = time.monotonic_ns()
                    self.last_error = None
                    log.info("capture %s online (%s)", self.name, inner.name)
                continue
            failure = getattr(inner, "failure", None)
            if failure is not None or not inner.is_open:
                return f"source failed: {failure or 'closed'}"
            waited = now - last_frame
            limit = self.stall_timeout_s if last_new is not None else self.first_frame_timeout_s
            if waited >= limit:
                self._stalls += 1
                return f"stalled: no frame for {waited:.1f} s"
        return "closed"
