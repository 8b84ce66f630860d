"""SIGTERM/SIGINT as a stop request that is safe when signals arrive more than once.

A handler that calls `threading.Event.set()` takes the Event's lock. When the supervisor is
killed, the kernel sends a child its parent-death signal once per supervisor thread that exits
(the child is reparented thread by thread), so a second SIGTERM can interrupt the first handler
while it holds that lock: the nested handler then waits on its own thread forever and the worker
outlives its supervisor. The handler here only assigns a flag, which takes no lock.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

POLL_S = 0.05


class StopSignal:
    """Installs SIGTERM/SIGINT handlers in the main thread; `is_set()`/`wait()` like an Event."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._requested = False
        self.signum: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Only assignments: re-entrant, lock-free, safe to run nested inside itself.
        self.signum = signum
        self._requested = True

    def set(self) -> None:
        """Request a stop from code (tests, an internal fatal condition)."""
        self._requested = True

    def is_set(self) -> bool:
        return self._requested

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a stop is requested (or `timeout` passes); True when requested.

        Polls a plain flag: a signal delivered to another thread would not wake a blocked lock
        wait in the main thread, and a short sleep costs nothing on an idle process.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._requested:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(POLL_S, left))
            else:
                time.sleep(POLL_S)
        return self._requested
