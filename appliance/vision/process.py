"""The vision process: consent-gated capture -> detect -> classify -> track -> AffectSample on the bus.

The capture device is opened only while the ranker says a consented session is open, and closed
(with its affect state dropped) as soon as that ends or the ranker goes silent (fail closed).
Latest frame wins everywhere: the source keeps one frame, the bus keeps one message.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.bus import LatestPublisher, LatestSubscriber
from appliance.capture import FrameSource, make_source
from appliance.config import ApplianceConfig
from appliance.models.manifest import model_path, verify_models
from appliance.v1 import vision_pb2
from appliance.vision.affect_map import engagement, valence_arousal
from appliance.vision.detector import BlazeFaceDetector
from appliance.vision.emotion import EmotionClassifier, crop_faces
from appliance.vision.runtime import create_session
from appliance.vision.tracker import IoUTracker

log = logging.getLogger("appliance.vision")

STATUS_PERIOD_S = 0.2
DETECTOR_MODEL = "blazeface_short_range"
EMOTION_MODEL = "fer_mini_xception"


@dataclass
class Rates:
    """Frigate-style per-camera figures over a sliding second."""

    camera_fps: float = 0.0
    process_fps: float = 0.0
    skipped_fps: float = 0.0
    detector_ms: float = 0.0
    _t0: float = 0.0
    _delivered0: int = 0
    _processed0: int = 0
    _skipped0: int = 0

    def update(self, now: float, delivered: int, processed: int, skipped: int) -> None:
        dt = now - self._t0
        if dt < 1.0:
            return
        self.camera_fps = (delivered - self._delivered0) / dt
        self.process_fps = (processed - self._processed0) / dt
        self.skipped_fps = max(0, skipped - self._skipped0) / dt
        self._t0, self._delivered0, self._processed0, self._skipped0 = now, delivered, processed, skipped


class VisionPipeline:
    """Models, tracker and per-frame analysis; no I/O, so tests and benchmarks can drive it."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        models_dir = Path(cfg.models_dir)
        manifest = verify_models(models_dir)
        cache = Path(cfg.path("{data_dir}")) / "trt-cache"
        v = cfg.vision
        det = create_session(model_path(models_dir, DETECTOR_MODEL), v.providers, v.intra_op_threads,
                             v.precision, cache)
        emo = create_session(model_path(models_dir, EMOTION_MODEL), v.providers, v.intra_op_threads,
                             v.precision, cache)
        self.detector = BlazeFaceDetector(det, min_score=v.min_face_score, max_faces=v.max_faces)
        self.classifier = EmotionClassifier(emo)
        self.detect_interval = v.detect_interval
        self.smoothing = v.smoothing
        self.model_version = f"{manifest.entry(DETECTOR_MODEL).tag}+{manifest.entry(EMOTION_MODEL).tag}"
        self.tracker = IoUTracker(smoothing=v.smoothing)
        self.detector_ms = 0.0
        self._n = 0

    def reset(self) -> None:
        """Forget every track (consent revoked, camera closed)."""
        self.tracker = IoUTracker(smoothing=self.smoothing)
        self._n = 0

    def analyse(self, image: np.ndarray) -> tuple[list, int]:
        """Tracks after this frame, and how many faces the detector saw (-1 if it did not run)."""
        run_detector = self._n % self.detect_interval == 0
        self._n += 1
        if not run_detector:
            return self.tracker.coast(), -1
        t0 = time.perf_counter()
        dets = self.detector.detect(image)
        self.detector_ms = (time.perf_counter() - t0) * 1e3
        probs = self.classifier.classify(crop_faces(image, dets)) if dets else np.zeros((0, 7), np.float32)
        return self.tracker.update(dets, probs), len(dets)

    def affect_sample(self, tracks: list, frame_shape: tuple[int, ...], session_id: str,
                      capture_ns: int) -> vision_pb2.AffectSample:
        sample = vision_pb2.AffectSample(session_id=session_id, capture_ns=capture_ns,
                                         inference_ns=time.monotonic_ns(), model_version=self.model_version)
        live = [t for t in tracks if t.confirmed]
        sample.faces_seen = len(live)
        if not live:
            return sample
        probs = np.stack([t.probs for t in live]).astype(np.float32)
        val, aro = valence_arousal(probs)
        eng = np.array([engagement(t.detection, frame_shape) for t in live], dtype=np.float32)
        for t, p, v_, a_, e_ in zip(live, probs, val, aro, eng):
            sample.faces.add(track_id=t.track_id, probs=p.tolist(), valence=float(v_), arousal=float(a_),
                             engagement=float(e_))
        w = eng + 1e-3
        group = (probs * w[:, None]).sum(0) / w.sum()
        g_val, g_aro = valence_arousal(group[None, :])
        sample.probs.extend(group.tolist())
        sample.valence, sample.arousal = float(g_val[0]), float(g_aro[0])
        sample.engagement = float(eng.max())
        return sample


