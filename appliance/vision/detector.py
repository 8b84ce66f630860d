"""BlazeFace short-range face detector (MediaPipe's model, converted to ONNX).

Pre- and post-processing follow MediaPipe's `face_detection_short_range` graph so the converted model
behaves like the original: keep-aspect letterbox to 128x128 with black borders, RGB scaled to [-1, 1],
SSD anchors (strides 8, 16, 16, 16; fixed anchor size), sigmoid scores clipped at +-100, score threshold,
then MediaPipe's *weighted* non-max suppression (overlapping boxes are blended by score, which steadies
boxes from frame to frame better than plain NMS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import onnxruntime as ort

from appliance.errors import ModelError

INPUT_SIZE = 128
NUM_KEYPOINTS = 6
# MediaPipe's keypoint order (the subject's right eye appears on the image's left).
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion", "left_ear_tragion")


@dataclass(frozen=True)
class Detection:
    """One face in frame pixels. No pixels of the face are kept."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the input frame
    score: float
    keypoints: np.ndarray = field(repr=False, compare=False)  # (6, 2) x, y pixels, order KEYPOINT_NAMES


def ssd_anchors(input_size: int = INPUT_SIZE, strides: tuple[int, ...] = (8, 16, 16, 16)) -> np.ndarray:
    """Anchor centres (K, 2) in [0, 1], as MediaPipe's SsdAnchorsCalculator builds them for this model.

    Consecutive layers with the same stride share one grid; each layer adds 2 anchors per cell
    (aspect ratio 1 plus the interpolated scale), and `fixed_anchor_size` makes every anchor 1x1,
    so only the centres matter. Short range: 16*16*2 + 8*8*6 = 896.
    """
    centres: list[np.ndarray] = []
    i = 0
    while i < len(strides):
        stride = strides[i]
        same = 0
        while i < len(strides) and strides[i] == stride:
            same += 1
            i += 1
        grid = int(np.ceil(input_size / stride))
        ys, xs = np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cells, 2 * same, axis=0))
    return np.concatenate(centres).astype(np.float32)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou: float,
                 max_out: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's WEIGHTED non-max suppression.

    Take the best remaining box; every remaining box with IoU > `iou` to it (itself included) is merged
    into one detection whose box and keypoints are the score-weighted mean; the score stays the best one.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.arange(len(scores))
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    while remaining.size and len(out) < max_out:
        top = remaining[0]
        overlap = _iou_one_to_many(boxes[top], boxes[remaining]) > iou
        overlap[0] = True
        members = remaining[overlap]
        w = scores[members]
        total = float(w.sum())
        box = (boxes[members] * w[:, None]).sum(axis=0) / total
        kps = (keypoints[members] * w[:, None, None]).sum(axis=0) / total
        out.append((box, kps, float(scores[top])))
        remaining = remaining[~overlap]
    return out


