"""The vision process: consent-gated capture -> detect -> classify -> track -> AffectSample on the bus.

The capture device is opened only while the ranker says a consented session is open, and closed
(with its affect state dropped) as soon as that ends or the ranker goes silent (fail closed).
Latest frame wins everywhere: the source keeps one frame, the bus keeps one message.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.bus import LatestPublisher, LatestSubscriber
from appliance.capture import FrameSource, make_source
from appliance.config import ApplianceConfig
from appliance.errors import ModelError
from appliance.models.manifest import model_path, verify_models
from appliance.ops.stop_signal import StopSignal
from appliance.v1 import vision_pb2
from appliance.vision.affect_map import engagement, valence_arousal
from appliance.vision.detector import BlazeFaceDetector
from appliance.vision.emotion import DEFAULT_EMOTION_MODEL, EmotionClassifier, crop_faces
from appliance.vision.metrics import VisionMetrics
from appliance.vision.runtime import resolve_providers
from appliance.vision.tracker import IoUTracker
from appliance.vision.trt_engine import create_vision_session

log = logging.getLogger("appliance.vision")

STATUS_PERIOD_S = 0.2
DETECTOR_MODEL = "blazeface_short_range"
EMOTION_MODEL = DEFAULT_EMOTION_MODEL  # unless `vision.emotion_model` names another manifest entry
_NO_PROBS = np.zeros((0, 7), np.float32)


def emotion_model_name(cfg: ApplianceConfig) -> str:
    """The manifest entry of the emotion model to run: `vision.emotion_model` if the config has it."""
    return getattr(cfg.vision, "emotion_model", None) or EMOTION_MODEL


def runs_on_gpu(v) -> bool:  # noqa: ANN001 - the config's vision section
    """Whether the vision models will run on a GPU here: native TensorRT that loads, or an ONNX Runtime
    GPU provider this build has, first in the configured chain."""
    if v.runtime == "tensorrt":
        try:
            from appliance.vision.trt_engine import _trt

            _trt()
            return True
        except Exception:  # noqa: BLE001 - ModelError: no TensorRT here; ONNX Runtime's chain decides
            pass
    return resolve_providers(v.providers)[0] != "CPUExecutionProvider"


@dataclass
class Rates:
    """Frigate-style per-camera figures over a sliding second."""

    camera_fps: float = 0.0
    process_fps: float = 0.0
    skipped_fps: float = 0.0
    detection_fps: float = 0.0
    detector_ms: float = 0.0  # mean per detector run over the last window
    _t0: float = 0.0
    _delivered0: int = 0
    _processed0: int = 0
    _skipped0: int = 0
    _detections0: int = 0
    _detector_ms_sum: float = 0.0

    def add_detection(self, ms: float) -> None:
        self._detector_ms_sum += ms

    def update(self, now: float, delivered: int, processed: int, skipped: int, detections: int = 0) -> bool:
        """Recompute the rates once a second has passed; True when it did."""
        dt = now - self._t0
        if dt < 1.0:
            return False
        self.camera_fps = max(0, delivered - self._delivered0) / dt
        self.process_fps = max(0, processed - self._processed0) / dt
        self.skipped_fps = max(0, skipped - self._skipped0) / dt
        runs = max(0, detections - self._detections0)
        self.detection_fps = runs / dt
        if runs:
            self.detector_ms = self._detector_ms_sum / runs
        self._detector_ms_sum = 0.0
        self._t0, self._delivered0, self._processed0, self._skipped0 = now, delivered, processed, skipped
        self._detections0 = detections
        return True

    def restart(self, now: float, delivered: int = 0, skipped: int = 0) -> None:
        """A new source starts its counters at 0: take new baselines, keep the processed count."""
        self._t0, self._delivered0, self._skipped0 = now, delivered, skipped


class VisionPipeline:
    """Models, tracker and per-frame analysis; no I/O, so tests and benchmarks can drive it."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        models_dir = Path(cfg.models_dir)
        manifest = verify_models(models_dir)
        v = cfg.vision
        cache = Path(cfg.path(getattr(v, "engine_cache", "{data_dir}/trt-cache")))
        calib = getattr(v, "calibration_dir", None)
        calib_dir = Path(cfg.path(calib)) if calib else None
        self.emotion_model = emotion_model_name(cfg)
        entry = manifest.entry(self.emotion_model)
        if entry.task != "emotion":
            raise ModelError(f"vision.emotion_model {self.emotion_model!r} is not an emotion model")
        if entry.source.package == "own-quantization" and runs_on_gpu(v):
            # A QDQ build is for ONNX Runtime's CPU integer kernels; a GPU runs the FP32 network (TensorRT
            # makes its own INT8 from a calibration set), so it is not quantised twice.
            log.info("vision: %s is an INT8 build for CPUs; running its FP32 base %s on the GPU",
                     self.emotion_model, entry.source.base_model)
            self.emotion_model = entry.source.base_model
        # vision.runtime picks native TensorRT or ONNX Runtime (the default; also the fallback everywhere)
        det = create_vision_session(model_path(models_dir, DETECTOR_MODEL), DETECTOR_MODEL, v, cache, calib_dir,
                                    max_batch=1)
        emo = create_vision_session(model_path(models_dir, self.emotion_model), self.emotion_model, v, cache,
                                    calib_dir, max_batch=v.max_faces)
        self.detector = BlazeFaceDetector(det, min_score=v.min_face_score, max_faces=v.max_faces,
                                          fit_rows=v.detector_rows == "fit")
        self.classifier = EmotionClassifier(emo)
        self.detect_interval = v.detect_interval
        self.smoothing = v.smoothing
        self.model_version = f"{manifest.entry(DETECTOR_MODEL).tag}+{manifest.entry(self.emotion_model).tag}"
        self.tracker = IoUTracker(smoothing=v.smoothing)
        self.detector_ms = 0.0
        self.detections = 0  # detector runs (Frigate's detection fps)
        self.stage_ms: dict[str, float] = {"detect": 0.0, "classify": 0.0, "track": 0.0}
        self._n = 0

    def reset(self) -> None:
        """Forget every track (consent revoked, camera closed)."""
        self.tracker = IoUTracker(smoothing=self.smoothing)
        self._n = 0

    def analyse(self, image: np.ndarray) -> tuple[list, int]:
        """Tracks after this frame, and how many faces the detector saw (-1 if it did not run).

        `stage_ms` holds this frame's detect / classify / track times (0 for a stage that did not run).
        """
        run_detector = self._n % self.detect_interval == 0
        self._n += 1
        t0 = time.perf_counter()
        if not run_detector:
            tracks = self.tracker.coast()
            self.stage_ms = {"detect": 0.0, "classify": 0.0, "track": (time.perf_counter() - t0) * 1e3}
            return tracks, -1
        dets = self.detector.detect(image)
        t1 = time.perf_counter()
        probs = self.classifier.classify(crop_faces(image, dets, self.classifier.size)) if dets else _NO_PROBS
        t2 = time.perf_counter()
        tracks = self.tracker.update(dets, probs)
        t3 = time.perf_counter()
        self.detector_ms = (t1 - t0) * 1e3
        self.detections += 1
        self.stage_ms = {"detect": self.detector_ms, "classify": (t2 - t1) * 1e3, "track": (t3 - t2) * 1e3}
        return tracks, len(dets)

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
    """Consent gate + capture loop + publishing, with Prometheus figures and the governor's limits."""

    #: longest a step waits for a frame: bounds how late a consent revocation is seen while capturing
    frame_wait_s: float = 0.02

    def __init__(self, cfg: ApplianceConfig, serve_metrics: bool | None = None) -> None:
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
        self.max_fps: float | None = None  # the governor's frame-rate cap (None = as fast as frames come)
        self._next_frame_due = 0.0
        self._detections_seen = 0
        self.metrics = VisionMetrics()
        self.metrics.detect_interval.set(self.pipeline.detect_interval)
        if serve_metrics is None:
            serve_metrics = cfg.metrics.enabled
        if serve_metrics:
            try:
                self.metrics.serve(cfg.metrics.host, cfg.metrics.vision_port)
            except OSError as exc:  # a taken port costs the figures, never the camera pipeline
                log.error("vision metrics endpoint %s:%d not started: %s", cfg.metrics.host,
                          cfg.metrics.vision_port, exc)
        self.governor = None
        self._governor_due = 0.0
        self._readings = None
        gov_cfg = getattr(cfg, "governor", None)
        if gov_cfg is not None and gov_cfg.enabled:
            from appliance.ops.governor import Governor, SystemReadings

            self._readings = SystemReadings(gov_cfg.sysfs_root)
            self.governor = Governor(gov_cfg, cfg.capture.fps, cfg.vision.detect_interval, cfg.vision.precision,
                                     on_change=self.apply_governor)

    # -- governor -------------------------------------------------------------------------------
    def apply_governor(self, decision) -> None:  # noqa: ANN001 - appliance.ops.governor.Decision
        """Detect every N frames and cap the frame rate as the governor asks (precision needs a reload)."""
        self.set_detect_interval(decision.detect_interval)
        self.max_fps = decision.fps if decision.fps < self.cfg.capture.fps else None
        if decision.precision != self.cfg.vision.precision:
            log.info("governor asks for %s precision; that needs new inference sessions, kept %s until restart",
                     decision.precision, self.cfg.vision.precision)

    def set_detect_interval(self, n: int) -> None:
        self.pipeline.detect_interval = max(1, int(n))
        self.metrics.detect_interval.set(self.pipeline.detect_interval)

    def _govern(self, now: float) -> None:
        if self.governor is None or now < self._governor_due:
            return
        self._governor_due = now + self.cfg.governor.period_s
        try:
            self.governor.step(self._readings.read())
        except Exception:  # noqa: BLE001 - a sensor problem must not stop vision
            log.exception("governor step failed")

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
        self.metrics.consented_sessions.set(len(self.sessions))

    def _camera_allowed(self) -> bool:
        return bool(self.sessions)

    def _open(self) -> None:
        self.source = make_source(self.cfg.capture)
        self.source.open()
        self.camera_opens += 1
        self.metrics.new_source()
        self.metrics.camera_open.set(1)
        self.rates.restart(time.monotonic())
        log.info("camera opened (%s)", self.source.name)

    def _close(self, why: str) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
            log.info("camera closed: %s", why)
        self.metrics.camera_open.set(0)
        self.metrics.camera_online.set(0)
        self.metrics.faces.set(0)
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
        now = time.monotonic()
        self._govern(now)
        if self.source is None:
            if now - self.last_status >= STATUS_PERIOD_S:
                self._publish(None)
            return
        if self.max_fps is not None and now < self._next_frame_due:
            # the governor caps the rate: frames arriving meanwhile are overwritten (counted as skipped)
            time.sleep(min(self.frame_wait_s, self._next_frame_due - now))
            if time.monotonic() - self.last_status >= STATUS_PERIOD_S:
                self._publish(None)
            return
        frame = self.source.read(timeout_s=self.frame_wait_s)
        if frame is None:
            if time.monotonic() - self.last_status >= STATUS_PERIOD_S:
                self._publish(None)
            return
        self._poll_control(0)  # a revocation that came while we waited for the frame wins over the frame
        if not self._camera_allowed():
            self._close("no consented session")
            self._publish(None)
            return
        t0 = time.perf_counter()
        if self.max_fps is not None:
            self._next_frame_due = time.monotonic() + 1.0 / self.max_fps
        tracks, seen = self.pipeline.analyse(frame.image)
        self.frames += 1
        if seen >= 0:
            self.rates.add_detection(self.pipeline.detector_ms)
        if seen > 0 or (seen < 0 and any(t.confirmed for t in tracks)):
            self.frames_with_face += 1
        sample = self.pipeline.affect_sample(tracks, frame.image.shape, self.sessions[0], frame.capture_ns)
        self._publish(sample)
        self.metrics.frames.inc()
        self.metrics.faces.set(sample.faces_seen)
        self.metrics.frame_seconds.observe(time.perf_counter() - t0)

    def _publish(self, sample: vision_pb2.AffectSample | None) -> None:
        now = time.monotonic()
        src = self.source
        stats = src.stats if src is not None else None
        online = src is not None and bool(getattr(src, "online", src.is_open))
        if stats is not None:
            if self.rates.update(now, stats.frames_delivered, self.frames, stats.frames_skipped,
                                 self.pipeline.detections):
                m = self.metrics
                m.camera_fps.set(self.rates.camera_fps)
                m.process_fps.set(self.rates.process_fps)
                m.skipped_fps.set(self.rates.skipped_fps)
                m.detection_fps.set(self.rates.detection_fps)
                m.detector_inference.set(self.rates.detector_ms / 1e3)
            self.metrics.source_counters(stats.reconnects, stats.stalls, stats.frozen)
        self.metrics.camera_online.set(1 if online else 0)
        status = vision_pb2.VisionStatus(
            camera_open=online, camera_opens=self.camera_opens,
            camera_fps=self.rates.camera_fps, process_fps=self.rates.process_fps,
            skipped_fps=self.rates.skipped_fps, detector_ms=self.rates.detector_ms, frames=self.frames,
            frames_with_face=self.frames_with_face, source=src.name if src else "",
            error=self.error or (getattr(src, "last_error", None) or "" if src is not None and not online else ""),
            sent_ns=time.monotonic_ns(), reconnects=stats.reconnects if stats else 0)
        update = vision_pb2.VisionUpdate(status=status)
        if sample is not None:
            update.affect.CopyFrom(sample)
        self.pub.publish(update.SerializeToString())
        self.last_status = now

    def close(self) -> None:
        """Release the camera, the sockets and the metrics endpoint."""
        self._close("shutting down")
        self.pub.close()
        self.ctrl.close()
        self.metrics.close()

    def run(self, stop: threading.Event | StopSignal) -> None:
        log.info("vision ready (models %s)", self.pipeline.model_version)
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()


def run_vision(cfg: ApplianceConfig) -> int:
    stop = StopSignal()
    VisionProcess(cfg).run(stop)
    return 0
