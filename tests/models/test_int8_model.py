"""The INT8 build of our CPU emotion model (appliance/models/quantize.py) against its FP32 original.

What is checked without the build tools (`onnx` is not on the box): the file is the one the manifest
names, it was quantised from the committed FP32 model (sha256), its weights are stored as 8-bit integers,
and on face crops of our own media it agrees with the FP32 model within the bounds recorded at build.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from appliance.models.manifest import DEFAULT_MODELS_DIR, QuantizedSource, verify_models
from appliance.models.quantize import MIN_AGREEMENT, TOLERANCE, int8_name
from tests.models.test_own_model_parity import _inputs

BASE = "emotion_cnn48"


def _session(path) -> ort.InferenceSession:  # noqa: ANN001 - a Path
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as it was written
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_int8_model_is_recorded_against_its_fp32_base():
    manifest = verify_models(DEFAULT_MODELS_DIR)
    base, q = manifest.entry(BASE), manifest.entry(int8_name(BASE))
    assert isinstance(q.source, QuantizedSource) and q.source.base_model == BASE
    assert q.source.sha256 == base.output.sha256  # quantised from the committed FP32 file, not another
    assert q.inputs == base.inputs and q.outputs == base.outputs and q.labels == base.labels
    assert q.parity.argmax_agreement >= MIN_AGREEMENT and q.parity.max_abs_diff <= q.parity.tolerance == TOLERANCE
    assert q.output.bytes < 0.5 * base.output.bytes  # int8 weights (plus scales and zero points)


def test_int8_agrees_with_fp32_on_faces():
    manifest = verify_models(DEFAULT_MODELS_DIR)
    base, q = manifest.entry(BASE), manifest.entry(int8_name(BASE))
    x = _inputs(48)[8:]  # the face crops and their mirror images (the random inputs are not faces)
    ref = _session(DEFAULT_MODELS_DIR / base.output.path).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(DEFAULT_MODELS_DIR / q.output.path),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(ref - got).max() <= q.parity.tolerance
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9
    assert np.abs(ref - got).max() > 0  # really a different (integer) computation, not a copy
