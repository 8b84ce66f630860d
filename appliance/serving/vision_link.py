"""The ranker's side of the vision bus: consent out (control), affect and vision health in."""

from __future__ import annotations

import logging
import threading
import time

from appliance.bus import LatestPublisher, LatestSubscriber
from appliance.config import ApplianceConfig
from appliance.fusion import AffectState
from appliance.serving.core import ApplianceCore
from appliance.v1 import vision_pb2

log = logging.getLogger("appliance.ranker.vision_link")


class VisionLink:
    """Two daemon threads: publish who may be watched; take in the newest vision update."""

    def __init__(self, cfg: ApplianceConfig, core: ApplianceCore) -> None:
        self.cfg, self.core = cfg, core
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._control = LatestPublisher(cfg.path(cfg.bus.control_endpoint), bind=True)
        self._affect = LatestSubscriber(cfg.path(cfg.bus.affect_endpoint), bind=False)
        self._seq = 0
        self._threads = [threading.Thread(target=self._control_loop, name="vision-control", daemon=True),
                         threading.Thread(target=self._affect_loop, name="vision-affect", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def consent_changed(self) -> None:
        """Publish at once (revocation must reach the camera within 100 ms)."""
        self._wake.set()

    def _publish_control(self) -> None:
        self._seq += 1
        msg = vision_pb2.VisionControl(seq=self._seq, sent_ns=time.monotonic_ns())
        for sid, pid in self.core.consented_sessions():
            msg.sessions.add(session_id=sid, profile_id=pid)
        self._control.publish(msg.SerializeToString())

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            self._publish_control()
            self._wake.wait(self.cfg.bus.control_period_s)
            self._wake.clear()

    def _affect_loop(self) -> None:
        while not self._stop.is_set():
            payload = self._affect.recv(timeout_ms=100)
            if payload is None:
                continue
            try:
                update = vision_pb2.VisionUpdate.FromString(payload)
            except Exception:  # noqa: BLE001 - a garbled message is dropped, never fatal
                log.warning("dropped an undecodable vision message (%d bytes)", len(payload))
                continue
            now = time.monotonic_ns()
            st = update.status
            v = self.core.vision
            v.camera_open, v.camera_fps, v.process_fps = st.camera_open, st.camera_fps, st.process_fps
            v.detector_ms, v.frames, v.frames_with_face = st.detector_ms, st.frames, st.frames_with_face
            v.reconnects, v.heard_ns = st.reconnects, now
            if update.HasField("affect"):
                a = update.affect
                v.faces, v.model_version = a.faces_seen, a.model_version
                if a.faces_seen > 0:
                    self.core.on_affect(AffectState(
                        valence=a.valence, arousal=a.arousal, engagement=a.engagement, probs=tuple(a.probs),
                        faces=a.faces_seen, capture_ns=a.capture_ns, received_ns=now), a.session_id)
            else:
                v.faces = 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            if t.ident is not None:  # started
                t.join(timeout=1)
        self._control.close()
        self._affect.close()
