"""Q/DQ (INT8) builds of our models: `qdq_model` (two profiles: TensorRT's explicit quantisation, used by
`appliance/vision/trt_engine.py`, and ONNX Runtime's CPU kernels), and `python -m appliance.models.quantize`,
the INT8 build of one of our emotion models that CPU boxes run.

Build time only (needs `onnx`: run it with the training venv, `make quantize-emotion`). ONNX Runtime's
static quantization, as its docs describe: calibration on real inputs (a seeded sample of FER2013
training images, cut and scaled exactly as the product's `prepare_gray` does), activations uint8 with
MinMax ranges, weights int8 per output channel, QDQ format, for ONNX Runtime's CPU EP (which fuses it into
integer kernels). A GPU runs the FP32 base instead (`VisionPipeline`; TensorRT makes its own INT8).

What stays FP32, and why (measured on the FER2013 test sample, 350 images, this 2-core AMD EPYC): the
first convolution (its input is the raw [-1, 1] picture; quantising it too cost 2.9 points of accuracy and
14 % top-1 agreement with FP32) and the head (the linear layer, the prior shift and the softmax). The rest
is INT8: 1.6x faster a face on one core (0.26-0.28 vs 0.43-0.46 ms), accuracy 0.663 as FP32 on the
sample, 98.9 % of its answers equal.

Parity is measured at build on other FER2013 training images than the calibration ones (seeded) and
written into the manifest entry (`parity`: reference = the FP32 model under ONNX Runtime); the tests
check the committed file against that record on face crops of our own media.
"""

from __future__ import annotations

import argparse
import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from appliance.models.manifest import DEFAULT_MODELS_DIR, MANIFEST_NAME, file_sha256, load_manifest

RECIPE_PATH = "appliance/models/quantize.py"
RECIPE_VERSION = "q1"
CALIBRATION_IMAGES = 512
PARITY_IMAGES = 1000
SEED = 2026
# Parity bounds the tests hold the committed file to (probabilities; top-1 agreement with FP32).
TOLERANCE = 0.15
MIN_AGREEMENT = 0.97


def int8_name(model: str) -> str:
    return f"{model}_int8"


def _images(data: Path, count: int, skip: int, seed: int) -> np.ndarray:
    """`count` FER2013 images (after the first `skip` of one seeded permutation) as the product scales them."""
    import cv2

    from appliance.vision.emotion import prepare_gray

    rows = list(csv.DictReader((data / "labels.csv").open(encoding="utf-8")))
    order = np.random.default_rng(seed).permutation(len(rows))[skip:skip + count]
    imgs = [cv2.imread(str(data / rows[i]["path"]), cv2.IMREAD_GRAYSCALE) for i in order]
    return prepare_gray(imgs, size=48)[..., None].astype(np.float32)


class _ArrayReader:
    """onnxruntime.quantization CalibrationDataReader over a calibration array."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int) -> None:
        self._it = (np.ascontiguousarray(data[i:i + batch]) for i in range(0, len(data), batch))
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}


def qdq_model(onnx_path: Path, calibration: np.ndarray, out_path: Path, method: str = "entropy",
              batch: int = 8, profile: str = "tensorrt", exclude: list[str] | None = None) -> Path:
    """Explicitly quantised (Q/DQ) copy of a model, calibrated on `calibration` (onnxruntime.quantization,
    on CPU; `onnx` must be installed). Two profiles, one per runtime that reads the file:

    - "tensorrt": TensorRT's explicit-quantisation rules: int8 symmetric (zero point 0) activations and
      per-channel weights, bias left in float, Q/DQ only around the ops that have int8 kernels (Conv,
      MatMul, Gemm) (`appliance/vision/trt_engine.py` builds its INT8 engines from this);
    - "cpu": what ONNX Runtime's x86 integer kernels want: uint8 (asymmetric) activations, int8
      per-channel weights, every op it can quantise except the nodes in `exclude`.
    """
    from onnxruntime.quantization import (  # noqa: PLC0415 - build time only
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
               "percentile": CalibrationMethod.Percentile}
    import onnxruntime as ort  # noqa: PLC0415

    name = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    reader = _ArrayReader(name, calibration.astype(np.float32), batch)
    if profile == "tensorrt":
        quantize_static(str(onnx_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=methods[method], op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        nodes_to_exclude=exclude or [],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                       "DedicatedQDQPair": False})
    elif profile == "cpu":
        quantize_static(str(onnx_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=methods[method], nodes_to_exclude=exclude or [])
    else:
        raise ValueError(f"unknown quantisation profile {profile!r}; choose tensorrt or cpu")
    return out_path


def _fp32_nodes(model_path: Path) -> list[str]:
    """The first Conv and every node after the last Conv (the head) stay FP32."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        raise SystemExit(f"{model_path}: no Conv node; not one of our emotion CNNs")
    head = [n.name for n in nodes[convs[-1] + 1:] if n.op_type in ("Gemm", "MatMul", "Add", "Softmax")]
    return [nodes[convs[0]].name, *head]


