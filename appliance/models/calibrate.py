"""`appliance models calibrate`: the INT8 calibration sets, made by our own detector from real frames.

Frames come from a video, a folder of images, or the synthetic camera; each is scaled to the capture
size (as the capture thread does), BlazeFace finds the faces, and the faces are cut exactly as the
classifier's preprocessing cuts them (`crop_faces`, the fer-style crop, at the model's side S). Written:

- `<out>/<emotion model>.calib.npy`: (N, S, S, 1) float32 in [-1, 1], the emotion model's input;
- `<out>/blazeface_short_range.calib.npy`: (M, 128, 128, 3) float32 in [-1, 1], the detector's input
  (the letterboxed frames), so the detector can be INT8 too;
- `<out>/calibration.json`: for each set its file, sha256, shape, dtype, value range, the model it is
  for (name + sha256) and where the frames came from.

Deterministic: the same source and options give byte-identical files (frames are taken at a fixed
stride; when there are more crops than `max_crops`, evenly spaced ones are kept). The native TensorRT
INT8 build (`appliance/vision/trt_engine.py`) reads a set with `read_set`, which checks the sha256.

These are face pixels: keep them on the machine that made them (development media on a build host, or
the box's own camera under its consent); they are never part of a bundle and never leave the box.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from appliance.errors import ModelError
from appliance.models.manifest import DEFAULT_MODELS_DIR, file_sha256, model_path, verify_models

INDEX_NAME = "calibration.json"
DETECTOR_MODEL = "blazeface_short_range"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def set_path(out_dir: Path, model: str) -> Path:
    return Path(out_dir) / f"{model}.calib.npy"


def video_frames(video: Path, every: int, limit: int) -> Iterator[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ModelError(f"cannot open video {video}")
    n = taken = 0
    try:
        while limit <= 0 or taken < limit:
            ok, img = cap.read()
            if not ok:
                break
            if n % every == 0:
                taken += 1
                yield img
            n += 1
    finally:
        cap.release()


def image_frames(folder: Path, every: int, limit: int) -> Iterator[np.ndarray]:
    import cv2

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ModelError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    taken = 0
    for i, p in enumerate(files):
        if i % every or (limit > 0 and taken >= limit):
            continue
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is not None:
            taken += 1
            yield img


def synthetic_frames(width: int, height: int, every: int, limit: int) -> Iterator[np.ndarray]:
    from appliance.capture.synthetic_source import SyntheticFaceSource

    src = SyntheticFaceSource(width, height, fps=30.0)
    for k in range(limit if limit > 0 else 300):
        yield src.render(k * every)


def _evenly(n: int, k: int) -> np.ndarray:
    """k evenly spaced indices out of n (all of them when k >= n)."""
    if k <= 0 or n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def collect(frames: Iterator[np.ndarray], models_dir: Path, emotion_model: str, size: tuple[int, int],
            max_crops: int = 512, max_frames_out: int = 256, min_score: float = 0.5,
            max_faces: int = 8) -> dict[str, np.ndarray]:
    """Run the detector on each frame; return {model name: calibration array} (see module docstring)."""
    from appliance.capture.frame import fit_frame
    from appliance.vision.detector import BlazeFaceDetector, to_input_tensor
    from appliance.vision.emotion import EmotionClassifier, crop_faces
    from appliance.vision.runtime import create_session

    detector = BlazeFaceDetector(create_session(model_path(models_dir, DETECTOR_MODEL)), min_score=min_score,
                                 max_faces=max_faces)
    side = EmotionClassifier(create_session(model_path(models_dir, emotion_model), warm=False)).size
    crops: list[np.ndarray] = []
    tensors: list[np.ndarray] = []
    for img in frames:
        frame = fit_frame(img, *size)
        tensors.append(to_input_tensor(frame)[0][0].copy())
        dets = detector.detect(frame)
        if dets:
            crops.append(crop_faces(frame, dets, side))
    if not crops:
        raise ModelError("the detector found no face in the calibration frames; use footage with faces")
    faces = np.concatenate(crops)[_evenly(sum(len(c) for c in crops), max_crops)][..., None]
    dets = np.stack(tensors)[_evenly(len(tensors), max_frames_out)]
    return {emotion_model: np.ascontiguousarray(faces, np.float32), DETECTOR_MODEL: np.ascontiguousarray(dets)}


def write_sets(sets: dict[str, np.ndarray], out_dir: Path, models_dir: Path, source: str) -> Path:
    """Write each set as .npy plus calibration.json (sha256, shape, dtype, range, model it is for)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = verify_models(models_dir)
    index: dict[str, object] = {"format": FORMAT_VERSION, "source": source,
                                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "note": "face pixels: keep on this machine; never ship or upload", "sets": {}}
    for name, arr in sorted(sets.items()):
        path = set_path(out_dir, name)
        np.save(path, arr, allow_pickle=False)
        index["sets"][name] = {  # type: ignore[index]
            "file": path.name, "sha256": file_sha256(path), "shape": list(arr.shape), "dtype": str(arr.dtype),
            "min": float(arr.min()), "max": float(arr.max()), "model_sha256": manifest.entry(name).output.sha256,
            "preprocessing": ("crop_faces (fer-style crop), gray, [-1, 1], NHWC" if arr.shape[-1] == 1 else
                              "to_input_tensor (letterbox 128, RGB, [-1, 1]), NHWC"),
        }
    path = out_dir / INDEX_NAME
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def read_set(out_dir: Path, model: str) -> tuple[Path, np.ndarray]:
    """A calibration set checked against calibration.json (sha256) -> (file, array)."""
    out_dir = Path(out_dir)
    try:
        index = json.loads((out_dir / INDEX_NAME).read_text())
        entry = index["sets"][model]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModelError(f"no calibration set for {model} in {out_dir} ({exc}); run `appliance models "
                         "calibrate`") from None
    path = out_dir / entry["file"]
    if not path.is_file() or file_sha256(path) != entry["sha256"]:
        raise ModelError(f"calibration set {path} is missing or does not match {INDEX_NAME}; recalibrate")
    return path, np.load(path, allow_pickle=False)


def calibrate(out_dir: Path, *, video: Path | None = None, images: Path | None = None, synthetic: int = 0,
              models_dir: Path = DEFAULT_MODELS_DIR, emotion_model: str | None = None, every: int = 5,
              frames: int = 400, max_crops: int = 512, size: tuple[int, int] | None = None) -> Path:
    """Make the calibration sets from one source; returns the path of calibration.json."""
    from appliance.config import default_config
    from appliance.vision.emotion import DEFAULT_EMOTION_MODEL

    if (video is not None) + (images is not None) + (synthetic > 0) != 1:
        raise ModelError("give exactly one of --video, --images, --synthetic")
    every = max(1, int(every))
    cap = default_config().capture
    size = size or (cap.width, cap.height)
    if video is not None:
        src, desc = video_frames(video, every, frames), f"video {Path(video).name}"
    elif images is not None:
        src, desc = image_frames(images, every, frames), f"images {Path(images).name}/"
    else:
        src, desc = synthetic_frames(*size, every, synthetic), f"synthetic camera, {synthetic} frames"
    model = emotion_model or DEFAULT_EMOTION_MODEL
    sets = collect(src, Path(models_dir), model, size, max_crops=max_crops)
    return write_sets(sets, out_dir, Path(models_dir), f"{desc}, every {every}, scaled to {size[0]}x{size[1]}")
