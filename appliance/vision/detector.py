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
# Black rows kept above and below the picture when the input is shorter than 128 (see `input_rows`).
ROW_MARGIN = 12
# MediaPipe's keypoint order (the subject's right eye appears on the image's left).
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion", "left_ear_tragion")


@dataclass(frozen=True)
class Detection:
    """One face in frame pixels. No pixels of the face are kept."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the input frame
    score: float
    keypoints: np.ndarray = field(repr=False, compare=False)  # (6, 2) x, y pixels, order KEYPOINT_NAMES


def anchor_centres_px(height: int = INPUT_SIZE, width: int = INPUT_SIZE) -> np.ndarray:
    """Anchor centres (K, 2) in input pixels for an input of `height` x `width` (both multiples of 16).

    MediaPipe's SsdAnchorsCalculator layout for this model (strides 8, 16, 16, 16; layers with the same
    stride share one grid, each adding 2 anchors per cell; `fixed_anchor_size` makes every anchor 1x1, so
    only the centres matter): stride-8 cells with 2 anchors each, then stride-16 cells with 6, on the grid
    the fully convolutional network produces for that input. 128 x 128: 16*16*2 + 8*8*6 = 896 anchors
    (the tests check it against MediaPipe's own algorithm).
    """
    if height % 16 or width % 16 or not 16 <= height <= INPUT_SIZE or not 16 <= width <= INPUT_SIZE:
        raise ValueError(f"detector input {height}x{width}: both sides must be multiples of 16 in [16, 128]")
    parts = []
    for stride, per_cell in ((8, 2), (16, 6)):
        ys, xs = np.meshgrid((np.arange(height // stride) + 0.5) * stride,
                             (np.arange(width // stride) + 0.5) * stride, indexing="ij")
        parts.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), per_cell, axis=0))
    return np.concatenate(parts).astype(np.float32)


def input_rows(frame_h: int, frame_w: int) -> int:
    """Rows of the detector input for a frame: the letterboxed picture plus >= ROW_MARGIN black rows
    above and below, rounded up to a multiple of 16 (the network's coarsest stride), at most 128.

    The 128 x 128 letterbox of a 16:9 frame is 56 rows of black bars; the network is fully
    convolutional, so those rows can be left out: 96 rows instead of 128 (a quarter less work).
    Every anchor of the shorter input sits exactly where one of the square input's anchors does
    (the crop is a multiple of 16 rows); only what lies beyond the kept bars differs (the network's
    zero padding instead of more black), measured on real video in `bench/results/detector-rows.json`.
    """
    _, nh = fitted_size(frame_h, frame_w)
    return min(INPUT_SIZE, -(-(nh + 2 * ROW_MARGIN) // 16) * 16)


def fitted_size(frame_h: int, frame_w: int) -> tuple[int, int]:
    """(width, height) of a frame scaled to fit 128 x 128 with its aspect ratio kept."""
    scale = INPUT_SIZE / max(frame_h, frame_w)
    return max(1, round(frame_w * scale)), max(1, round(frame_h * scale))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)  # np.clip's wrapper costs more than the math
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


class Letterbox:
    """Letterbox BGR frames into the model input: (1, rows, 128, 3) RGB float32 in [-1, 1]; rows is 128,
    or `input_rows` of the frame when `adaptive_rows` (a model whose input height is dynamic).

    Keeps the aspect ratio and centres the picture on black, as MediaPipe's ImageToTensorCalculator
    (keep_aspect_ratio, BORDER_ZERO, range [-1, 1]) does. Shrinking uses an area filter where MediaPipe's
    CPU converter samples bilinearly: a camera frame is 3-15x the input, and plain bilinear aliases
    (uniform noise then passes for a face at score 0.56; area-filtered it does not). From 4x down, a
    bilinear step to twice the size and then a 2x area step gives nearly the same pixels as one area
    step (mean abs difference 0.3 grey levels on 640x360 -> 128x72) in less than half the time
    (0.23 vs 0.54 ms on this 2-core AMD EPYC; direct bilinear would be 0.08 ms).

    The buffers are reused and the black bars are written only when the frame geometry changes, so a
    steady camera costs one resize, one channel swap and one scale per frame. The returned tensor is
    overwritten by the next call.
    """

    def __init__(self, adaptive_rows: bool = False) -> None:
        self.adaptive_rows = adaptive_rows  # True: `input_rows` rows (the model takes any height)
        self._geometry: tuple[int, int] | None = None  # the buffers below are laid out on the first frame

    def _layout(self, h: int, w: int) -> None:
        nw, nh = fitted_size(h, w)
        rows = input_rows(h, w) if self.adaptive_rows else INPUT_SIZE
        ox, oy = (INPUT_SIZE - nw) // 2, (rows - nh) // 2
        self.tensor = np.full((1, rows, INPUT_SIZE, 3), -1.0, dtype=np.float32)  # black after scaling: bars
        self._half = np.empty((2 * nh, 2 * nw, 3), np.uint8)
        self._resized = np.empty((nh, nw, 3), np.uint8)
        self._rgb = np.empty((nh, nw, 3), np.uint8)
        self._scale = np.array([nw / w, nh / h], np.float32)
        self._offset = np.array([ox, oy], np.float32)
        self._box = (ox, oy, nw, nh)
        self._geometry = (h, w)

    def __call__(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The input tensor and the mapping xy_tensor = xy_frame * scale + offset (both (2,) arrays;
        x and y scales differ by the rounding of the resized size)."""
        h, w = frame_bgr.shape[:2]
        if self._geometry != (h, w):
            self._layout(h, w)
        ox, oy, nw, nh = self._box
        # OpenCV writes into the matching `dst` buffers; the returned arrays are those same buffers.
        if w >= 4 * nw and h >= 4 * nh:
            half = cv2.resize(frame_bgr, (2 * nw, 2 * nh), dst=self._half, interpolation=cv2.INTER_LINEAR)
            small = cv2.resize(half, (nw, nh), dst=self._resized, interpolation=cv2.INTER_AREA)
        else:
            small = cv2.resize(frame_bgr, (nw, nh), dst=self._resized, interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB, dst=self._rgb)
        region = self.tensor[0, oy:oy + nh, ox:ox + nw]
        np.multiply(rgb, np.float32(2.0 / 255.0), out=region, casting="unsafe")
        region -= np.float32(1.0)
        return self.tensor, self._scale, self._offset


def to_input_tensor(frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame's square 128 x 128 model input with fresh buffers (calibration sets, parity inputs, tests)."""
    return Letterbox()(frame_bgr)


class BlazeFaceDetector:
    """Finds faces in a BGR frame with BlazeFace short range (best for faces within ~2 m)."""

    def __init__(self, session: ort.InferenceSession, min_score: float = 0.5, max_faces: int = 8,
                 iou: float = 0.3, fit_rows: bool = True) -> None:
        """`fit_rows`: run on `input_rows` rows when the model's input height is dynamic (else 128)."""
        inputs = session.get_inputs()
        shape = list(inputs[0].shape)[1:] if len(inputs) == 1 else None
        # Input rows: 128, or a named dynamic dimension (the build exports the height as dynamic, so
        # a 16:9 frame runs on 96 rows; a runtime with fixed shapes keeps the square input).
        if not shape or shape[1:] != [INPUT_SIZE, 3] or (isinstance(shape[0], int) and shape[0] != INPUT_SIZE):
            raise ModelError(f"not a BlazeFace short-range model: input {inputs[0].shape if inputs else None}")
        outputs = {o.name: o for o in session.get_outputs()}
        self._box_out, self._score_out = self._pick_outputs(outputs)
        self._session = session
        self._input_name = inputs[0].name
        self.min_score = float(min_score)
        self.max_faces = int(max_faces)
        self.iou = float(iou)
        self._anchors_px: dict[int, np.ndarray] = {}  # by input rows
        # logit threshold: sigmoid(x) >= s  <=>  x >= log(s / (1 - s)); avoids a sigmoid over all 896.
        self._min_logit = float(np.log(self.min_score / (1.0 - self.min_score)))
        self._letterbox = Letterbox(adaptive_rows=fit_rows and not isinstance(shape[0], int))

    @property
    def adaptive_rows(self) -> bool:
        return self._letterbox.adaptive_rows

    def _anchors_for(self, rows: int) -> np.ndarray:
        a = self._anchors_px.get(rows)
        if a is None:
            a = self._anchors_px[rows] = anchor_centres_px(rows, INPUT_SIZE)
        return a

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
        tensor, scale, offset = self._letterbox(frame_bgr)
        raw_boxes, raw_scores = self._session.run([self._box_out, self._score_out], {self._input_name: tensor})
        logits = raw_scores.reshape(-1)
        keep = np.flatnonzero(logits >= self._min_logit)
        if keep.size == 0:
            return []
        raw = raw_boxes.reshape(-1, 4 + 2 * NUM_KEYPOINTS)[keep]
        anchors = self._anchors_for(tensor.shape[1])[keep]
        # MediaPipe clips logits to +-100 before the sigmoid; kept ones are >= the threshold's logit, so
        # only the upper clip can apply, and only to these few.
        scores = 1.0 / (1.0 + np.exp(-np.minimum(logits[keep], 100.0)))
        # Decode in tensor pixels: offsets are in pixels of the 128 input, relative to the anchor centre.
        centre = raw[:, 0:2] + anchors
        half = raw[:, 2:4] / 2.0
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = raw[:, 4:].reshape(-1, NUM_KEYPOINTS, 2) + anchors[:, None, :]
        merged = weighted_nms(boxes, kps, scores, self.iou, self.max_faces)
        limit = np.array([w, h, w, h], dtype=np.float32)
        out = []
        for box, kp, score in merged:
            b = ((box.reshape(2, 2) - offset) / scale).reshape(4)
            b = np.minimum(np.maximum(b, 0.0), limit)
            if b[2] - b[0] < 1.0 or b[3] - b[1] < 1.0:
                continue
            out.append(Detection(box=tuple(float(v) for v in b), score=score,
                                 keypoints=((kp - offset) / scale).astype(np.float32)))
        return out
