"""`appliance doctor`: what this box has, and which firmware config applies."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
from pathlib import Path

import psutil

from appliance import __version__
from appliance.config import ApplianceConfig
from appliance.config.schema import REPO_ROOT

JETSON_MODELS = (  # device-tree model string fragment -> firmware config
    ("Orin Nano", "jetson-orin-nano"),
    ("Orin NX", "jetson-orin-nx"),
    ("AGX Orin", "jetson-agx-orin"),
    ("Xavier NX", "jetson-xavier-nx"),
)


def _jetson_model() -> str | None:
    p = Path("/proc/device-tree/model")
    try:
        return p.read_bytes().rstrip(b"\0").decode(errors="replace") if p.exists() else None
    except OSError:
        return None


def _nvidia_gpu() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def pick_firmware_config(jetson: str | None, gpu: str | None) -> str:
    """Jetson model from the device tree first, then a CUDA GPU, else CPU-only."""
    if jetson:
        for fragment, name in JETSON_MODELS:
            if fragment.lower() in jetson.lower():
                return name
    return "x86-cuda" if gpu else "cpu-only"


def run_checks(cfg: ApplianceConfig) -> dict:
    import cv2
    import onnxruntime as ort

    try:
        import tensorrt  # type: ignore[import-not-found]

        trt = tensorrt.__version__
    except ImportError:
        trt = None
    gst = shutil.which("gst-launch-1.0")
    gst_version = None
    if gst:
        out = subprocess.run([gst, "--version"], capture_output=True, text=True, timeout=5, check=False)
        gst_version = out.stdout.splitlines()[0] if out.stdout else None
    cv2_gst = "GStreamer:                   YES" in cv2.getBuildInformation()
    jetson, gpu = _jetson_model(), _nvidia_gpu()
    firmware = pick_firmware_config(jetson, gpu)
    fw_path = REPO_ROOT / "firmware_configs" / f"{firmware}.yaml"
    models: dict[str, str] = {}
    try:
        from appliance.models.manifest import verify_models

        m = verify_models(Path(cfg.models_dir))
        models = {name: "ok" for name in m.models}
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        models = {"error": str(exc)}
    return {
        "appliance": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "jetson_model": jetson,
        "nvidia_gpu": gpu,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "tensorrt": trt,
        "gstreamer": gst_version,
        "opencv": cv2.__version__,
        "opencv_gstreamer": cv2_gst,
        "cameras": sorted(glob.glob("/dev/video*")),
        "firmware_config": firmware,
        "firmware_config_path": str(fw_path) if fw_path.exists() else None,
        "models": models,
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="appliance doctor", show_header=False)
    t.add_column("check")
    t.add_column("value")
    for key, value in report.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
        t.add_row(key, "—" if value is None else str(value))
    Console().print(t)
