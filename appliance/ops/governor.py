"""Governor: CPU/GPU load, memory and temperature -> how hard vision may work.

It degrades in steps (fewer frames, sparser detection, lower precision, training paused) before the
SoC throttles itself, and restores one step at a time once the pressure has gone, with hysteresis so
it does not oscillate. Every change is logged and exported as a metric.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client import Counter, Gauge

from appliance.config.schema import GovernorConfig

log = logging.getLogger("appliance.governor")

LEVELS = ("normal", "warm", "hot", "critical")
FPS_FACTOR = (1.0, 0.75, 0.5, 0.25)
DETECT_INTERVAL_FACTOR = (1, 2, 3, 4)
PRECISION_DOWN = {"fp32": "fp16", "fp16": "int8", "int8": "int8"}

LEVEL_GAUGE = Gauge("appliance_governor_level", "0 normal, 1 warm, 2 hot, 3 critical")
FPS_GAUGE = Gauge("appliance_governor_fps", "frame rate the governor allows vision")
INTERVAL_GAUGE = Gauge("appliance_governor_detect_interval", "detector runs every N frames")
CHANGES = Counter("appliance_governor_changes", "governor level changes")
TEMP_GAUGE = Gauge("appliance_temperature_celsius", "hottest thermal zone")


@dataclass(frozen=True)
class Readings:
    """One sample of the box's pressure; None where the box has no such sensor."""

    cpu_percent: float
    mem_percent: float
    temp_c: float | None = None
    gpu_percent: float | None = None


@dataclass(frozen=True)
class Decision:
    level: int
    fps: float
    detect_interval: int
    precision: str
    pause_training: bool
    reason: str

    @property
    def level_name(self) -> str:
        return LEVELS[self.level]


class SystemReadings:
    """Real sensors: psutil, Linux thermal zones in sysfs, and Jetson's tegrastats when present."""

    def __init__(self, sysfs_root: str | Path = "/") -> None:
        self.root = Path(sysfs_root)
        psutil.cpu_percent(None)  # prime: the first call has no interval to average over

    def temperature_c(self) -> float | None:
        """Hottest thermal zone (millidegrees in sysfs), ignoring unreadable or absurd values."""
        temps = []
        for zone in sorted((self.root / "sys/class/thermal").glob("thermal_zone*/temp")):
            try:
                milli = int(zone.read_text().strip())
            except (OSError, ValueError):
                continue
            if -40_000 < milli < 150_000:
                temps.append(milli / 1000.0)
        return max(temps) if temps else None

    def gpu_percent(self) -> float | None:
        """Jetson GPU load: sysfs `gpu.0/load` (per mille) or one tegrastats line (GR3D_FREQ n%)."""
        for load in (self.root / "sys/devices").glob("*gpu*/load"):
            try:
                return int(load.read_text().strip()) / 10.0
            except (OSError, ValueError):
                continue
        exe = shutil.which("tegrastats")
        if exe is None or self.root != Path("/"):
            return None
        try:  # tegrastats prints forever; one line within a second is all we need
            out = subprocess.run([exe, "--interval", "100"], capture_output=True, timeout=1.0, check=False).stdout
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
        m = re.search(rb"GR3D_FREQ (\d+)%", out)
        return float(m.group(1)) if m else None

    def read(self) -> Readings:
        return Readings(cpu_percent=psutil.cpu_percent(None), mem_percent=psutil.virtual_memory().percent,
                        temp_c=self.temperature_c(), gpu_percent=self.gpu_percent())


class Governor:
    """Turns readings into a Decision, one control period at a time."""

    def __init__(self, cfg: GovernorConfig, base_fps: float, base_detect_interval: int, base_precision: str,
                 on_change=None) -> None:  # noqa: ANN001 - callback(Decision)
        self.cfg = cfg
        self.base_fps, self.base_interval, self.base_precision = base_fps, base_detect_interval, base_precision
        self.level = 0
        self.on_change = on_change
        self.decision = self._decide(0, "start")
        self.changes = 0
        LEVEL_GAUGE.set(0)
        FPS_GAUGE.set(self.decision.fps)
        INTERVAL_GAUGE.set(self.decision.detect_interval)

    def _thermal_level(self, temp: float | None) -> int:
        """Target level from temperature with hysteresis: step up at a threshold, down only below it - h."""
        if temp is None:
            return 0
        limits = (self.cfg.temp_warm_c, self.cfg.temp_hot_c, self.cfg.temp_critical_c)
        up = sum(temp >= t for t in limits)
        if up >= self.level:
            return up
        down = sum(temp >= t - self.cfg.hysteresis_c for t in limits)  # stay while within the band
        return max(up, min(self.level, down))

    def _load_level(self, r: Readings) -> int:
        busy = (r.cpu_percent >= self.cfg.cpu_high_percent or r.mem_percent >= self.cfg.mem_high_percent
                or (r.gpu_percent is not None and r.gpu_percent >= self.cfg.gpu_high_percent))
        return 1 if busy else 0

    def _decide(self, level: int, reason: str) -> Decision:
        precision = self.base_precision if level < 2 else PRECISION_DOWN[self.base_precision]
        return Decision(level=level, fps=round(self.base_fps * FPS_FACTOR[level], 3),
                        detect_interval=self.base_interval * DETECT_INTERVAL_FACTOR[level], precision=precision,
                        pause_training=level >= 2, reason=reason)

    def step(self, r: Readings) -> Decision:
        """One control period: a new decision now if the readings call for one."""
        thermal = self._thermal_level(r.temp_c)
        load = self._load_level(r)
        target = max(thermal, load)
        if target < self.level:  # restore gradually: one level per period
            target = self.level - 1
        if r.temp_c is not None:
            TEMP_GAUGE.set(r.temp_c)
        if target != self.level:
            why = (f"temp {r.temp_c:.1f} C" if r.temp_c is not None else "temp n/a") + \
                  f", cpu {r.cpu_percent:.0f}%, mem {r.mem_percent:.0f}%" + \
                  (f", gpu {r.gpu_percent:.0f}%" if r.gpu_percent is not None else "")
            old = LEVELS[self.level]
            self.level = target
            self.decision = self._decide(target, why)
            self.changes += 1
            CHANGES.inc()
            LEVEL_GAUGE.set(target)
            FPS_GAUGE.set(self.decision.fps)
            INTERVAL_GAUGE.set(self.decision.detect_interval)
            log.warning("governor %s -> %s (%s): fps %.2f, detect every %d, precision %s, training %s",
                        old, LEVELS[target], why, self.decision.fps, self.decision.detect_interval,
                        self.decision.precision, "paused" if self.decision.pause_training else "allowed")
            if self.on_change is not None:
                self.on_change(self.decision)
        return self.decision
