from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from appliance.vision.detector import BlazeFaceDetector, Detection, ssd_anchors, to_input_tensor, weighted_nms
from tests.vision.conftest import read_image


def _inside(point: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_anchors_match_mediapipe_short_range_layout():
    a = ssd_anchors()
    assert a.shape == (896, 2)
    # stride 8: 16x16 cells x 2 anchors, first cell centre at (0.5/16, 0.5/16)
    assert np.allclose(a[0], [1 / 32, 1 / 32]) and np.allclose(a[1], a[0])
    assert np.allclose(a[2], [3 / 32, 1 / 32])
    # strides 16,16,16 share one 8x8 grid with 6 anchors per cell
    assert np.allclose(a[512:518], [1 / 16, 1 / 16])
    assert np.allclose(a[-1], [15 / 16, 15 / 16])


def test_one_face_in_justin(detector: BlazeFaceDetector):
    img = read_image("media", "justin.jpg")
    faces = detector.detect(img)
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.8
    x1, y1, x2, y2 = f.box
    h, w = img.shape[:2]
    # a close-up: the face is a large central part of the photo
    assert 0.3 * w < x2 - x1 < 0.8 * w and 0.3 * h < y2 - y1 < 0.8 * h
    assert f.keypoints.shape == (6, 2)
    for k in range(4):  # eyes, nose, mouth lie inside the box
        assert _inside(f.keypoints[k], f.box)
    # the subject's right eye is on the image's left
    assert f.keypoints[0, 0] < f.keypoints[2, 0] < f.keypoints[1, 0]


def test_two_faces_in_two_people(detector: BlazeFaceDetector):
    img = read_image("media", "two_people.jpg")
    faces = detector.detect(img)
    assert len(faces) == 2
    left, right = sorted(faces, key=lambda d: d.box[0])
    assert left.box[2] < right.box[0]  # side by side, not overlapping
    for f in faces:
        assert 0 <= f.box[0] < f.box[2] <= img.shape[1] and 0 <= f.box[1] < f.box[3] <= img.shape[0]


def test_boxes_map_back_through_letterbox(detector: BlazeFaceDetector):
    img = read_image("media", "justin.jpg")
    (ref,) = detector.detect(img)
    # put the photo into a wide black frame at an offset: the box must move with it
    frame = np.zeros((img.shape[0] + 40, img.shape[1] * 2 + 100, 3), np.uint8)
    frame[40:, 100:100 + img.shape[1]] = img
    (moved,) = detector.detect(frame)
    # the face is 2.3x smaller at the model's input, so the box estimate itself varies a little;
    # the mapping back must put it in the same place
    width = ref.box[2] - ref.box[0]
    ref_c = np.array([(ref.box[0] + ref.box[2]) / 2 + 100, (ref.box[1] + ref.box[3]) / 2 + 40])
    moved_c = np.array([(moved.box[0] + moved.box[2]) / 2, (moved.box[1] + moved.box[3]) / 2])
    assert np.abs(moved_c - ref_c).max() < 0.03 * width
    assert abs((moved.box[2] - moved.box[0]) / width - 1) < 0.15
    np.testing.assert_allclose(moved.keypoints[:4], ref.keypoints[:4] + [100, 40], atol=0.05 * width)


def test_no_face_in_blank_or_noise(detector: BlazeFaceDetector):
    assert detector.detect(np.zeros((360, 640, 3), np.uint8)) == []
    assert detector.detect(np.full((360, 640, 3), 200, np.uint8)) == []
    rng = np.random.default_rng(0)
    assert detector.detect(rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)) == []


def test_max_faces_and_min_score(detector: BlazeFaceDetector):
    img = read_image("media", "two_people.jpg")
    one = BlazeFaceDetector(detector._session, max_faces=1)
    assert len(one.detect(img)) == 1
    strict = BlazeFaceDetector(detector._session, min_score=0.99)
    assert strict.detect(img) == []


def test_rejects_wrong_frame(detector: BlazeFaceDetector):
    with pytest.raises(ValueError):
        detector.detect(np.zeros((64, 64), np.uint8))


def test_input_tensor_range_and_letterbox():
    frame = np.full((100, 200, 3), 255, np.uint8)
    t, scale, offset = to_input_tensor(frame)
    assert t.shape == (1, 128, 128, 3) and t.dtype == np.float32
    assert scale.tolist() == pytest.approx([0.64, 0.64]) and offset.tolist() == [0, 32]
    assert t[0, 64, 64].tolist() == [1.0, 1.0, 1.0]      # picture
    assert t[0, 5, 64].tolist() == [-1.0, -1.0, -1.0]    # black bar


def test_weighted_nms_blends_overlaps_and_keeps_separate_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    kps = np.zeros((3, 6, 2), np.float32)
    kps[1] += 1
    scores = np.array([0.9, 0.6, 0.8], np.float32)
    out = weighted_nms(boxes, kps, scores, iou=0.3, max_out=8)
    assert len(out) == 2
    box, kp, score = out[0]
    assert score == pytest.approx(0.9)
    assert np.allclose(box, [0.4, 0.4, 10.4, 10.4])  # (0*0.9 + 1*0.6) / 1.5
    assert np.allclose(kp, 0.4)
    assert np.allclose(out[1][0], boxes[2])


def test_detection_is_frozen():
    d = Detection(box=(0.0, 0.0, 1.0, 1.0), score=0.9, keypoints=np.zeros((6, 2), np.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.score = 0.1  # type: ignore[misc]
    assert d == Detection(box=d.box, score=0.9, keypoints=np.ones((6, 2), np.float32))  # arrays not compared
    assert len({d}) == 1
