from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from appliance.errors import ModelError
from appliance.models.manifest import model_path
from appliance.vision.runtime import create_session, resolve_providers, warmup


def test_gpu_providers_fall_back_to_cpu_here(models_dir: Path):
    path = model_path(models_dir, "fer_mini_xception")
    session = create_session(path, providers=["tensorrt", "cuda", "cpu"], threads=2, precision="fp16",
                             cache_dir=models_dir / "cache-unused")
    available = set(ort.get_available_providers())
    expected = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    assert session.get_providers()[-1] == "CPUExecutionProvider"
    if not expected:  # a CPU-only build of onnxruntime, as on the CI machine
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert not (models_dir / "cache-unused").exists()
    out = session.run(None, {"input": np.zeros((3, 64, 64, 1), np.float32)})[0]
    assert out.shape == (3, 7)


def test_cpu_always_last_and_unknown_rejected():
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["cuda"])[-1] == "CPUExecutionProvider"
    with pytest.raises(ModelError, match="unknown execution provider"):
        resolve_providers(["npu"])


def test_missing_model_is_a_clear_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="not found.*make models"):
        create_session(tmp_path / "nope.onnx")


def test_corrupt_model_is_a_clear_model_error(tmp_path: Path, models_dir: Path):
    good = model_path(models_dir, "blazeface_short_range").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good[: len(good) // 3])
    with pytest.raises(ModelError, match="truncated.onnx"):
        create_session(bad)
    with pytest.raises(ModelError, match="precision"):
        create_session(model_path(models_dir, "blazeface_short_range"), precision="fp8")


def test_warmup_runs_zeros(models_dir: Path):
    session = create_session(model_path(models_dir, "blazeface_short_range"), warm=False)
    assert warmup(session) >= 0.0


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_requests_fall_back_cleanly_without_tensorrt(models_dir: Path, precision: str):
    """FP16/INT8 exist only on the TensorRT provider; where it is absent the CPU session answers exactly
    as the FP32 one (no silent half-built accelerator session)."""
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT present: the engine paths are exercised by the GPU tests")
    path = model_path(models_dir, "fer_mini_xception")
    x = np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 1)).astype(np.float32)
    reduced = create_session(path, providers=["tensorrt", "cuda", "cpu"], precision=precision)
    full = create_session(path, providers=["cpu"], precision="fp32")
    assert reduced.get_providers()[-1] == "CPUExecutionProvider"
    np.testing.assert_allclose(reduced.run(None, {"input": x})[0], full.run(None, {"input": x})[0], atol=1e-6)
