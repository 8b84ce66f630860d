"""The scripted player: a household starts watching, opts in to the camera, browses and reacts.

Runs in its own process and talks to the appliance only through gRPC over the Unix socket.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from appliance.client import ApplianceClient
from appliance.demo.view import LiveView
from appliance.v1 import events_pb2

PROFILE = "living-room"
RANK_PERIOD_S = 0.3
EVENT_PERIOD_S = 2.0


@dataclass
class DemoFigures:
    frames: int = 0
    frames_with_face: int = 0
    face_share: float = 0.0
    affect_samples_received: int = 0
    rank_calls: int = 0
    rank_ok: int = 0
    rank_p50_ms: float = 0.0
    rank_p99_ms: float = 0.0
    reasons_share: float = 0.0
    affect_used_share: float = 0.0
    events_acked: int = 0
    camera_fps: float = 0.0
    process_fps: float = 0.0
    last_mood: str = ""
    last_top5: list[dict] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def run_client(socket: str, duration_s: float, json_out: Path | None) -> int:
    client = ApplianceClient(f"unix:{socket}")
    client.wait_ready(60)
    figs = DemoFigures()
    rng = random.Random(7)
    latencies: list[float] = []
    items_total = items_with_reason = affect_used = 0
    sid = client.start_session(PROFILE)
    client.set_consent(PROFILE, True)
    view = LiveView(duration_s)
    t_end = time.monotonic() + duration_s
    next_event = time.monotonic() + 1.0
    last = None
    with view:
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            figs.rank_calls += 1
            try:
                last = client.rank(sid, k=5)
                figs.rank_ok += 1
            except grpc.RpcError as exc:
                figs.errors.append(f"Rank: {exc.code().name}: {exc.details()}")
                last = None
            latencies.append((time.perf_counter() - t0) * 1e3)
            if last is not None:
                items_total += len(last.items)
                items_with_reason += sum(1 for it in last.items if it.reasons)
                affect_used += int(last.affect_used)
            if time.monotonic() >= next_event and last is not None and last.items:
                # React to what is on screen: mostly play the top title, sometimes skip or like one.
                pick = rng.choice(last.items[:3]).item_id
                kind = rng.choice([events_pb2.EVENT_TYPE_PLAY, events_pb2.EVENT_TYPE_LIKE,
                                   events_pb2.EVENT_TYPE_SKIP, events_pb2.EVENT_TYPE_COMPLETE])
                ack = (client.send_events if figs.rank_calls % 2 else client.stream_events)(sid, [(kind, pick)])
                figs.events_acked += ack.accepted
                next_event = time.monotonic() + EVENT_PERIOD_S
            st = client.get_status()
            figs.frames, figs.frames_with_face = st.frames, st.frames_with_face
            figs.affect_samples_received = st.affect_samples_received
            figs.camera_fps, figs.process_fps = st.camera_fps, st.process_fps
            figs.versions = dict(st.versions)
            if last is not None:
                figs.last_mood = last.mood
            view.update(st, last, latencies)
            time.sleep(max(0.0, RANK_PERIOD_S - (time.perf_counter() - t0)))
    client.end_session(sid)
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    figs.rank_p50_ms = round(float(np.percentile(lat, 50)), 3)
    figs.rank_p99_ms = round(float(np.percentile(lat, 99)), 3)
    figs.reasons_share = round(items_with_reason / items_total, 4) if items_total else 0.0
    figs.affect_used_share = round(affect_used / max(1, figs.rank_ok), 4)
    figs.face_share = round(figs.frames_with_face / figs.frames, 4) if figs.frames else 0.0
    if last is not None:
        figs.last_top5 = [{"title": it.title, "score": round(it.score, 4),
                           "reasons": [r.text for r in it.reasons]} for it in last.items]
    client.close()
    summary = asdict(figs)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2))
    view.final(summary)
    ok = figs.rank_calls > 0 and figs.rank_ok == figs.rank_calls
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_client(sys.argv[1], float(sys.argv[2]), None))
