"""The vision process on real parts: models, tracker, GStreamer child, ZeroMQ bus, Prometheus endpoint."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from appliance.bus import LatestPublisher, LatestSubscriber
from appliance.config import default_config
from appliance.ops.governor import Decision
from appliance.v1 import vision_pb2
from appliance.vision.detector import Detection
from appliance.vision.emotion import LABELS
from appliance.vision.process import VisionPipeline, VisionProcess
from tests.capture.conftest import needs_gst, write_video
from tests.vision.conftest import read_image

BALL = "videotestsrc pattern=ball is-live=true ! video/x-raw,framerate=30/1"


def _cfg(tmp_path: Path, run_dir: Path | None = None, **capture):
    return default_config().with_overrides(
        run_dir=str(run_dir or tmp_path), data_dir=str(tmp_path / "data"),
        capture={"width": 320, "height": 180, **capture},
        metrics={"vision_port": 0}, governor={"enabled": False})


# -- pipeline: tracks on real photos ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> VisionPipeline:
    return VisionPipeline(_cfg(tmp_path_factory.mktemp("vp")))


def test_pipeline_runs_the_product_emotion_model_and_says_so(pipeline: VisionPipeline):
    from appliance.vision.emotion import DEFAULT_EMOTION_MODEL

    assert pipeline.emotion_model == DEFAULT_EMOTION_MODEL == "emotion_cnn48_int8"
    assert pipeline.classifier.size == 48 and "+emotion_cnn48_int8@" in pipeline.model_version


def test_a_gpu_runs_the_fp32_base_of_the_cpu_int8_model(tmp_path: Path, monkeypatch):
    """The INT8 (QDQ) build is for CPUs: where the models run on a GPU the pipeline takes its FP32 base
    (TensorRT quantises that itself), and says so in the model version; on CPU it keeps the INT8 build."""
    import appliance.vision.process as vp

    assert not vp.runs_on_gpu(_cfg(tmp_path).vision)  # this machine: CPU only
    monkeypatch.setattr(vp, "runs_on_gpu", lambda v: True)
    p = VisionPipeline(_cfg(tmp_path))
    assert p.emotion_model == "emotion_cnn48" and "+emotion_cnn48@" in p.model_version
    cfg = _cfg(tmp_path).with_overrides(vision={"emotion_model": "emotion_vgg48_ms"})
    assert VisionPipeline(cfg).emotion_model == "emotion_vgg48_ms"  # not a quantised build: unchanged


def test_emotion_model_is_selectable_by_config(tmp_path: Path):
    """`vision.emotion_model` picks another manifest entry; its crop side follows; a non-emotion entry fails."""
    from appliance.errors import ConfigError

    cfg = _cfg(tmp_path)
    p = VisionPipeline(cfg.with_overrides(vision={"emotion_model": "fer_mini_xception"}))
    assert p.emotion_model == "fer_mini_xception" and p.classifier.size == 64
    img = read_image("media", "justin.jpg")
    tracks, seen = p.analyse(img)
    assert seen == 1
    with pytest.raises(ConfigError, match="emotion_model"):
        cfg.with_overrides(vision={"emotion_model": "blazeface_short_range"})


def test_two_people_make_two_tracks_with_distinct_ids(pipeline: VisionPipeline):
    pipeline.reset()
    img = read_image("media", "two_people.jpg")
    for _ in range(3):
        tracks, seen = pipeline.analyse(img)
    assert seen == 2
    live = [t for t in tracks if t.confirmed]
    assert len(live) == 2 and live[0].track_id != live[1].track_id
    left, right = sorted(live, key=lambda t: t.box[0])
    assert left.box[2] < right.box[0]  # two separate faces, side by side
    sample = pipeline.affect_sample(tracks, img.shape, "s1", time.monotonic_ns())
    assert sample.faces_seen == 2 and {f.track_id for f in sample.faces} == {left.track_id, right.track_id}
    assert np.isclose(sum(sample.probs), 1.0, atol=1e-3) and -1 <= sample.valence <= 1


def test_a_face_leaving_ends_its_track_and_the_other_keeps_its_id(pipeline: VisionPipeline):
    pipeline.reset()
    img = read_image("media", "two_people.jpg")
    for _ in range(3):
        tracks, _ = pipeline.analyse(img)
    left, right = sorted((t for t in tracks if t.confirmed), key=lambda t: t.box[0])
    gone = img.copy()
    cut = int((left.box[2] + right.box[0]) / 2)
    gone[:, cut:] = 128  # the person on the right walks out of the picture
    max_misses = pipeline.tracker.max_misses
    for k in range(max_misses + 1):
        tracks, seen = pipeline.analyse(gone)
        assert seen == 1
        ids = {t.track_id for t in tracks}
        assert left.track_id in ids
        assert (right.track_id in ids) == (k < max_misses)  # kept while it may come back, then dropped
    sample = pipeline.affect_sample(tracks, gone.shape, "s1", time.monotonic_ns())
    assert [f.track_id for f in sample.faces] == [left.track_id]


def test_detect_every_n_frames_coasts_in_between(pipeline: VisionPipeline):
    pipeline.reset()
    pipeline.detect_interval = 3
    try:
        img = read_image("media", "two_people.jpg")
        runs0 = pipeline.detections
        seen = [pipeline.analyse(img)[1] for _ in range(9)]
        assert seen == [2, -1, -1] * 3 and pipeline.detections - runs0 == 3
        tracks = pipeline.tracker.predict()
        assert len(tracks) == 2 and all(t.misses == 0 for t in tracks)  # coasting is not a miss
        assert pipeline.stage_ms["detect"] == 0.0  # the last frame was a tracked-only frame
    finally:
        pipeline.detect_interval = 1
        pipeline.reset()


# -- the AffectSample contract: derived scalars only ---------------------------------------------------
FACE_FIELDS = {"track_id", "probs", "valence", "arousal", "engagement"}
SAMPLE_FIELDS = {"session_id", "capture_ns", "inference_ns", "faces_seen", "faces", "probs", "valence", "arousal",
                 "engagement", "model_version"}


def test_affect_sample_carries_no_pixels(pipeline: VisionPipeline):
    assert {f.name for f in vision_pb2.FaceAffect.DESCRIPTOR.fields} == FACE_FIELDS
    assert {f.name for f in vision_pb2.AffectSample.DESCRIPTOR.fields} == SAMPLE_FIELDS
    for msg in (vision_pb2.FaceAffect, vision_pb2.AffectSample, vision_pb2.VisionUpdate, vision_pb2.VisionStatus):
        for f in msg.DESCRIPTOR.fields:
            assert f.type != FieldDescriptor.TYPE_BYTES, f"{msg.DESCRIPTOR.name}.{f.name} could carry pixels"
    # 8 faces (the configured maximum), real tracker and real affect mapping
    pipeline.reset()
    rng = np.random.default_rng(0)
    dets = [Detection(box=(10.0 + 70 * i, 20.0, 70.0 + 70 * i, 80.0), score=0.9,
                      keypoints=rng.uniform(0, 60, (6, 2)).astype(np.float32)) for i in range(8)]
    probs = rng.dirichlet(np.ones(len(LABELS)), 8).astype(np.float32)
    for _ in range(3):
        tracks = pipeline.tracker.update(dets, probs)
    sample = pipeline.affect_sample(tracks, (360, 640, 3), "session-0123456789abcdef", time.monotonic_ns())
    assert sample.faces_seen == 8 and len(sample.faces) == 8
    for face in sample.faces:
        assert {f.name for f, _ in face.ListFields()} <= FACE_FIELDS and len(face.probs) == len(LABELS)
    size = len(sample.SerializeToString())
    assert size < 1024, f"AffectSample for 8 faces is {size} bytes"
    pipeline.reset()


# -- the process: consent, reconnects, metrics ---------------------------------------------------------
class Ranker:
    """The ranker's side of the control bus, with the real bus classes."""

    def __init__(self, cfg) -> None:
        self.pub = LatestPublisher(cfg.path(cfg.bus.control_endpoint), bind=True)
        self.updates = LatestSubscriber(cfg.path(cfg.bus.affect_endpoint), bind=False)
        self.seq = 0
        self.sessions: list[str] = []

    def publish(self) -> float:
        self.seq += 1
        msg = vision_pb2.VisionControl(seq=self.seq, sent_ns=time.monotonic_ns())
        for s in self.sessions:
            msg.sessions.add(session_id=s, profile_id="p-" + s)
        self.pub.publish(msg.SerializeToString())
        return time.monotonic()

    def drive(self, vp: VisionProcess, until, timeout_s: float) -> None:
        """Step the vision loop, re-sending consent every 50 ms as the ranker does, until until()."""
        deadline = time.monotonic() + timeout_s
        last = 0.0
        while not until():
            assert time.monotonic() < deadline, "condition not met in time"
            if time.monotonic() - last > 0.05:
                last = self.publish()
            vp.step()

    def close(self) -> None:
        self.pub.close()
        self.updates.close()