def to_input_tensor(frame_bgr: np.ndarray, canvas: np.ndarray | None = None,
                    tensor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Letterbox a BGR frame to the model input: (1, 128, 128, 3) RGB float32 in [-1, 1].

    Keeps the aspect ratio and centres the picture on black, as MediaPipe's ImageToTensorCalculator
    (keep_aspect_ratio, BORDER_ZERO, range [-1, 1]) does. Returns the tensor and the mapping
    xy_tensor = xy_frame * scale + offset (both (2,) arrays; x and y scales differ by the rounding of the
    resized size). Pass `canvas`/`tensor` buffers to avoid allocations per frame.
    """
    h, w = frame_bgr.shape[:2]
    scale = INPUT_SIZE / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    ox, oy = (INPUT_SIZE - nw) // 2, (INPUT_SIZE - nh) // 2
    if canvas is None:
        canvas = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    else:
        canvas[:] = 0
    if tensor is None:
        tensor = np.empty((1, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)
    # Area interpolation when shrinking: a camera frame is 3-15x the input, and plain bilinear aliases.
    # From 4x down, a bilinear step to twice the size first and then a 2x area step gives nearly the same
    # pixels (mean abs difference 0.3 grey levels on 640x360 -> 128x72) in about half the time
    # (0.17 vs 0.31 ms on a 2-core x86; measured with bench/vision.py's frames).
    if w >= 4 * nw and h >= 4 * nh:
        half = cv2.resize(frame_bgr, (2 * nw, 2 * nh), interpolation=cv2.INTER_LINEAR)
        resized = cv2.resize(half, (nw, nh), interpolation=cv2.INTER_AREA)
    else:
        resized = cv2.resize(frame_bgr, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas[oy:oy + nh, ox:ox + nw] = resized[..., ::-1]  # BGR -> RGB
    np.multiply(canvas, np.float32(2.0 / 255.0), out=tensor[0], casting="unsafe")
    tensor -= np.float32(1.0)
    return tensor, np.array([nw / w, nh / h], np.float32), np.array([ox, oy], np.float32)


class BlazeFaceDetector:
    """Finds faces in a BGR frame with BlazeFace short range (best for faces within ~2 m)."""

    def __init__(self, session: ort.InferenceSession, min_score: float = 0.5, max_faces: int = 8,
                 iou: float = 0.3) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape)[1:] != [INPUT_SIZE, INPUT_SIZE, 3]:
            raise ModelError(f"not a BlazeFace short-range model: input {inputs[0].shape if inputs else None}")
        outputs = {o.name: o for o in session.get_outputs()}
        self._box_out, self._score_out = self._pick_outputs(outputs)
        self._session = session
        self._input_name = inputs[0].name
        self.min_score = float(min_score)
        self.max_faces = int(max_faces)
        self.iou = float(iou)
        self._anchors = ssd_anchors()
        # logit threshold: sigmoid(x) >= s  <=>  x >= log(s / (1 - s)); avoids a sigmoid over all 896.
        self._min_logit = float(np.log(self.min_score / (1.0 - self.min_score)))
        self._canvas = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
        self._tensor = np.empty((1, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)

    @staticmethod
    def _pick_outputs(outputs: dict[str, ort.NodeArg]) -> tuple[str, str]:
        boxes = [n for n, o in outputs.items() if o.shape and o.shape[-1] == 4 + 2 * NUM_KEYPOINTS]
        scores = [n for n, o in outputs.items() if o.shape and o.shape[-1] == 1]
        if len(boxes) != 1 or len(scores) != 1:
            raise ModelError(f"unexpected BlazeFace outputs: { {n: o.shape for n, o in outputs.items()} }")
        return boxes[0], scores[0]

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        """Faces in a BGR uint8 frame, best first, at most `max_faces`."""
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 BGR frame, got {frame_bgr.shape} {frame_bgr.dtype}")
        h, w = frame_bgr.shape[:2]
        tensor, scale, offset = to_input_tensor(frame_bgr, self._canvas, self._tensor)
        raw_boxes, raw_scores = self._session.run([self._box_out, self._score_out], {self._input_name: tensor})
        logits = np.clip(raw_scores.reshape(-1), -100.0, 100.0)
        keep = np.flatnonzero(logits >= self._min_logit)
        if keep.size == 0:
            return []
        raw = raw_boxes.reshape(-1, 4 + 2 * NUM_KEYPOINTS)[keep]
        anchors = self._anchors[keep]
        scores = 1.0 / (1.0 + np.exp(-logits[keep]))
        # Decode in tensor pixels: offsets are in pixels of the 128 input, relative to the anchor centre.
        centre = raw[:, 0:2] + anchors * INPUT_SIZE
        half = raw[:, 2:4] / 2.0
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = raw[:, 4:].reshape(-1, NUM_KEYPOINTS, 2) + anchors[:, None, :] * INPUT_SIZE
        merged = weighted_nms(boxes, kps, scores, self.iou, self.max_faces)
        limit = np.array([w, h, w, h], dtype=np.float32)
        out = []
        for box, kp, score in merged:
            b = ((box.reshape(2, 2) - offset) / scale).reshape(4)
            b = np.clip(b, 0.0, limit)
            if b[2] - b[0] < 1.0 or b[3] - b[1] < 1.0:
                continue
            out.append(Detection(box=tuple(float(v) for v in b), score=score,
                                 keypoints=((kp - offset) / scale).astype(np.float32)))
        return out
