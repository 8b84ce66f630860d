from __future__ import annotations

import time

import psutil
import pytest

from appliance.client import ApplianceClient
from appliance.config import default_config
from appliance.ops.supervisor import Supervisor


def wait_for(predicate, timeout_s: float, period_s: float = 0.05):
    """Poll until predicate() is truthy; return its value or fail with the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def gst_children(pid: int | None) -> list[psutil.Process]:
    """gst-launch processes under a process (the GStreamer capture device holders)."""
    if pid is None:
        return []
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "gst-launch" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def make_appliance(run_dir, tmp_path):
    started: list[tuple[Supervisor, ApplianceClient]] = []

    def start(**overrides) -> tuple[Supervisor, ApplianceClient]:
        cfg = default_config().with_overrides(run_dir=str(run_dir), data_dir=str(tmp_path / "data"), **overrides)
        (tmp_path / "logs").mkdir(exist_ok=True)
        sup = Supervisor(cfg, log_dir=tmp_path / "logs")
        sup.start()
        client = ApplianceClient(f"unix:{cfg.path(cfg.serving.unix_socket)}")
        client.wait_ready(60)
        started.append((sup, client))
        return sup, client

    yield start
    for sup, client in started:
        client.close()
        sup.stop()
