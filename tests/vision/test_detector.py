from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from appliance.vision.detector import (
    INPUT_SIZE,
    ROW_MARGIN,
    BlazeFaceDetector,
    Detection,
    Letterbox,
    anchor_centres_px,
    input_rows,
    to_input_tensor,
    weighted_nms,
)
from tests.vision.conftest import read_image


def ssd_anchors(input_size: int = INPUT_SIZE, strides: tuple[int, ...] = (8, 16, 16, 16)) -> np.ndarray:
    """MediaPipe's SsdAnchorsCalculator algorithm (the reference the product's anchor_centres_px is held to):
    anchor centres (K, 2) in [0, 1] for this model.

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


def _reference_input(frame: np.ndarray) -> np.ndarray:
    """The letterbox written the plain way: a zeroed canvas, the shrunk picture flipped to RGB, scaled."""
    h, w = frame.shape[:2]
    scale = 128 / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    ox, oy = (128 - nw) // 2, (128 - nh) // 2
    if w >= 4 * nw and h >= 4 * nh:
        small = cv2.resize(cv2.resize(frame, (2 * nw, 2 * nh), interpolation=cv2.INTER_LINEAR), (nw, nh),
                           interpolation=cv2.INTER_AREA)
    else:
        small = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((128, 128, 3), np.uint8)
    canvas[oy:oy + nh, ox:ox + nw] = small[..., ::-1]
    return (canvas.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0))[None]


def test_reused_letterbox_equals_the_plain_one_across_geometry_changes():
    rng = np.random.default_rng(3)
    box = Letterbox()
    # landscape, portrait, small (no two-step shrink), landscape again: bars must follow each geometry
    for shape in [(360, 640, 3), (640, 360, 3), (100, 150, 3), (360, 640, 3), (720, 1280, 3)]:
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        got, scale, offset = box(frame)
        ref = _reference_input(frame)
        assert np.array_equal(got, ref), shape
        want_t, want_s, want_o = to_input_tensor(frame)
        assert np.array_equal(scale, want_s) and np.array_equal(offset, want_o)


def test_anchor_centres_in_pixels_match_the_square_layout_and_shrink_with_the_rows():
    assert np.allclose(anchor_centres_px(128), ssd_anchors() * 128)
    a96 = anchor_centres_px(96)
    assert len(a96) == 12 * 16 * 2 + 6 * 8 * 6
    # every anchor of the 96-row input is an anchor of the square input shifted by the 16 cropped rows
    square = {tuple(p) for p in (ssd_anchors() * 128).round(3).tolist()}
    assert all((x, y + 16) in square for x, y in a96.round(3).tolist())
    with pytest.raises(ValueError):
        anchor_centres_px(100)


def test_input_rows_keep_the_picture_and_a_margin_of_black():
    assert input_rows(360, 640) == 96 and input_rows(720, 1280) == 96   # 16:9: 72 picture rows
    assert input_rows(480, 640) == 128                                  # 4:3: 96 picture rows + margin
    assert input_rows(640, 360) == 128 and input_rows(100, 100) == 128   # portrait, square
    for h, w in [(360, 640), (300, 1000), (1, 640), (480, 640)]:
        rows = input_rows(h, w)
        picture = max(1, round(h * 128 / max(h, w)))
        assert rows % 16 == 0 and picture + 2 * ROW_MARGIN <= rows <= 128 or rows == 128


def test_fitted_letterbox_is_the_square_one_without_the_outer_bars():
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    square, s_scale, s_off = Letterbox()(frame)
    fit, f_scale, f_off = Letterbox(adaptive_rows=True)(frame)
    assert fit.shape == (1, 96, 128, 3)
    assert np.array_equal(fit[0], square[0, 16:112])
    assert np.array_equal(f_scale, s_scale) and f_off.tolist() == [s_off[0], s_off[1] - 16]


def test_the_detector_on_fitted_rows_finds_the_same_faces(detector: BlazeFaceDetector):
    assert detector.adaptive_rows  # the committed model's input height is dynamic
    square = BlazeFaceDetector(detector._session, fit_rows=False)
    img = read_image("media", "two_people.jpg")
    h, w = img.shape[:2]
    wide = cv2.resize(img[: int(w * 9 / 16)] if h > w * 9 / 16 else img, (640, 360))
    a, b = square.detect(wide), detector.detect(wide)
    assert len(a) == len(b) == 2
    for x, y in zip(sorted(a, key=lambda d: d.box[0]), sorted(b, key=lambda d: d.box[0])):
        assert np.allclose(x.box, y.box, atol=3.0) and abs(x.score - y.score) < 0.02
