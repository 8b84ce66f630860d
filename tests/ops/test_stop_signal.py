"""A burst of SIGTERMs (what a killed multi-threaded supervisor sends a child) still stops a worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

WORKER = """
import sys, threading, time
from appliance.ops.stop_signal import StopSignal
stop = StopSignal()
for _ in range(4):  # other threads, as in the ranker: a signal may land on any of them
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
stop.wait()
print("stopped", stop.signum, flush=True)
"""


def test_a_burst_of_sigterms_stops_the_waiting_main_thread():
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            # A sustained flood: with a handler that takes a lock (Event.set) this hangs the
            # worker nearly every time, because a signal lands while the handler holds the lock.
            for _ in range(20000):
                if proc.poll() is not None:
                    break
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    break
            out, _ = proc.communicate(timeout=10)
            # The flood may outlive the handler: once the interpreter finalises, SIGTERM is
            # default again and ends the exit with -15. What matters is that wait() returned.
            assert out.strip() == f"stopped {int(signal.SIGTERM)}"
            assert proc.returncode in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_wait_times_out_without_a_signal_and_set_from_code_stops_it():
    from appliance.ops.stop_signal import StopSignal

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = StopSignal()
        t0 = time.monotonic()
        assert stop.wait(0.2) is False
        assert 0.15 <= time.monotonic() - t0 < 2
        stop.set()
        assert stop.is_set() and stop.wait() is True
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
