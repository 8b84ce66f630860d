"""Supervisor: runs the ranker and vision as separate OS processes and restarts them with backoff.

A crash of one child never stops the other: ranking goes on behaviour-only while vision restarts.
SIGTERM to the supervisor stops both children (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.ops.stop_signal import StopSignal

log = logging.getLogger("appliance.supervisor")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own SIGTERM path still stops children
        pass


@dataclass
class Child:
    role: str
    argv: list[str]
    log_path: Path | None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    backoff_s: float = 0.5
    started_at: float = 0.0
    next_start: float = 0.0
    held: bool = False  # do not restart (maintenance, tests)


class Supervisor:
    """Start, watch and restart the appliance's processes."""

    MAX_BACKOFF_S = 30.0
    STABLE_AFTER_S = 30.0  # a child that ran this long gets its backoff reset

    def __init__(self, cfg: ApplianceConfig, roles: tuple[str, ...] = ("ranker", "vision"),
                 log_dir: Path | None = None) -> None:
        self.cfg = cfg
        run_dir = Path(cfg.path("{run_dir}"))
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config_path = run_dir / "config.json"
        self.config_path.write_text(cfg.model_dump_json(indent=2))
        self.children = {
            role: Child(role, [sys.executable, "-m", "appliance", "worker", role, "--config-json",
                               str(self.config_path)],
                        (log_dir / f"{role}.log") if log_dir else None)
            for role in roles
        }
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _spawn(self, child: Child) -> None:
        out = open(child.log_path, "ab") if child.log_path else None  # noqa: SIM115 - child owns it
        child.proc = subprocess.Popen(child.argv, stdout=out or subprocess.DEVNULL,
                                      stderr=out or None, start_new_session=True, preexec_fn=_die_with_parent)
        if out:
            out.close()
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.role, child.proc.pid)

    def start(self) -> None:
        for child in self.children.values():
            self._spawn(child)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def pid(self, role: str) -> int | None:
        p = self.children[role].proc
        return p.pid if p and p.poll() is None else None

    def hold(self, role: str, held: bool = True) -> None:
        """Stop (or resume) restarting a role when it exits; the running process is left alone."""
        with self._lock:
            self.children[role].held = held

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                for child in self.children.values():
                    self._check(child)

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.proc is not None:
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > self.STABLE_AFTER_S:
                    child.backoff_s = 0.5
                return
            log.warning("%s exited with %s; restarting in %.1f s", child.role, code, child.backoff_s)
            child.proc = None
            child.next_start = now + child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, self.MAX_BACKOFF_S)
            return
        if now >= child.next_start and not self._stop.is_set() and not child.held:
            child.restarts += 1
            self._spawn(child)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child, wait, then SIGKILL what is left."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        with self._lock:
            procs = [c.proc for c in self.children.values() if c.proc is not None]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def run_supervisor(cfg: ApplianceConfig) -> int:
    """`appliance run`: serve until SIGTERM/SIGINT."""
    done = StopSignal()
    sup = Supervisor(cfg)
    sup.start()
    page = None
    if cfg.privacy.enabled:
        from appliance.privacy.server import PrivacyPage

        page = PrivacyPage(cfg.privacy, f"unix:{cfg.path(cfg.serving.unix_socket)}").start()
    done.wait()
    log.info("stopping")
    if page is not None:
        page.stop()
    sup.stop()
    return 0
