"""`appliance run` as an operator starts it: SIGTERM stops the supervisor and both children cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import yaml

from appliance.client import ApplianceClient
from tests.e2e.conftest import wait_for


def test_sigterm_stops_everything(run_dir, tmp_path):
    cfg = tmp_path / "box.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run_dir), "data_dir": str(tmp_path / "data"),
                                   "metrics": {"ranker_port": 0, "vision_port": 0}}))
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = ApplianceClient(f"unix:{run_dir}/appliance.sock")
        client.wait_ready(60)
        wait_for(lambda: client.get_status().vision_alive, 60)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # ranker + vision
        client.close()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_children_stop_when_the_supervisor_is_killed(run_dir, tmp_path):
    """kill -9 of the supervisor must not leave an orphaned ranker or camera behind."""
    cfg = tmp_path / "box.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run_dir), "data_dir": str(tmp_path / "data"),
                                   "metrics": {"ranker_port": 0, "vision_port": 0}}))
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        client = ApplianceClient(f"unix:{run_dir}/appliance.sock")
        client.wait_ready(60)
        client.close()
        children = wait_for(lambda: len(c := psutil.Process(proc.pid).children()) >= 2 and c, 30)
        proc.kill()
        proc.wait(timeout=5)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        for c in children:
            if c.is_running():
                c.kill()
