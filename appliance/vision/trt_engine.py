"""Native TensorRT for the vision models: build an engine per device from our ONNX files, cache it, run it.

Selected by the firmware config (`vision.runtime: tensorrt`; default `onnxruntime`). Engines are not
portable across GPUs or TensorRT releases, so each is cached under a key of GPU model (+ compute
capability), TensorRT version, model sha256, precision, input shapes (optimisation profile) and, for
INT8, the calibration set's sha256: change any of them and the engine is rebuilt (`EngineKey`). The
cache lives under `{data_dir}/trt-cache/<model>/` (a persistent volume on the box); the engine's
metadata sits beside it as JSON and the INT8 calibration cache as `<key>.calib`.

Precision, by TensorRT release:
- TensorRT <= 10 (JetPack 5/6/7, the Jetson boxes): weakly typed network; FP16 is `BuilderFlag.FP16`,
  INT8 is `BuilderFlag.INT8` with an `IInt8EntropyCalibrator2` fed from the calibration set of face
  crops (`appliance models calibrate`), whose table is cached next to the engine.
- TensorRT >= 11 (removed the weak-typing flags and calibrators): the ONNX model is converted before
  parsing, FP16 with onnxruntime's float16 converter (I/O kept float32) and INT8 as explicit Q/DQ with
  onnxruntime's static quantiser, entropy-calibrated on the same calibration set (symmetric int8, per
  channel weights, float bias, as TensorRT wants), then built strongly typed. `qdq_model` runs on CPU,
  so the INT8 recipe's accuracy is tested without a GPU.

The runner (`TrtSession`) looks like an `onnxruntime.InferenceSession` to our code (get_inputs,
get_outputs, run), so `BlazeFaceDetector` and `EmotionClassifier` keep their pre/post-processing
unchanged. Device memory and the stream come from cuda-python (`cuda.bindings.runtime`, what TensorRT
10's Python samples use) or, if that is absent, PyTorch's CUDA allocator; neither is a dependency of
the appliance. `tensorrt`, `cuda` and `torch` are imported lazily: a CPU box never imports them, and
when any is missing (or the build fails) `create_vision_session` falls back to ONNX Runtime.

Calibration crops are face pixels: they are made on the build host from development media, or on the
box from its own camera, and stay there (never in a bundle, never on the wire).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import ModelError
from appliance.models.manifest import file_sha256
from appliance.models.quantize import qdq_model

log = logging.getLogger(__name__)

#: bump when the build recipe changes in a way that changes engines (a new key for every engine)
RECIPE_VERSION = "1"
PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_BYTES = 1 << 30
CALIB_BATCH = 8


# -- cache key ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Equal keys -> reuse the cached engine; any change -> rebuild."""

    gpu: str  # e.g. "NVIDIA H100 80GB HBM3 sm_90"
    trt_version: str
    model_sha256: str
    precision: str
    input_shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]  # name, min, opt, max
    calibration_sha256: str = ""  # INT8 only
    recipe: str = RECIPE_VERSION

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def stem(self) -> str:
        return f"{self.precision}-{self.digest()}"


