"""The no-camera default: a real face photo moving and zooming over a mildly textured background.

A real face (not a drawing) means the detector, tracker and classifier do real work in the demo and
in CI on boxes without a camera. The path is a deterministic function of the frame number, so runs
are reproducible; the face always stays fully inside the frame and at least ~24% of its height, which
BlazeFace short range (128x128 input) and OpenCV's Haar cascade both find.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from appliance.capture.base import ThreadedSource
from appliance.errors import CaptureError

ASSET = Path(__file__).resolve().parent / "assets" / "astronaut.jpg"
#: where the face sits in the asset (x, y, w, h), measured once with OpenCV's Haar cascade
ASSET_FACE_BOX = (73, 58, 95, 95)
#: sprite height as a fraction of the frame height: face height is ~0.33 of the sprite
SCALE_RANGE = (0.72, 0.95)


@lru_cache(maxsize=1)
def _load_sprite() -> tuple[np.ndarray, np.ndarray]:
    """The photo and a feathered alpha mask, so the paste has no hard edges for a detector to latch onto."""
    image = cv2.imread(str(ASSET), cv2.IMREAD_COLOR)
    if image is None:
        raise CaptureError(f"synthetic source: face asset missing or unreadable: {ASSET}")
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.float32)
    inset_x, inset_y = int(w * 0.07), int(h * 0.05)
    mask[inset_y:h - inset_y // 3, inset_x:w - inset_x] = 1.0  # keep the shoulders down to the edge
    k = (int(min(w, h) * 0.08) | 1)
    mask = cv2.GaussianBlur(mask, (k * 2 + 1, k * 2 + 1), k / 2)
    return image, mask


def _background(width: int, height: int) -> np.ndarray:
    """A soft vertical gradient with faint low-frequency texture (fixed seed: same every run)."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top = np.array([196, 186, 170], np.float32)  # BGR: a light wall
    bottom = np.array([120, 112, 104], np.float32)
    base = top * (1 - y) + bottom * y
    rng = np.random.default_rng(20240611)
    noise = rng.normal(0.0, 1.0, (9, 16)).astype(np.float32)
    noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)[:, :, None]
    return np.ascontiguousarray(np.clip(base + noise * 6.0, 0, 255).astype(np.uint8))


class SyntheticFaceSource(ThreadedSource):
    """Scikit-image's public-domain `astronaut` photo on a smooth Lissajous path, paced at fps."""

    def __init__(self, width: int, height: int, fps: float, name: str = "synthetic:astronaut") -> None:
        super().__init__(name, width, height)
        self.fps = float(fps)
        self._n = 0
        self._next_due = 0.0
        self._bg: np.ndarray | None = None

    def placement(self, n: int) -> tuple[int, int, int, int]:
        """Sprite (x, y, w, h) for frame n: a deterministic, smooth path that stays in frame."""
        image, _ = _load_sprite()
        ah, aw = image.shape[:2]
        t = n / self.fps
        lo, hi = SCALE_RANGE
        frac = lo + (hi - lo) * 0.5 * (1 + math.sin(2 * math.pi * t / 7.0))
        sh = max(8, int(self.height * frac))
        sw = max(8, int(sh * aw / ah))
        if sw > self.width * 0.9:  # portrait or very narrow frames: bound by width instead
            sw = max(8, int(self.width * 0.9))
            sh = max(8, int(sw * ah / aw))
        free_x, free_y = self.width - sw, self.height - sh
        x = int(free_x * 0.5 * (1 + math.sin(2 * math.pi * t / 5.0)))
        y = int(free_y * 0.5 * (1 + math.sin(2 * math.pi * t / 3.3 + 1.0)))
        return x, y, sw, sh

    def face_box(self, n: int) -> tuple[int, int, int, int]:
        """Where the face is in frame n (x, y, w, h): ground truth for detector tests."""
        x, y, sw, sh = self.placement(n)
        image, _ = _load_sprite()
        sx, sy = sw / image.shape[1], sh / image.shape[0]
        fx, fy, fw, fh = ASSET_FACE_BOX
        return x + int(fx * sx), y + int(fy * sy), int(fw * sx), int(fh * sy)

    def render(self, n: int) -> np.ndarray:
        """Frame n, composed from scratch (no state but the cached background)."""
        if self._bg is None:
            self._bg = _background(self.width, self.height)
        image, mask = _load_sprite()
        x, y, sw, sh = self.placement(n)
        interp = cv2.INTER_AREA if sh < image.shape[0] else cv2.INTER_LINEAR
        sprite = cv2.resize(image, (sw, sh), interpolation=interp).astype(np.float32)
        alpha = cv2.resize(mask, (sw, sh), interpolation=cv2.INTER_LINEAR)[:, :, None]
        frame = self._bg.copy()
        roi = frame[y:y + sh, x:x + sw].astype(np.float32)
        frame[y:y + sh, x:x + sw] = (sprite * alpha + roi * (1 - alpha)).astype(np.uint8)
        return frame

    def _start(self) -> None:
        _load_sprite()  # fail open() (not the reader thread) when the asset is missing
        self._n = 0
        self._next_due = time.monotonic()

    def _next_image(self) -> np.ndarray | None:
        now = time.monotonic()
        if self._next_due > now and self._stop.wait(self._next_due - now):
            return None
        self._next_due = max(self._next_due + 1.0 / self.fps, time.monotonic() - 1.0 / self.fps)
        frame = self.render(self._n)
        self._n += 1
        return frame
