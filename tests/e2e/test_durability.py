"""kill -9 of the ranker while it ingests: every acknowledged event is there after restart.

Several clients at once, so acks come from group commits that carry many calls' batches (the ingest
path: one fsync per group), through both IngestBatch (packed columns) and the Ingest stream."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import grpc

from appliance.client import ApplianceClient
from appliance.config import default_config
from appliance.store import Store
from appliance.v1 import events_pb2

ROUNDS = 8


def test_acknowledged_events_survive_kill_9(run_dir, tmp_path):
    cfg = default_config().with_overrides(run_dir=str(run_dir), data_dir=str(tmp_path / "data"))
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(cfg.model_dump_json())
    sock = cfg.path(cfg.serving.unix_socket)
    rng = random.Random(1)
    acked: dict[int, int] = {}  # durable seq -> item id
    session = None
    lock = threading.Lock()
    twice: list[int] = []  # sequence numbers acknowledged for two different events (must stay empty)
    for _ in range(ROUNDS):
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "worker", "ranker", "--config-json",
                                 str(cfg_path)], stderr=subprocess.DEVNULL)
        client = ApplianceClient(f"unix:{sock}")
        client.wait_ready(30)
        if session is None:
            session = client.start_session("durable")
            items = [it.item_id for it in client.rank(session, k=50).items]
        stop = threading.Event()

        def pump(client: ApplianceClient, session: str, items: list[int], stop: threading.Event,
                 stream: bool) -> None:
            while not stop.is_set():
                batch = [rng.choice(items) for _ in range(rng.randint(1, 400 if not stream else 40))]
                rows = [(events_pb2.EVENT_TYPE_PLAY, i) for i in batch]
                try:
                    ack = client.stream_events(session, rows) if stream else client.send_events(session, rows)
                except grpc.RpcError:
                    return  # the server died mid-call: this batch was never acknowledged
                first = ack.durable_seq - ack.accepted + 1
                with lock:
                    for offset, item in enumerate(batch):
                        if acked.setdefault(first + offset, item) != item:
                            twice.append(first + offset)

        threads = [threading.Thread(target=pump, args=(client, session, items, stop, j == 0)) for j in range(5)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
        client.close()
    assert len(acked) > 1000
    assert not twice, f"sequence numbers acknowledged twice: {twice[:5]}"
    store = Store(cfg.path(cfg.store.db_path))  # opening runs the integrity check
    stored = {e.seq: e.item_id for e in store.iter_events("durable")}
    missing = [s for s in acked if s not in stored]
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert all(stored[s] == item for s, item in acked.items())
    n_stored = len(stored)
    store.close()
    # and the restarted ranker's state holds exactly what the store holds
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "worker", "ranker", "--config-json", str(cfg_path)],
                            stderr=subprocess.DEVNULL)
    try:
        client = ApplianceClient(f"unix:{sock}")
        client.wait_ready(30)
        assert client.explain("durable").events_stored == n_stored
        assert len(client.rank(session, k=5).items) == 5
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
