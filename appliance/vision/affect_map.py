"""From 7 emotion probabilities to circumplex affect (valence, arousal), engagement and a mood word.

The ranker wants two continuous axes, not seven labels: Russell's circumplex model of affect places
emotion words on a circle in the valence (pleasure, x) / arousal (activation, y) plane. We put each
FER2013 class at the angle Russell (1980) measured for the matching word and take the probability-
weighted mean, so a face that is 60% happy and 40% neutral lands 60% of the way to "happy".

Angles (degrees, counter-clockwise from +valence) from J. A. Russell, "A circumplex model of affect",
Journal of Personality and Social Psychology 39(6):1161-1178, 1980 (direct circular scaling of 28 affect
words): happy 7.8, astonished 69.8, angry 99.0, afraid 116.9, annoyed 123.0, distressed 138.0,
frustrated 141.0, sad 207.5, bored 241.9, tired 267.7, calm 316.2, content 323.7, pleased 353.2.
"Disgust" is not among Russell's words; we place it between annoyed and distressed (130 deg), a choice
of ours consistent with its usual placement (unpleasant, moderately activated). Neutral is the origin.
Every non-neutral class sits on the unit circle, so valence and arousal are in [-1, 1].
"""

from __future__ import annotations

import math

import numpy as np

from appliance.vision.detector import Detection
from appliance.vision.emotion import LABELS

# Class -> Russell (1980) angle in degrees, or None for the origin (neutral).
CIRCUMPLEX_DEG: dict[str, float | None] = {
    "angry": 99.0,      # "angry"
    "disgust": 130.0,   # between "annoyed" (123.0) and "distressed" (138.0): our placement
    "fear": 116.9,      # "afraid"
    "happy": 7.8,       # "happy"
    "sad": 207.5,       # "sad"
    "surprise": 69.8,   # "astonished"
    "neutral": None,    # origin
}


def _coords() -> np.ndarray:
    xy = np.zeros((len(LABELS), 2), dtype=np.float32)
    for i, label in enumerate(LABELS):
        deg = CIRCUMPLEX_DEG[label]
        if deg is not None:
            xy[i] = (math.cos(math.radians(deg)), math.sin(math.radians(deg)))
    return xy


# (7, 2) valence/arousal of each class, in LABELS order; computed once.
CLASS_VA: np.ndarray = _coords()


def valence_arousal(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 7) or (7,) probabilities -> valence, arousal arrays of shape (N,) or () in [-1, 1]."""
    p = np.asarray(probs, dtype=np.float32)
    if p.shape[-1] != len(LABELS):
        raise ValueError(f"expected probabilities over {len(LABELS)} classes, got shape {p.shape}")
    va = p @ CLASS_VA
    return va[..., 0], va[..., 1]


# Mood words at Russell angles (degrees); the nearest one by angle names a (valence, arousal) point.
MOODS: tuple[tuple[str, float], ...] = (
    ("upbeat", 16.0),    # happy 7.8 .. delighted 24.9
    ("excited", 48.6),   # excited
    ("surprised", 69.8),  # astonished
    ("tense", 99.0),     # tense 92.8, alarmed 96.5, angry 99.0, afraid 116.9
    ("upset", 139.5),    # distressed 138.0, frustrated 141.0
    ("sad", 207.5),      # miserable 188.7, sad 207.5, gloomy 209.0, depressed 210.0
    ("tired", 255.0),    # bored 241.9, droopy 256.7, tired 267.7
    ("calm", 320.0),     # calm 316.2, relaxed 318.0, content 323.7, serene 328.6
    ("content", 349.0),  # glad 345.3, pleased 353.2
)
NEUTRAL_RADIUS = 0.25


def mood_word(valence: float, arousal: float) -> str:
    """A word a household understands for one (valence, arousal) point; "neutral" near the origin."""
    v, a = float(valence), float(arousal)
    if math.hypot(v, a) < NEUTRAL_RADIUS:
        return "neutral"
    angle = math.degrees(math.atan2(a, v)) % 360.0
    return min(MOODS, key=lambda m: min(abs(angle - m[1]), 360.0 - abs(angle - m[1])))[0]


def _clip01(x: float) -> float:
    """Scalar clip to [0, 1] (np.clip on a Python float costs ~8 us; this runs per face per frame)."""
    return min(1.0, max(0.0, float(x)))


def frontalness(keypoints: np.ndarray) -> float:
    """1.0 for a face looking at the camera, towards 0 as it turns away (yaw from keypoint symmetry).

    With the head turned, the nose moves towards one ear tragion: compare the horizontal nose-to-ear
    distances on both sides. The eyes give a second estimate (nose between the eyes).
    """
    kp = np.asarray(keypoints, dtype=np.float32)
    r_eye, l_eye, nose, _, r_ear, l_ear = kp[:, 0]
    ears = abs(nose - r_ear) + abs(l_ear - nose)
    eyes = abs(nose - r_eye) + abs(l_eye - nose)
    ear_asym = abs(abs(nose - r_ear) - abs(l_ear - nose)) / ears if ears > 0 else 1.0
    eye_asym = abs(abs(nose - r_eye) - abs(l_eye - nose)) / eyes if eyes > 0 else 1.0
    asym = 0.5 * (ear_asym + eye_asym)
    # asym ~0.1 for a frontal face, ~0.6+ in profile (measured on the reference photos).
    return _clip01(1.0 - (asym - 0.1) / 0.5)


def engagement(detection: Detection | None, frame_shape: tuple[int, ...]) -> float:
    """How engaged with the screen a viewer looks, in [0, 1] (heuristic, not a trained model).

    No face -> 0. Otherwise mostly how frontal the face is (looking at the screen), then its size
    (a face under ~6% of the frame width is far away or half out of view, and its emotion less reliable),
    then the detector's confidence.
    """
    if detection is None:
        return 0.0
    width = max(1, int(frame_shape[1]))
    x1, _, x2, _ = detection.box
    size = _clip01((x2 - x1) / width / 0.06)
    score = 0.6 * frontalness(detection.keypoints) + 0.25 * size + 0.15 * float(detection.score)
    return _clip01(score)
