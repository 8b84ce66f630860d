"""ONNX Runtime sessions for the vision models.

One place decides execution providers, threads and the TensorRT engine cache, so every model on a box
runs the same way the firmware config says, and a missing GPU degrades to CPU instead of crashing.

Reduced precision (state at this commit; written on a CPU-only machine, so none of it has run on a GPU):
FP16 is the TensorRT EP's `trt_fp16_enable`, with its engine cache keyed by model sha256, TensorRT
version and precision (ORT adds the GPU's compute capability). INT8 is accepted but, with no calibration
table shipped, builds the FP16 engine and says so. Where TensorRT/CUDA are absent every precision runs
the FP32 CPU session (tests/vision/test_runtime.py checks outputs are identical). The native TensorRT
path (`vision.runtime: tensorrt`: engines built per device, FP16 and calibrated INT8, cached by GPU,
TensorRT version, model sha256, precision and shapes) is `appliance/vision/trt_engine.py`; its
engine-vs-ONNX parity tests are marked `gpu` and `bench/gpu_session.sh` runs them on a GPU machine.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.errors import ModelError

log = logging.getLogger(__name__)

# Config names -> ONNX Runtime execution providers, in the order we prefer them.
PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_CPU = "CPUExecutionProvider"


def resolve_providers(providers: Sequence[str]) -> list[str]:
    """Config names -> the ORT providers this build of onnxruntime has, in order, always ending with CPU."""
    unknown = [p for p in providers if p not in PROVIDER_NAMES]
    if unknown:
        raise ModelError(f"unknown execution provider(s) {unknown}; choose from {list(PROVIDER_NAMES)}")
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for name in providers:
        ep = PROVIDER_NAMES[name]
        if ep == _CPU or ep in chosen:
            continue
        if ep in available:
            chosen.append(ep)
        else:
            log.info("execution provider %s is not available in this onnxruntime build; skipping", ep)
    chosen.append(_CPU)
    return chosen


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _trt_version() -> str:
    try:
        from importlib.metadata import version

        return version("tensorrt")
    except Exception:  # noqa: BLE001 - TensorRT from JetPack may have no dist metadata
        return "unknown"


def _provider_options(ep: str, onnx_path: Path, precision: str, cache_dir: Path | None) -> dict[str, str]:
    if ep == "TensorrtExecutionProvider":
        if precision == "int8":
            log.warning("int8 needs a calibration table that we do not ship; building an fp16 engine instead")
        opts = {
            "trt_fp16_enable": "True" if precision in ("fp16", "int8") else "False",
            "trt_engine_cache_enable": "False",
        }
        if cache_dir is not None:
            # Keyed by model hash, TensorRT version and precision (ORT adds the GPU's compute capability),
            # so a model update or a JetPack upgrade never loads a stale engine.
            key = f"{_file_sha256(onnx_path)[:16]}-trt{_trt_version()}-{precision}"
            engine_dir = Path(cache_dir) / key
            engine_dir.mkdir(parents=True, exist_ok=True)
            opts.update({
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(engine_dir),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(engine_dir),
            })
        return opts
    if ep == "CUDAExecutionProvider":
        return {"device_id": "0"}
    return {}


def _session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    if so.intra_op_num_threads > 1:
        # Spinning workers burn a core while waiting; on a box shared with the ranker (and in our 2-core
        # measurements) it doubled CPU per frame and tripled p99 for no gain at p50.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: EP fallbacks are logged by us, once
    return so


def create_session(
    onnx_path: Path,
    providers: Sequence[str] = ("cpu",),
    threads: int = 1,
    precision: str = "fp32",
    cache_dir: Path | None = None,
    warm: bool = True,
) -> ort.InferenceSession:
    """Load one ONNX model on the best available provider; raise ModelError if it cannot load at all.

    If a GPU provider fails to initialise (driver, TensorRT build error) we retry without it, down to CPU,
    so a broken accelerator costs speed, not the camera pipeline.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}. Run `make models` (or reinstall the appliance) "
                         "and check `appliance models verify`.")
    if precision not in ("fp32", "fp16", "int8"):
        raise ModelError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    eps = resolve_providers(providers)
    so = _session_options(threads)
    last_error: Exception | None = None
    for start in range(len(eps)):
        tried = eps[start:]
        opts = [_provider_options(ep, path, precision, cache_dir) for ep in tried]
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=tried, provider_options=opts)
        except Exception as exc:  # noqa: BLE001 - ORT raises several pybind types; we re-raise ours below
            last_error = exc
            if tried[0] != _CPU:
                log.warning("execution provider %s failed for %s (%s); falling back", tried[0], path.name, exc)
                continue
            break
        if warm:
            warmup(session)
        return session
    raise ModelError(f"cannot load model {path}: {last_error}. The file may be corrupt; run "
                     "`appliance models verify` and rebuild with `make models` or reinstall.") from None


# Named dynamic dimensions of our models beyond the batch: (smallest, typical, largest). The detector's
# input height is dynamic ("height", a multiple of 16; see appliance/vision/detector.input_rows) so a
# 16:9 camera runs on 96 rows, not 128. Warm-up uses the typical size; TensorRT profiles span the range.
NAMED_DIMS: dict[str, tuple[int, int, int]] = {"height": (16, 96, 128)}


def _concrete_shape(shape: Sequence[object]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else NAMED_DIMS.get(str(d), (1, 1, 1))[1] for d in shape)


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
           "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def warmup(session: ort.InferenceSession, runs: int = 2) -> float:
    """Run zeros through the model so the first real frame does not pay for allocation / engine build.

    Returns the milliseconds of the last run.
    """
    feeds = {i.name: np.zeros(_concrete_shape(i.shape), dtype=_DTYPES.get(i.type, np.float32))
             for i in session.get_inputs()}
    elapsed = 0.0
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        session.run(None, feeds)
        elapsed = (time.perf_counter() - t0) * 1000.0
    return elapsed
