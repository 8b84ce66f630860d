"""JSON logs: a size-rotated file per process, configured from the firmware config, no personal data."""

from __future__ import annotations

import json
import logging

import pytest

from appliance.client import ApplianceClient
from appliance.config import default_config
from appliance.ops.logs import log_file, setup_logging
from appliance.serving.process import RankerProcess
from appliance.v1 import events_pb2

PII = ("profile-alice-7f3a", "2571", "5952")  # a profile id and two title ids the run below uses


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in saved:
            h.close()
    root.handlers[:] = saved
    root.setLevel(level)


def lines_of(files) -> list[dict]:
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]


def test_file_rotates_by_size_and_keeps_backup_count(tmp_path, restore_logging, monkeypatch):
    monkeypatch.delenv("APPLIANCE_LOG_LEVEL", raising=False)
    cfg = default_config().with_overrides(data_dir=str(tmp_path / "data"),
                                          logging={"max_bytes": 4096, "backup_count": 2, "stderr": False})
    setup_logging("ranker", cfg=cfg)
    path = log_file(cfg, "ranker")
    assert path == tmp_path / "data" / "log" / "ranker.log"
    log = logging.getLogger("appliance.test")
    for i in range(400):  # ~45 KB: far past 3 files of 4 KB
        log.info("tick %d: %d sessions open, queue %d events", i, i % 7, i * 3)
    log.debug("not at INFO")
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["ranker.log", "ranker.log.1", "ranker.log.2"]  # rotated, 2 kept
    assert all(f.stat().st_size <= 4096 for f in files)
    recs = lines_of([path.parent / "ranker.log.2", path.parent / "ranker.log.1", path])  # oldest first
    assert {"ts", "level", "proc", "pid", "logger", "msg"} <= set(recs[0])
    assert recs[-1]["msg"] == "tick 399: 0 sessions open, queue 1197 events" and recs[-1]["proc"] == "ranker"
    assert all(r["level"] == "info" for r in recs)
    ticks = [int(r["msg"].split()[1].rstrip(":")) for r in recs]
    assert ticks == list(range(ticks[0], 400)) and ticks[0] > 0     # the newest kept, nothing lost between


def test_a_real_ranker_run_logs_no_personal_data(tmp_path, run_dir, restore_logging, monkeypatch):
    monkeypatch.setenv("APPLIANCE_LOG_LEVEL", "DEBUG")
    cfg = default_config().with_overrides(run_dir=str(run_dir), data_dir=str(tmp_path / "data"),
                                          metrics={"ranker_port": 0},
                                          logging={"max_bytes": 4096, "backup_count": 50, "stderr": False})
    setup_logging("ranker", cfg=cfg)
    for attempt in range(2):  # the second start replays the stored events (state rebuilt: ... logged)
        proc = RankerProcess(cfg)
        client = ApplianceClient(f"unix:{proc.servers.unix_socket}")
        try:
            client.wait_ready(10)
            sid = client.start_session(PII[0])
            client.send_events(sid, [(events_pb2.EVENT_TYPE_PLAY, 2571), (events_pb2.EVENT_TYPE_LIKE, 5952)])
            client.rank(sid, k=5)
            client.set_consent(PII[0], True)
            for bad in (sid + "x", "no-such-session"):
                try:
                    client.rank(bad, k=5)
                except Exception:  # noqa: BLE001 - NOT_FOUND, expected
                    pass
            if attempt:
                client.forget(PII[0])
        finally:
            client.close()
            proc.stop()
    log = logging.getLogger("appliance.test")
    for i in range(200):  # push past the limit so rotated files are checked too
        log.info("filler %d", i)
    files = sorted(log_file(cfg, "ranker").parent.iterdir())
    assert len(files) > 2 and (tmp_path / "data" / "log" / "ranker.log.1").exists()
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    assert "state rebuilt" in text and "ranker serving" in text     # the run's own records are there
    for secret in (*PII, sid):
        assert secret not in text
