"""What every benchmark records: machine, versions, percentiles; JSON + Markdown + plot writers."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    from appliance import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host_cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "appliance": __version__, "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def percentiles(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4), "max_ms": round(float(a.max()), 4)}


def write_results(name: str, result: dict[str, Any], markdown: str, json_out: Path | None) -> Path:
    """Write `<json_out>` (or bench/results/<name>.json) plus a Markdown summary beside it."""
    out = Path(json_out) if json_out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False))
    out.with_suffix(".md").write_text(markdown)
    return out


def peak_rss_mb(pid: int | None = None) -> float:
    p = psutil.Process(pid or os.getpid())
    try:
        return round(p.memory_full_info().uss / 2**20, 1)
    except (psutil.AccessDenied, AttributeError):
        return round(p.memory_info().rss / 2**20, 1)