class VisionProcess:
    """Consent gate + capture loop + publishing."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.pipeline = VisionPipeline(cfg)
        self.pub = LatestPublisher(cfg.path(cfg.bus.affect_endpoint), bind=True)
        self.ctrl = LatestSubscriber(cfg.path(cfg.bus.control_endpoint), bind=False)
        self.source: FrameSource | None = None
        self.sessions: list[str] = []
        self.ctrl_heard = 0.0
        self.camera_opens = 0
        self.frames = 0
        self.frames_with_face = 0
        self.rates = Rates(_t0=time.monotonic())
        self.last_status = 0.0
        self.error = ""

    # -- consent gate ---------------------------------------------------------------------------
    def _poll_control(self, timeout_ms: int) -> None:
        payload = self.ctrl.recv(timeout_ms)
        now = time.monotonic()
        if payload is not None:
            try:
                msg = vision_pb2.VisionControl.FromString(payload)
                self.sessions = sorted(s.session_id for s in msg.sessions)
                self.ctrl_heard = now
            except Exception:  # noqa: BLE001 - garbled control means no consent
                self.sessions = []
        if now - self.ctrl_heard > self.cfg.bus.control_timeout_s:
            self.sessions = []

    def _camera_allowed(self) -> bool:
        return bool(self.sessions)

    def _open(self) -> None:
        self.source = make_source(self.cfg.capture)
        self.source.open()
        self.camera_opens += 1
        log.info("camera opened (%s)", self.source.name)

    def _close(self, why: str) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
            log.info("camera closed: %s", why)
        self.pipeline.reset()

    # -- loop -----------------------------------------------------------------------------------
    def step(self) -> None:
        """One iteration: obey consent, analyse the newest frame if any, publish."""
        open_ = self.source is not None
        self._poll_control(0 if open_ else 50)
        allowed = self._camera_allowed()
        if allowed and not open_:
            self._open()
        elif not allowed and open_:
            self._close("no consented session")
            self._publish(None)
        if self.source is None:
            if time.monotonic() - self.last_status >= STATUS_PERIOD_S:
                self._publish(None)
            return
        frame = self.source.read(timeout_s=0.05)
        if frame is None:
            if time.monotonic() - self.last_status >= STATUS_PERIOD_S:
                self._publish(None)
            return
        tracks, seen = self.pipeline.analyse(frame.image)
        self.frames += 1
        if seen > 0 or (seen < 0 and any(t.confirmed for t in tracks)):
            self.frames_with_face += 1
        sample = self.pipeline.affect_sample(tracks, frame.image.shape, self.sessions[0], frame.capture_ns)
        self._publish(sample)

    def _publish(self, sample: vision_pb2.AffectSample | None) -> None:
        now = time.monotonic()
        stats = self.source.stats if self.source is not None else None
        if stats is not None:
            self.rates.update(now, stats.frames_delivered, self.frames, stats.frames_skipped)
        self.rates.detector_ms = self.pipeline.detector_ms
        status = vision_pb2.VisionStatus(
            camera_open=self.source is not None and bool(getattr(self.source, "online", self.source.is_open)),
            camera_opens=self.camera_opens,
            camera_fps=self.rates.camera_fps, process_fps=self.rates.process_fps,
            skipped_fps=self.rates.skipped_fps, detector_ms=self.rates.detector_ms, frames=self.frames,
            frames_with_face=self.frames_with_face, source=self.source.name if self.source else "",
            error=self.error, sent_ns=time.monotonic_ns(), reconnects=stats.reconnects if stats else 0)
        update = vision_pb2.VisionUpdate(status=status)
        if sample is not None:
            update.affect.CopyFrom(sample)
        self.pub.publish(update.SerializeToString())
        self.last_status = now

    def run(self, stop: threading.Event) -> None:
        log.info("vision ready (models %s)", self.pipeline.model_version)
        while not stop.is_set():
            self.step()
        self._close("shutting down")
        self.pub.close()
        self.ctrl.close()


def run_vision(cfg: ApplianceConfig) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    VisionProcess(cfg).run(stop)
    return 0
