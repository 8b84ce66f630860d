from __future__ import annotations

import numpy as np
import pytest

from appliance.vision.detector import Detection
from appliance.vision.tracker import IoUTracker, iou_matrix

HAPPY = np.eye(7, dtype=np.float32)[3]
SAD = np.eye(7, dtype=np.float32)[4]


def det(x: float, y: float, size: float = 100.0) -> Detection:
    return Detection(box=(x, y, x + size, y + size), score=0.9, keypoints=np.zeros((6, 2), np.float32))


def test_two_moving_faces_keep_distinct_stable_ids():
    tr = IoUTracker(min_hits=2)
    ids_seen = []
    for step in range(20):
        a, b = det(50 + 5 * step, 100), det(600 - 5 * step, 120)  # walking towards each other, 20 px/2
        order = [a, b] if step % 2 else [b, a]                       # detector order is not stable
        tracks = tr.update(order, np.stack([HAPPY, SAD] if step % 2 else [SAD, HAPPY]))
        assert len(tracks) == 2
        by_x = sorted(tracks, key=lambda t: t.box[0])
        ids_seen.append((by_x[0].track_id, by_x[1].track_id))
    assert len(set(ids_seen)) == 1
    left_id, right_id = ids_seen[0]
    assert left_id != right_id
    final = {t.track_id: t for t in tr.predict()}
    assert final[left_id].confirmed and final[left_id].visible
    assert final[left_id].probs.argmax() == 3 and final[right_id].probs.argmax() == 4


def test_confirmed_only_after_min_hits():
    tr = IoUTracker(min_hits=3)
    assert not tr.update([det(0, 0)], HAPPY[None])[0].confirmed
    assert not tr.update([det(2, 0)], HAPPY[None])[0].confirmed
    assert tr.update([det(4, 0)], HAPPY[None])[0].confirmed


def test_face_leaving_ends_track_after_max_misses():
    tr = IoUTracker(min_hits=1, max_misses=5)
    (t,) = tr.update([det(0, 0)], HAPPY[None])
    for miss in range(1, 6):
        tracks = tr.update([], np.zeros((0, 7), np.float32))
        assert len(tracks) == 1 and tracks[0].misses == miss and not tracks[0].visible
    assert tr.update([], np.zeros((0, 7), np.float32)) == []
    # a face that comes back later is a new track (ids are never reused)
    (again,) = tr.update([det(0, 0)], HAPPY[None])
    assert again.track_id != t.track_id


def test_coasting_keeps_boxes_and_does_not_count_as_miss():
    tr = IoUTracker(min_hits=1, max_misses=1)
    tr.update([det(10, 10)], HAPPY[None])
    for k in range(1, 30):  # detect_interval = 30: many skipped frames
        (t,) = tr.coast()
        assert t.box == (10.0, 10.0, 110.0, 110.0) and t.misses == 0 and t.age == k
    assert tr.predict()[0].age == 29
    (t,) = tr.update([det(12, 10)], HAPPY[None])
    assert t.age == 0 and t.hits == 2


def test_probabilities_are_ema_smoothed():
    tr = IoUTracker(smoothing=0.3)
    tr.update([det(0, 0)], HAPPY[None])
    (t,) = tr.update([det(1, 0)], SAD[None])
    assert t.probs[3] == pytest.approx(0.7) and t.probs[4] == pytest.approx(0.3)
    (t,) = tr.update([det(2, 0)], None)  # no classification this frame: probabilities unchanged
    assert t.probs[3] == pytest.approx(0.7)


def test_snapshots_do_not_change_afterwards():
    tr = IoUTracker()
    (first,) = tr.update([det(0, 0)], HAPPY[None])
    tr.update([det(3, 0)], SAD[None])
    assert first.box == (0.0, 0.0, 100.0, 100.0) and first.probs.argmax() == 3


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 1 / 3, 0.0]], rtol=1e-6)
    assert iou_matrix(a[:0], b).shape == (0, 3)
