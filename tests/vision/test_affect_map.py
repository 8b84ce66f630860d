from __future__ import annotations

import numpy as np

from appliance.vision.affect_map import CLASS_VA, engagement, frontalness, mood_word, valence_arousal
from appliance.vision.detector import BlazeFaceDetector, Detection
from appliance.vision.emotion import LABELS
from tests.vision.conftest import read_image


def onehot(label: str) -> np.ndarray:
    return np.eye(7, dtype=np.float32)[LABELS.index(label)]


def test_class_signs_follow_the_circumplex():
    v, a = valence_arousal(np.stack([onehot(k) for k in LABELS]))
    val = dict(zip(LABELS, v.tolist()))
    aro = dict(zip(LABELS, a.tolist()))
    assert val["happy"] > 0.9 and val["sad"] < -0.8
    assert val["angry"] < 0 and val["fear"] < 0 and val["disgust"] < 0
    assert aro["angry"] > 0.9 and aro["fear"] > 0.8 and aro["surprise"] > 0.9 and aro["sad"] < 0
    assert val["neutral"] == 0 and aro["neutral"] == 0
    assert np.all(np.abs(CLASS_VA) <= 1)


def test_vectorised_shapes_and_mixing():
    probs = np.stack([onehot("happy"), onehot("sad"), 0.5 * onehot("happy") + 0.5 * onehot("neutral")])
    v, a = valence_arousal(probs)
    assert v.shape == (3,) and a.shape == (3,)
    assert np.isclose(v[2], 0.5 * v[0])
    v1, _ = valence_arousal(onehot("happy"))
    assert v1.shape == () and np.isclose(v1, v[0])
    assert valence_arousal(np.zeros((0, 7)))[0].shape == (0,)


def test_mood_words():
    assert mood_word(0.0, 0.05) == "neutral"
    assert mood_word(*[float(x) for x in valence_arousal(onehot("happy"))]) == "upbeat"
    assert mood_word(*[float(x) for x in valence_arousal(onehot("sad"))]) == "sad"
    assert mood_word(*[float(x) for x in valence_arousal(onehot("angry"))]) == "tense"
    assert mood_word(*[float(x) for x in valence_arousal(onehot("surprise"))]) == "surprised"
    assert mood_word(0.7, 0.7) == "excited"
    assert mood_word(0.7, -0.6) == "calm"


def test_engagement_of_real_faces(detector: BlazeFaceDetector):
    img = read_image("media", "justin.jpg")
    (face,) = detector.detect(img)
    assert frontalness(face.keypoints) > 0.9
    e = engagement(face, img.shape)
    assert 0.8 < e <= 1.0
    assert engagement(None, img.shape) == 0.0
    # the same face, tiny in a 4K-wide frame (far from the camera), counts as less engaged
    assert engagement(face, (2160, 3840, 3)) < e


def test_turned_face_is_less_frontal():
    frontal = np.array([[40, 50], [60, 50], [50, 60], [50, 70], [25, 55], [75, 55]], np.float32)
    turned = frontal.copy()
    turned[:4, 0] += [8, 12, 16, 12]  # head turned: nose (nearest the camera) moves most, towards one ear
    d = Detection(box=(20, 30, 80, 90), score=0.9, keypoints=turned)
    assert frontalness(frontal) == 1.0
    assert frontalness(turned) < 0.5
    assert engagement(d, (100, 100, 3)) < engagement(
        Detection(box=(20, 30, 80, 90), score=0.9, keypoints=frontal), (100, 100, 3))