@pytest.fixture
def process(run_dir: Path, tmp_path: Path):
    made: list[tuple[VisionProcess, Ranker]] = []

    def make(**capture) -> tuple[VisionProcess, Ranker]:
        cfg = _cfg(tmp_path, run_dir, **capture)
        vp = VisionProcess(cfg)
        ranker = Ranker(cfg)
        made.append((vp, ranker))
        return vp, ranker

    yield make
    for vp, ranker in made:
        vp.close()
        ranker.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_gst
def test_consent_revoked_mid_stream_closes_the_device_within_100ms(process):
    vp, ranker = process(kind="gstreamer", pipeline=BALL, fps=30)
    assert vp.source is None  # no consent yet: the device is not opened
    ranker.sessions = ["s1"]
    ranker.drive(vp, lambda: vp.frames >= 5, 10.0)
    pid = vp.source.inner.pid
    assert pid is not None and _alive(pid)
    ranker.sessions = []
    t0 = ranker.publish()
    while _alive(pid):
        assert time.monotonic() - t0 < 2.0, "gst-launch child still alive 2 s after consent was revoked"
        vp.step()
    elapsed = time.monotonic() - t0
    print(f"consent revoked -> gst-launch child gone in {elapsed * 1e3:.1f} ms")
    assert elapsed < 0.1, f"capture device closed {elapsed * 1e3:.0f} ms after the revocation"
    assert vp.source is None and vp.pipeline.tracker.predict() == []  # affect state purged too
    assert vp.metrics.camera_open._value.get() == 0


