"""IoU tracker: stable per-run face ids and smoothed emotion probabilities between frames.

Emotion from a single frame flickers; averaging over a face's own frames is what makes it usable
(DeepStream/Frigate practice). Ids are a per-run counter: they say "the same box as before", never who
the person is, and they are not stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from appliance.vision.detector import Detection
from appliance.vision.emotion import LABELS


@dataclass(frozen=True)
class Track:
    """A snapshot of one tracked face (the tracker keeps its own mutable state)."""

    track_id: int
    box: tuple[float, float, float, float]
    probs: np.ndarray = field(repr=False, compare=False)  # (7,) EMA-smoothed, LABELS order
    hits: int          # detections matched so far
    misses: int        # consecutive detection updates without a match
    confirmed: bool    # hits >= min_hits: only confirmed tracks should be reported
    age: int = 0       # frames since the last matched detection (coasted frames included)
    detection: Detection | None = field(default=None, repr=False, compare=False)  # last matched

    @property
    def visible(self) -> bool:
        """Confirmed and matched on the latest detection frame."""
        return self.confirmed and self.misses == 0


@dataclass
class _State:
    track_id: int
    box: np.ndarray
    probs: np.ndarray
    hits: int = 1
    misses: int = 0
    age: int = 0
    detection: Detection | None = None


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of a (N, 4) and b (M, 4), x1 y1 x2 y2 -> (N, M)."""
    if a.size == 0 or b.size == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


class IoUTracker:
    """Greedy IoU matching of detections to tracks, with EMA smoothing of emotion probabilities.

    A track is confirmed after `min_hits` matched detections and dropped once it has missed more than
    `max_misses` consecutive detection updates. `smoothing` is the weight of the newest frame.
    """

    def __init__(self, iou_threshold: float = 0.3, min_hits: int = 2, max_misses: int = 5,
                 smoothing: float = 0.3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        self.iou_threshold = float(iou_threshold)
        self.min_hits = int(min_hits)
        self.max_misses = int(max_misses)
        self.smoothing = float(smoothing)
        self._tracks: list[_State] = []
        self._next_id = 1

    def reset(self) -> None:
        """Forget every track (consent revoked, camera closed). Ids keep counting up within the run."""
        self._tracks.clear()

    def update(self, detections: Sequence[Detection], probs: np.ndarray | None = None) -> list[Track]:
        """Match this frame's detections (and their (N, 7) probabilities); return all live tracks."""
        n = len(detections)
        if probs is None:
            probs = np.full((n, len(LABELS)), np.nan, dtype=np.float32)
        probs = np.asarray(probs, dtype=np.float32).reshape(n, len(LABELS))
        boxes = np.array([d.box for d in detections], dtype=np.float32).reshape(n, 4)
        prev = np.array([t.box for t in self._tracks], dtype=np.float32).reshape(len(self._tracks), 4)
        iou = iou_matrix(prev, boxes)

        matched_t: set[int] = set()
        matched_d: set[int] = set()
        # Greedy by IoU, best pair first: good enough for a handful of faces, and deterministic.
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            ti, di = divmod(int(flat), n)
            if iou[ti, di] < self.iou_threshold:
                break
            if ti in matched_t or di in matched_d:
                continue
            matched_t.add(ti)
            matched_d.add(di)
            t = self._tracks[ti]
            t.box, t.detection = boxes[di], detections[di]
            if not np.isnan(probs[di]).any():
                t.probs = (1.0 - self.smoothing) * t.probs + self.smoothing * probs[di]
            t.hits += 1
            t.misses = 0
            t.age = 0

        for ti, t in enumerate(self._tracks):
            if ti not in matched_t:
                t.misses += 1
                t.age += 1
        self._tracks = [t for t in self._tracks if t.misses <= self.max_misses]

        for di in range(n):
            if di not in matched_d:
                p = probs[di] if not np.isnan(probs[di]).any() else np.full(len(LABELS), 1 / len(LABELS))
                self._tracks.append(_State(self._next_id, boxes[di], p.astype(np.float32),
                                           detection=detections[di]))
                self._next_id += 1
        return self.predict()

    def predict(self) -> list[Track]:
        """The live tracks as they stand (boxes kept where they were last seen); changes nothing."""
        return [Track(track_id=t.track_id, box=tuple(float(v) for v in t.box), probs=t.probs.copy(),
                      hits=t.hits, misses=t.misses, confirmed=t.hits >= self.min_hits, age=t.age,
                      detection=t.detection)
                for t in self._tracks]

    def coast(self) -> list[Track]:
        """A frame on which detection was skipped (detect_interval > 1): age the tracks, keep their boxes.

        Coasting is not a miss: a track is only dropped for missing real detection updates.
        """
        for t in self._tracks:
            t.age += 1
        return self.predict()
