"""Prometheus metrics of the ranker, gRPC health from the store, and logs that carry no personal data."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from appliance.client import ApplianceClient
from appliance.fusion import AffectState
from appliance.serving.process import RankerProcess
from appliance.v1 import events_pb2, ranker_pb2, status_pb2

BROWSE, LIKE = events_pb2.EVENT_TYPE_BROWSE, events_pb2.EVENT_TYPE_LIKE


def _scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(m: dict[str, list], name: str, **labels: str) -> float:
    for lab, v in m.get(name, []):
        if all(lab.get(k) == want for k, want in labels.items()):
            return v
    raise KeyError(f"{name} {labels}")


def test_metrics_endpoint(cfg):
    proc = RankerProcess(cfg.with_overrides(metrics={"enabled": True, "ranker_port": 0}))
    try:
        assert proc.metrics_port
        c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
        sid = c.start_session("metrics")
        items = c.rank(sid, k=5).items
        for _ in range(4):
            c.rank(sid, k=5)
        c.send_events(sid, [(BROWSE, it.item_id) for it in items])
        c.status.Ping(status_pb2.PingRequest())
        with pytest.raises(grpc.RpcError):
            c.ranker.Rank(ranker_pb2.RankRequest(session_id="nope", k=3))
        c.set_consent("metrics", True)
        v = proc.core.vision
        v.heard_ns, v.camera_open, v.camera_fps, v.process_fps, v.detector_ms = time.monotonic_ns(), True, 15.0, 14.5, 2.0
        proc.core.on_affect(AffectState(0.3, 0.2, 0.8, faces=1, capture_ns=time.monotonic_ns() - 200_000_000,
                                        received_ns=time.monotonic_ns()), sid)
        m = _scrape(proc.metrics_port)
        assert _value(m, "appliance_rpc_seconds_count", method="Ranker/Rank") == 6
        assert _value(m, "appliance_rpc_total", method="Ranker/Rank", code="OK") == 5
        assert _value(m, "appliance_rpc_total", method="Ranker/Rank", code="INVALID_ARGUMENT") == 1
        assert _value(m, "appliance_rpc_seconds_bucket", method="Status/Ping", le="+Inf") == 1
        assert _value(m, "appliance_events_ingested_total") == 5
        assert _value(m, "appliance_ingest_commits_total") >= 1
        assert _value(m, "appliance_ingest_queue_events") == 0
        assert _value(m, "appliance_ingest_rejected_total", reason="queue_full") == 0
        assert _value(m, "appliance_rank_cache_hits_total") >= 3
        # the state was derived at session start and before the events' ack, never by a Rank
        assert _value(m, "appliance_rank_state_derivations_total", where="prepared") == 2
        assert _value(m, "appliance_rank_state_derivations_total", where="rank") == 0
        assert 0.19 < _value(m, "appliance_affect_age_seconds") < 5
        assert _value(m, "appliance_vision_up") == 1 and _value(m, "appliance_vision_camera_fps") == 15.0
        assert _value(m, "appliance_vision_process_fps") == 14.5
        assert _value(m, "appliance_store_up") == 1 and _value(m, "appliance_store_writable") == 1
        assert _value(m, "appliance_store_bytes") > 0
        assert _value(m, "appliance_sessions_open") == 1
        assert _value(m, "process_resident_memory_bytes") > 10e6
        text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5).read().decode()
        assert "metrics" not in re.findall(r'"([^"]*)"', text)  # no profile id in any label
        c.close()
    finally:
        proc.stop()


def _health(c: ApplianceClient, service: str = "") -> int:
    return c.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def _wait(pred, timeout_s: float = 5.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met")


def test_health_is_not_serving_while_the_store_is_unavailable(cfg):
    import sqlite3

    proc = RankerProcess(cfg.with_overrides(serving={"health_period_s": 0.05}))
    SERVING, NOT = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
        sid = c.start_session("h")
        assert _health(c) == SERVING
        store = proc.store
        good = store._db
        with store._lock:
            store._db = sqlite3.connect(":memory:", check_same_thread=False)  # a store that has no tables
        _wait(lambda: _health(c) == NOT)
        assert _health(c, "appliance.v1.Ranker") == NOT and _health(c, "appliance.v1.Events") == NOT
        with store._lock:
            store._db.close()
            store._db = good
        _wait(lambda: _health(c) == SERVING)
        assert _health(c, "appliance.v1.Events") == SERVING
        assert len(c.rank(sid, k=3).items) == 3
        c.close()
    finally:
        proc.stop()


def test_logs_of_a_run_carry_no_personal_data(cfg, tmp_path):
    """Run the real ranker process, use every method with recognisable ids, scan what it logged."""
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(cfg.model_dump_json())
    log_path = tmp_path / "ranker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "worker", "ranker", "--config-json",
                                 str(cfg_path)], stderr=log, env={"APPLIANCE_LOG_LEVEL": "DEBUG",
                                                                  **__import__("os").environ})
    secrets: set[str] = set()
    try:
        c = ApplianceClient(f"unix:{cfg.path(cfg.serving.unix_socket)}")
        c.wait_ready(60)
        profile, other = "zelda_secret_4711", "link-private-0815"
        secrets |= {profile, other}
        sid, sid2 = c.start_session(profile), c.start_session(other)
        secrets |= {sid, sid2}
        c.set_consent(profile, True)
        ranked = c.rank(sid, k=20).items
        rng = np.random.default_rng(0)
        mine = [it.item_id for it in ranked]
        c.send_events(sid, [(LIKE, i) for i in mine[:5]] + [(BROWSE, int(i)) for i in rng.choice(mine, 30)])
        c.stream_events(sid2, [(BROWSE, mine[6])])
        c.rank(sid, k=20, candidate_ids=mine)
        c.explain(profile)
        for bad in (lambda: c.rank(sid, k=5, candidate_ids=[mine[0], 987654321]),
                    lambda: c.send_events(sid, [(99, mine[0])]), lambda: c.start_session("bad id!"),
                    lambda: c.ranker.Rank(ranker_pb2.RankRequest(session_id=sid, k=0))):
            with pytest.raises(grpc.RpcError):
                bad()
        c.forget(profile)
        c.end_session(sid2)
        c.close()
        titles = {it.title for it in ranked}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    assert lines, "the ranker logged nothing at all"
    words = set()
    for ln in lines:
        rec = json.loads(ln)  # every line is one JSON object
        text = " ".join(str(rec.get(k, "")) for k in ("msg", "exc"))
        for s in secrets | titles:
            assert s not in text, f"personal data in the log: {ln}"
        words |= set(re.findall(r"\d+", text))
    assert not (words & {str(i) for i in mine if i >= 1000}), "an item id in the log"  # (small ids: counts)