@needs_gst
def test_a_stopping_gstreamer_camera_is_reconnected_within_2s(process):
    # the child ends after 45 buffers (1.5 s) and the watchdog starts a new one: the camera "returns"
    vp, ranker = process(kind="gstreamer", fps=30, reconnect_initial_s=0.2, stall_timeout_s=1.0,
                         pipeline="videotestsrc num-buffers=45 pattern=ball is-live=true ! video/x-raw,framerate=30/1")
    ranker.sessions = ["s1"]
    times: list[float] = []

    def frames_after_a_reconnect() -> bool:
        if vp.frames > len(times):
            times.append(time.monotonic())
        return vp.source is not None and vp.source.stats.reconnects >= 1 and vp.frames >= 60

    ranker.drive(vp, frames_after_a_reconnect, 10.0)
    gaps = np.diff(times)
    print(f"longest gap between frames around the reconnect: {gaps.max():.3f} s")
    assert gaps.max() < 2.0, f"vision was without frames for {gaps.max():.2f} s around the reconnect"
    assert vp.camera_opens == 1  # the watchdog reconnected; the process did not have to reopen
    port = vp.metrics.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#") and "{" not in line}
    for name in ("appliance_camera_fps", "appliance_process_fps", "appliance_skipped_fps",
                 "appliance_detection_fps", "appliance_detector_inference_seconds", "appliance_camera_online",
                 "appliance_camera_open", "appliance_frames_processed_total", "appliance_faces"):
        assert name in values, name
    assert values["appliance_camera_reconnects_total"] >= 1
    assert values["appliance_frames_processed_total"] >= 60
    assert values["appliance_camera_open"] == 1 and values["appliance_consented_sessions"] == 1
    assert 0 < values["appliance_detector_inference_seconds"] < 0.5


@needs_gst
def test_an_unplugged_camera_is_back_within_2s_of_returning(process, tmp_path: Path):
    # The camera is absent long enough for the backoff to grow past 2 s; it returns at t_back.
    clip = tmp_path / "camera.avi"
    vp, ranker = process(kind="gstreamer", pipeline="file", device=str(clip), fps=20,
                         reconnect_initial_s=0.3, reconnect_max_s=5.0)
    ranker.sessions = ["s1"]
    t_open = time.monotonic()
    ranker.drive(vp, lambda: time.monotonic() - t_open > 3.0, 10.0)
    assert vp.frames == 0 and max(vp.source.backoffs) > 1.5
    write_video(tmp_path / "tmp.avi", frames=40, fps=20.0, size=(320, 180))
    os.rename(tmp_path / "tmp.avi", clip)  # the device node appears at once, as on a plug-in
    t_back = time.monotonic()
    ranker.drive(vp, lambda: vp.frames >= 1, 10.0)
    elapsed = time.monotonic() - t_back
    print(f"backoffs while absent: {[round(b, 2) for b in vp.source.backoffs]}; first frame {elapsed:.3f} s "
          "after the camera returned")
    assert elapsed < 2.0, f"first frame {elapsed:.2f} s after the camera returned"


@needs_gst
def test_governor_caps_the_rate_and_latest_frame_wins(process):
    vp, ranker = process(kind="gstreamer", pipeline=BALL, fps=30)
    ranker.sessions = ["s1"]
    ranker.drive(vp, lambda: vp.frames >= 3, 10.0)
    vp.apply_governor(Decision(level=3, fps=5.0, detect_interval=4, precision="fp32", pause_training=True,
                               reason="test"))
    assert vp.pipeline.detect_interval == 4
    f0, d0, t0 = vp.frames, vp.pipeline.detections, time.monotonic()
    ranker.drive(vp, lambda: time.monotonic() - t0 > 1.5, 5.0)
    processed = vp.frames - f0
    assert 5 <= processed <= 10, processed  # ~5 fps, not the camera's 30
    assert vp.pipeline.detections - d0 <= processed // 4 + 1
    assert vp.source.stats.frames_skipped > 20  # the camera's other frames were dropped, not queued
