"""Disk full: a clear status to the client, health says so, nothing corrupt, and it recovers by itself.

Two ways to run out of space, both real: a small tmpfs mounted for the test (when this user may mount;
ENOSPC), and a ranker child process whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes its
writes fail with EFBIG. "Space returns" is a filler file deleted, or the limit raised with prlimit.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from appliance.client import ApplianceClient
from appliance.serving.process import RankerProcess
from appliance.store import Store
from appliance.v1 import events_pb2

BROWSE = events_pb2.EVENT_TYPE_BROWSE
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _health(c: ApplianceClient, service: str) -> int:
    return c.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def _wait(pred, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _exercise(c: ApplianceClient, items: list[int], free_space, db_path: str) -> None:  # noqa: ANN001
    """Fill the disk through the API, check the failure mode, give space back, check recovery and data."""
    sid = c.start_session("full")
    rng = np.random.default_rng(0)
    acked: dict[int, int] = {}
    error = None
    for _ in range(3000):
        batch = [int(x) for x in rng.choice(items, 2000)]
        try:
            ack = c.send_events(sid, [(BROWSE, i) for i in batch])
        except grpc.RpcError as exc:
            error = exc
            break
        first = ack.durable_seq - ack.accepted + 1
        acked.update({first + k: i for k, i in enumerate(batch)})
    assert error is not None, "the disk never filled up"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "disk full or unwritable" in error.details() and "nothing was written" in error.details()
    for _ in range(3):  # it keeps saying so for a batch that size (a tiny one may still fit), and stays up
        with pytest.raises(grpc.RpcError) as again:
            c.send_events(sid, [(BROWSE, i) for i in batch])
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(c.rank(sid, k=5).items) == 5  # ranking goes on from memory
    _wait(lambda: _health(c, "appliance.v1.Events") == NOT_SERVING)
    assert _health(c, "appliance.v1.Ranker") == SERVING
    free_space()
    _wait(lambda: _health(c, "appliance.v1.Events") == SERVING)  # by itself: the watch probes with a write
    ack = c.send_events(sid, [(BROWSE, items[1])] * 10)
    acked.update({ack.durable_seq - 9 + k: items[1] for k in range(10)})
    assert c.explain("full").events_stored == len(acked)


def _check_store(db_path: str, expected: int) -> None:
    s = Store(db_path)  # integrity check at open
    assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert s.event_stats("full")[0] == expected
    s.close()


def test_disk_full_on_a_small_filesystem(cfg, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the RLIMIT_FSIZE test covers it")
    proc = None
    try:
        proc = RankerProcess(cfg.with_overrides(data_dir=str(mnt), serving={"health_period_s": 0.1,
                                                                            "client_events_per_s": 0}))
        st = os.statvfs(mnt)
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 2_500_000))
        c = ApplianceClient(f"unix:{proc.servers.unix_socket}")
        items = proc.core.catalog.ids[:500].tolist()
        _exercise(c, items, lambda: filler.unlink(), proc.store.path)
        expected = c.explain("full").events_stored
        c.close()
        proc.stop()
        proc = None
        _check_store(str(mnt / "appliance.db"), expected)
    finally:
        if proc is not None:
            proc.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _limit_file_size(limit: int):  # noqa: ANN202
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


def test_disk_full_by_file_size_limit(cfg, tmp_path):
    cfg = cfg.with_overrides(serving={"health_period_s": 0.1, "client_events_per_s": 0})
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(cfg.model_dump_json())
    db_path = cfg.path(cfg.store.db_path)
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "worker", "ranker", "--config-json", str(cfg_path)],
                            stderr=subprocess.DEVNULL, preexec_fn=_limit_file_size(6 << 20))
    try:
        c = ApplianceClient(f"unix:{cfg.path(cfg.serving.unix_socket)}")
        c.wait_ready(60)
        items = json.loads(json.dumps([it.item_id for it in c.rank(c.start_session("probe"), k=100).items]))

        def raise_limit() -> None:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        _exercise(c, items, raise_limit, db_path)
        expected = c.explain("full").events_stored
        c.close()
        assert proc.poll() is None, "the ranker died"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    _check_store(db_path, expected)
    assert Path(db_path).stat().st_size > 6 << 20 or Path(db_path + "-wal").exists()