def profile_shapes(shape: Sequence[object], max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """An input's (min, opt, max) shapes: a dynamic first (batch) dimension spans 1..max_batch; a named
    dynamic dimension listed in runtime.NAMED_DIMS (the detector's "height") spans its stated range."""
    from appliance.vision.runtime import NAMED_DIMS  # noqa: PLC0415 - runtime imports onnxruntime

    dims = list(shape)
    lo: list[int] = []
    opt: list[int] = []
    hi: list[int] = []
    for d in dims[1:]:
        if isinstance(d, int) and d > 0:
            lo.append(d), opt.append(d), hi.append(d)
        elif str(d) in NAMED_DIMS:
            a, b, c = NAMED_DIMS[str(d)]
            lo.append(a), opt.append(b), hi.append(c)
        else:
            raise ModelError(f"only the batch dimension and {sorted(NAMED_DIMS)} may be dynamic, "
                             f"got input shape {dims}")
    if isinstance(dims[0], int) and dims[0] > 0:
        return (dims[0], *lo), (dims[0], *opt), (dims[0], *hi)
    mx = max(1, int(max_batch))
    return (1, *lo), (min(4, mx), *opt), (mx, *hi)


def onnx_inputs(onnx_path: Path) -> list[tuple[str, list[object]]]:
    """(name, shape) of the model's inputs, read with onnxruntime (no `onnx` package needed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    return [(i.name, list(i.shape)) for i in sess.get_inputs()]


def engine_key(onnx_path: Path, precision: str, max_batch: int, *, gpu: str | None = None,
               trt_version: str | None = None, calibration: Path | None = None) -> EngineKey:
    """The cache key of this model on this device (pass gpu/trt_version to compute it without a GPU)."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision == "int8" and calibration is None:
        raise ModelError("INT8 needs a calibration set: run `appliance models calibrate` and set "
                         "vision.calibration_dir")
    shapes = tuple((name, *profile_shapes(shape, max_batch)) for name, shape in onnx_inputs(onnx_path))
    return EngineKey(gpu=gpu if gpu is not None else gpu_name(),
                     trt_version=trt_version if trt_version is not None else _trt().__version__,
                     model_sha256=file_sha256(onnx_path), precision=precision, input_shapes=shapes,
                     calibration_sha256=file_sha256(calibration) if precision == "int8" and calibration else "")


class EngineCache:
    """Engines on disk: `<root>/<model>/<precision>-<digest>.engine` + `.json` (the key) + `.calib` (INT8)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, model: str, key: EngineKey) -> tuple[Path, Path, Path]:
        d = self.root / model
        stem = key.stem()
        return d / f"{stem}.engine", d / f"{stem}.json", d / f"{stem}.calib"

    def lookup(self, model: str, key: EngineKey) -> Path | None:
        """The cached engine for exactly this key, or None (missing, other key, or a damaged file)."""
        engine, meta, _ = self.paths(model, key)
        if not engine.is_file() or not meta.is_file():
            return None
        try:
            recorded = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if recorded.get("key") != json.loads(json.dumps(asdict(key))):
            return None
        if recorded.get("engine_sha256") != file_sha256(engine):
            log.warning("cached engine %s is damaged; rebuilding", engine)
            return None
        return engine

    def store(self, model: str, key: EngineKey, plan: bytes, build_s: float) -> Path:
        """Write the engine atomically with its key, and drop this model's engines of the same precision
        built for another key (an old model, TensorRT or GPU): they can never be loaded again here."""
        engine, meta, calib = self.paths(model, key)
        engine.parent.mkdir(parents=True, exist_ok=True)
        tmp = engine.with_suffix(".engine.tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, engine)
        meta.write_text(json.dumps({"key": asdict(key), "engine_sha256": hashlib.sha256(plan).hexdigest(),
                                    "bytes": len(plan), "build_s": round(build_s, 2),
                                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                   indent=2, sort_keys=True))
        for old in engine.parent.glob(f"{key.precision}-*.engine"):
            if old != engine:
                for p in (old, old.with_suffix(".json"), old.with_suffix(".calib"), old.with_suffix(".qdq.onnx")):
                    p.unlink(missing_ok=True)
        return engine


# -- environment --------------------------------------------------------------------------------
def _trt():
    """The `tensorrt` module, imported on first use only (ModelError when absent)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose: CPU boxes never import it
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install failing to load its .so
        raise ModelError(f"TensorRT is not usable here ({exc}); use vision.runtime: onnxruntime") from None
    return trt


def trt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def implicit_precision(trt: Any) -> bool:
    """True where the builder still has FP16/INT8 flags and calibrators (TensorRT <= 10)."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt, "IInt8EntropyCalibrator2")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415 - cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # noqa: PLC0415 - older cuda-python
    return cudart


def gpu_name() -> str:
    """GPU model and compute capability of device 0, e.g. 'NVIDIA H100 80GB HBM3 sm_90'."""
    try:
        cudart = _cudart()
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
            return f"{name.strip(chr(0)).strip()} sm_{prop.major}{prop.minor}"
    except Exception:  # noqa: BLE001 - fall through to the next way of asking
        pass
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{torch.cuda.get_device_name(0)} sm_{major}{minor}"
    except Exception:  # noqa: BLE001
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        name, cap = (s.strip() for s in out.split(",", 1))
        return f"{name} sm_{cap.replace('.', '')}"
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"no CUDA GPU found ({exc})") from None


class _Memory:
    """Device buffers, copies and one stream, from cuda-python or (if absent) PyTorch."""

    def __init__(self) -> None:
        try:
            self._cudart = _cudart()
            err, self.stream = self._cudart.cudaStreamCreate()
            self._check(err, "cudaStreamCreate")
            self.backend = "cuda-python"
        except ImportError:
            try:
                import torch  # noqa: PLC0415
            except ImportError:
                raise ModelError("native TensorRT needs cuda-python or PyTorch for device memory; "
                                 "`pip install cuda-python`") from None
            self._cudart = None
            self._torch = torch
            self._stream = torch.cuda.Stream()
            self.stream = self._stream.cuda_stream
            self.backend = "torch"
        self._keep: list[Any] = []

    @staticmethod
    def _check(err: Any, what: str) -> None:
        if int(err) != 0:
            raise ModelError(f"CUDA error in {what}: {err}")

    def alloc(self, nbytes: int) -> int:
        nbytes = max(1, int(nbytes))
        if self._cudart is not None:
            err, ptr = self._cudart.cudaMalloc(nbytes)
            self._check(err, "cudaMalloc")
            self._keep.append(ptr)
            return int(ptr)
        t = self._torch.empty(nbytes, dtype=self._torch.uint8, device="cuda")
        self._keep.append(t)
        return int(t.data_ptr())

    def free(self, ptr: int) -> None:
        for i, h in enumerate(self._keep):
            if (int(h) if self._cudart is not None else int(h.data_ptr())) == ptr:
                if self._cudart is not None:
                    self._cudart.cudaFree(h)
                del self._keep[i]
                return

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        if self._cudart is not None:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            (err,) = self._cudart.cudaMemcpyAsync(ptr, host, host.nbytes, kind, self.stream)
            self._check(err, "cudaMemcpyAsync H2D")
            # pageable host memory: the copy is staged before the call returns, but keep `host` alive anyway
            self._pending = host
            return
        torch = self._torch
        with torch.cuda.stream(self._stream):
            dst = self._view(ptr, host.nbytes)
            dst.copy_(torch.from_numpy(host.reshape(-1).view(np.uint8)))

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        if self._cudart is not None:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            (err,) = self._cudart.cudaMemcpyAsync(host, ptr, host.nbytes, kind, self.stream)
            self._check(err, "cudaMemcpyAsync D2H")
            return
        torch = self._torch
        with torch.cuda.stream(self._stream):
            host.reshape(-1).view(np.uint8)[:] = self._view(ptr, host.nbytes).cpu().numpy()

    def _view(self, ptr: int, nbytes: int):
        for t in self._keep:
            base = int(t.data_ptr())
            if base <= ptr and ptr + nbytes <= base + t.numel():
                return t[ptr - base:ptr - base + nbytes]
        raise ModelError("device pointer not owned by this runner")

    def sync(self) -> None:
        if self._cudart is not None:
            (err,) = self._cudart.cudaStreamSynchronize(self.stream)
            self._check(err, "cudaStreamSynchronize")
        else:
            self._stream.synchronize()

    def close(self) -> None:
        if self._cudart is not None:
            for ptr in self._keep:
                self._cudart.cudaFree(ptr)
            self._cudart.cudaStreamDestroy(self.stream)
        self._keep.clear()


# -- ONNX rewrites for strongly typed builds (TensorRT >= 11) -----------------------------------------
def fp16_model_bytes(onnx_path: Path) -> bytes:
    """The model with float16 weights and compute, float32 inputs/outputs (onnxruntime's converter)."""
    import onnx  # noqa: PLC0415 - build time only
    from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415

    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    return model.SerializeToString()


# -- build --------------------------------------------------------------------------------------
def _make_calibrator(trt: Any, mem: _Memory, data: np.ndarray, batch: int, cache_file: Path):
    """An IInt8EntropyCalibrator2 over `data` (N, ...) float32, caching its table in `cache_file`."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.data = np.ascontiguousarray(data, dtype=np.float32)
            self.batch = batch
            self.index = 0
            self.ptr = mem.alloc(self.data[:batch].nbytes)

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names, p_str=None):  # noqa: ANN001, ANN202 - TensorRT's signature
            if self.index + self.batch > len(self.data):
                return None
            mem.h2d(self.ptr, self.data[self.index:self.index + self.batch])
            mem.sync()
            self.index += self.batch
            return [self.ptr]

        def read_calibration_cache(self):  # noqa: ANN202
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache) -> None:  # noqa: ANN001
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_plan(onnx_path: Path, key: EngineKey, calibration: np.ndarray | None, calib_cache: Path,
               workspace: int = WORKSPACE_BYTES) -> bytes:
    """Parse the ONNX model and build a serialized engine for `key` (minutes on a Jetson, seconds on x86)."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    implicit = implicit_precision(trt)
    flags = 0
    if trt_major(trt) < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if not implicit and trt_major(trt) < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if key.precision == "fp16" and not implicit:
        model_bytes = fp16_model_bytes(onnx_path)
    elif key.precision == "int8" and not implicit:
        if calibration is None:
            raise ModelError("INT8 needs a calibration set")
        qdq = calib_cache.with_suffix(".qdq.onnx")
        model_bytes = qdq_model(onnx_path, calibration, qdq).read_bytes()
    else:
        model_bytes = Path(onnx_path).read_bytes()
    if not parser.parse(model_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    profile = builder.create_optimization_profile()
    for name, mn, opt, mx in key.input_shapes:
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    mem = None
    if implicit and key.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers without int8 kernels run in FP16, not FP32
    if implicit and key.precision == "int8":
        if calibration is None:
            raise ModelError("INT8 needs a calibration set")
        config.set_flag(trt.BuilderFlag.INT8)
        mem = _Memory()
        batch = min(CALIB_BATCH, key.input_shapes[0][3][0], len(calibration))
        calib_profile = builder.create_optimization_profile()
        for name, _mn, _opt, mx in key.input_shapes:
            shape = (batch, *mx[1:])
            calib_profile.set_shape(name, shape, shape, shape)
        if hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _make_calibrator(trt, mem, calibration, batch, calib_cache)
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if mem is not None:
            mem.close()
    if plan is None:
        raise ModelError(f"TensorRT could not build a {key.precision} engine for {onnx_path} (see its log above)")
    return bytes(plan)


def load_calibration(calibration_dir: Path, model: str) -> tuple[Path, np.ndarray]:
    """`<dir>/<model>.calib.npy`, checked against `<dir>/calibration.json`'s sha256."""
    from appliance.models.calibrate import read_set  # noqa: PLC0415

    return read_set(Path(calibration_dir), model)


def engine_for(onnx_path: Path, model: str, precision: str, cache_dir: Path, max_batch: int,
               calibration_dir: Path | None = None) -> tuple[Path, EngineKey, bool]:
    """The engine file for this model on this device: from the cache, or built now. Returns (path, key, built)."""
    calib_path, calib = (None, None)
    if precision == "int8":
        if calibration_dir is None:
            raise ModelError("INT8 needs vision.calibration_dir (from `appliance models calibrate`)")
        calib_path, calib = load_calibration(calibration_dir, model)
    key = engine_key(onnx_path, precision, max_batch, calibration=calib_path)
    cache = EngineCache(cache_dir)
    hit = cache.lookup(model, key)
    if hit is not None:
        return hit, key, False
    _, _, calib_cache = cache.paths(model, key)
    log.info("building the TensorRT %s engine for %s on %s (TensorRT %s); the first build on a Jetson can "
             "take minutes", precision, model, key.gpu, key.trt_version)
    t0 = time.perf_counter()
    plan = build_plan(onnx_path, key, calib, calib_cache)
    path = cache.store(model, key, plan, time.perf_counter() - t0)
    log.info("built %s in %.1f s -> %s", model, time.perf_counter() - t0, path)
    return path, key, True


# -- run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorArg:
    """What onnxruntime's NodeArg tells our code: name, shape ('N' for a dynamic dim), element type."""

    name: str
    shape: list[int | str]
    type: str


_ORT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
              np.dtype(np.int32): "tensor(int32)", np.dtype(np.int64): "tensor(int64)",
              np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.int8): "tensor(int8)"}


class TrtSession:
    """A deserialized engine behind onnxruntime's session interface (get_inputs/get_outputs/run)."""

    def __init__(self, engine_path: Path, key: EngineKey | None = None) -> None:
        trt = _trt()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT could not load engine {engine_path} (built for another GPU or release?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.key = key
        self.path = Path(engine_path)
        self._mem = _Memory()
        self._inputs: list[TensorArg] = []
        self._outputs: list[TensorArg] = []
        self._dtypes: dict[str, np.dtype] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = [d if d >= 0 else "N" for d in engine.get_tensor_shape(name)]
            arg = TensorArg(name, shape, _ORT_TYPES.get(dtype, "tensor(float)"))
            self._dtypes[name] = dtype
            (self._inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self._outputs).append(arg)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (ptr, capacity bytes)
        # the profile's largest batch: a bigger batch (one input) is run in chunks of it
        self._max_batch = key.input_shapes[0][3][0] if key is not None and key.input_shapes else None

    def get_inputs(self) -> list[TensorArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"TensorRT-native ({self._mem.backend})"]

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                self._mem.free(ptr)
            ptr, cap = self._mem.alloc(nbytes), nbytes
            self._buffers[name] = (ptr, cap)
        return ptr

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        mb = self._max_batch
        if mb and len(self._inputs) == 1:
            x = feeds[self._inputs[0].name]
            if x.shape[0] > mb:
                parts = [self._run_once(output_names, {self._inputs[0].name: x[i:i + mb]})
                         for i in range(0, x.shape[0], mb)]
                return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
        return self._run_once(output_names, feeds)

    def _run_once(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for arg in self._inputs:
            x = np.ascontiguousarray(feeds[arg.name], dtype=self._dtypes[arg.name])
            self.context.set_input_shape(arg.name, tuple(x.shape))
            ptr = self._buffer(arg.name, x.nbytes)
            self._mem.h2d(ptr, x)
            self.context.set_tensor_address(arg.name, ptr)
        results: dict[str, np.ndarray] = {}
        for arg in self._outputs:
            shape = tuple(self.context.get_tensor_shape(arg.name))
            out = np.empty(shape, dtype=self._dtypes[arg.name])
            ptr = self._buffer(arg.name, out.nbytes)
            self.context.set_tensor_address(arg.name, ptr)
            results[arg.name] = out
        if not self.context.execute_async_v3(self._mem.stream):
            raise ModelError(f"TensorRT execution failed for {self.path.name}")
        for name, out in results.items():
            self._mem.d2h(out, self._buffers[name][0])
        self._mem.sync()
        names = output_names or [a.name for a in self._outputs]
        return [results[n].astype(np.float32, copy=False) if results[n].dtype == np.float16 else results[n]
                for n in names]

    def close(self) -> None:
        self._mem.close()


def native_session(onnx_path: Path, model: str, precision: str, cache_dir: Path, max_batch: int,
                   calibration_dir: Path | None = None) -> TrtSession:
    """Engine from the cache (or built now) and a runner for it; raises ModelError when TensorRT can't."""
    path, key, _ = engine_for(onnx_path, model, precision, cache_dir, max_batch, calibration_dir)
    return TrtSession(path, key)


def create_vision_session(onnx_path: Path, model: str, vision: Any, cache_dir: Path,
                          calibration_dir: Path | None = None, max_batch: int | None = None):
    """The session a vision model runs on, as `vision.runtime` asks: native TensorRT when it is set and
    usable here, else ONNX Runtime with `vision.providers` (a warning says why): never a crash for want of
    a GPU."""
    from appliance.vision.runtime import create_session  # noqa: PLC0415

    if getattr(vision, "runtime", "onnxruntime") == "tensorrt":
        batch = max_batch if max_batch is not None else int(getattr(vision, "max_faces", 8))
        try:
            session = native_session(onnx_path, model, vision.precision, cache_dir, batch, calibration_dir)
            from appliance.vision.runtime import warmup  # noqa: PLC0415

            warmup(session)  # type: ignore[arg-type] - same interface
            return session
        except ModelError as exc:
            log.warning("native TensorRT unavailable for %s (%s); using ONNX Runtime %s", model, exc,
                        list(vision.providers))
    return create_session(onnx_path, vision.providers, vision.intra_op_threads, vision.precision, cache_dir)
