"""What machine this is, for benchmark and evaluation records (one place for the /proc/cpuinfo lookup)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    """CPU, cores, memory, Python, appliance and ONNX Runtime versions with providers, and the time (UTC)."""
    import onnxruntime as ort
    import psutil

    from appliance import __version__

    return {"host_cpu": cpu_model(), "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "appliance": __version__, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
