"""Orchestrate the demo: the appliance's processes under the supervisor, plus the player process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.ops.logs import setup_logging
from appliance.ops.supervisor import Supervisor


def run_demo(cfg: ApplianceConfig, duration_s: float, json_out: Path | None) -> int:
    """Fresh state in build/demo, appliance up, scripted player for duration_s, clean shutdown."""
    setup_logging("demo", level="WARNING")
    work = Path("build/demo").resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    cfg = cfg.with_overrides(run_dir=f"/tmp/appliance-demo-{os.getpid()}", data_dir=str(work / "data"))
    sup = Supervisor(cfg, log_dir=work / "logs")
    sup.start()
    try:
        argv = [sys.executable, "-m", "appliance", "demo-client", "--socket",
                cfg.path(cfg.serving.unix_socket), "--duration", str(duration_s)]
        if json_out:
            argv += ["--json", str(Path(json_out).resolve())]
        code = subprocess.call(argv)
    finally:
        sup.stop()
        shutil.rmtree(cfg.path("{run_dir}"), ignore_errors=True)
    if code != 0:
        print(f"demo failed (player exit {code}); process logs in {work / 'logs'}", file=sys.stderr)
    return code