def quantize(model: str, data: Path, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    entry = load_manifest(models_dir).entry(model)
    src = models_dir / entry.output.path
    name = int8_name(model)
    out = src.with_name(f"{name}.onnx")
    pre = out.with_suffix(".pre.onnx")
    side = entry.inputs[0].shape[1]
    if side != 48:
        raise SystemExit(f"{model}: input side {side}; the calibration images are 48x48")
    calib = _images(data, CALIBRATION_IMAGES, 0, SEED)
    held = _images(data, PARITY_IMAGES, CALIBRATION_IMAGES, SEED)
    input_name = entry.inputs[0].name
    quant_pre_process(str(src), str(pre))
    keep = _fp32_nodes(pre)
    try:
        qdq_model(pre, calib, out, method="minmax", profile="cpu", exclude=keep, batch=32)
    finally:
        pre.unlink(missing_ok=True)
    _stamp(out, {"source_sha256": entry.output.sha256, "recipe": RECIPE_PATH, "quantized_from": model})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {input_name: held})[0]
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {input_name: held})[0]
    parity = {"reference": f"{model} (FP32) under onnxruntime {ort.__version__} CPU, {PARITY_IMAGES} FER2013 "
                           "training images outside the calibration set",
              "tolerance": TOLERANCE, "max_abs_diff": round(float(np.abs(ref - got).max()), 6),
              "argmax_agreement": round(float((ref.argmax(1) == got.argmax(1)).mean()), 4), "n": PARITY_IMAGES}
    if parity["argmax_agreement"] < MIN_AGREEMENT or parity["max_abs_diff"] > TOLERANCE:
        raise SystemExit(f"{name}: INT8 parity out of bounds: {parity}")
    _write_entry(models_dir, entry, name, out, data, keep, parity)
    return out


def _stamp(path: Path, meta: dict[str, str]) -> None:
    """Provenance in the ONNX file itself (kept from the base model, then overridden by `meta`)."""
    import onnx

    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props if not p.key.startswith("onnx.")}
    props.update(meta)
    del m.metadata_props[:]
    for k, v in sorted(props.items()):
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def _write_entry(models_dir: Path, base, name: str, out: Path, data: Path, keep: list[str],  # noqa: ANN001
                 parity: dict) -> None:
    from importlib.metadata import version

    labels = data / "labels.csv"
    entry = json.loads(base.model_dump_json())
    entry.update({
        "name": name,
        "version": f"{base.version}+int8-{RECIPE_VERSION}",
        "source": {
            "package": "own-quantization", "recipe": RECIPE_PATH, "recipe_version": RECIPE_VERSION,
            "base_model": base.name, "sha256": base.output.sha256, "seed": SEED,
            "calibration": f"{CALIBRATION_IMAGES} FER2013 training images (seeded sample), MinMax, activations "
                           "uint8, weights int8 per channel, QDQ",
            "calibration_labels_sha256": file_sha256(labels), "fp32_nodes": keep,
            "license": base.source.license,
            "quantized_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        },
        "output": {"path": str(out.resolve().relative_to(models_dir.resolve())), "sha256": file_sha256(out),
                   "bytes": out.stat().st_size},
        "parity": parity,
        "converter": {"onnx": version("onnx"), "onnxruntime": version("onnxruntime")},
    })
    path = models_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["models"][name] = entry
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    load_manifest(models_dir)  # validates the schema


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.models.quantize", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="emotion_cnn48", help="manifest entry to quantise")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/fer2013-train"),
                    help="FER2013 training split (labels.csv + class folders)")
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    args = ap.parse_args(argv)
    out = quantize(args.model, args.data, args.models_dir)
    e = load_manifest(args.models_dir).entry(int8_name(args.model))
    print(f"wrote {out} ({e.output.bytes} bytes); parity vs FP32: top-1 agreement {e.parity.argmax_agreement:.2%}, "
          f"max abs diff {e.parity.max_abs_diff:.3g} over {e.parity.n} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
