"""`python -m bench ingest --json OUT`: acknowledged-durable events/s into the ranker process.

The ranker runs as its own process (`appliance worker ranker`); clients are processes with a few threads
each (one gRPC channel per process), every thread a blocking loop of `Events.IngestBatch` calls on its own
session. An event counts only once its call returned OK: the ack is sent after the group commit's fsync
and after the events were applied to the in-memory state (visible to the next Rank). At the end the
benchmark reads the store and checks that it holds at least every acknowledged event.

Two runs: packed columnar batches (`--batch` events per call, default 10,000) and single-event calls (the
per-RPC rate). Events follow a player-like mix (mostly browse and dwell, some plays, few likes, skips,
dislikes) over random catalog titles. RESOURCE_EXHAUSTED answers (back-pressure) are counted and their
`retry-after-ms` is honoured. The per-client rate limit is off for this run (it is a per-client guard;
the benchmark measures the box).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import RankerWorker, machine, percentiles, write_results
from bench.rank import CDF_POINTS, line_plot

REPO = Path(__file__).resolve().parents[1]
# appliance.v1.EventType: PLAY PAUSE SEEK SKIP LIKE DISLIKE COMPLETE DWELL BROWSE
MIX = {1: 0.08, 2: 0.04, 3: 0.03, 4: 0.03, 5: 0.01, 6: 0.005, 7: 0.005, 8: 0.30, 9: 0.50}


def _batches(ids: np.ndarray, session: str, size: int, count: int, seed: int) -> list[bytes]:
    from appliance.v1 import events_pb2

    rng = np.random.default_rng(seed)
    kinds, p = np.array(list(MIX)), np.array(list(MIX.values()))
    out = []
    t = 1_700_000_000_000
    for _ in range(count):
        types = rng.choice(kinds, size=size, p=p / p.sum())
        vals = np.where(types == 8, rng.uniform(0, 120, size=size), 0.0).astype(np.float32)
        times = t + np.cumsum(rng.integers(0, 3000, size=size))
        t = int(times[-1])
        out.append(events_pb2.EventBatch(session_id=session, types=types.tolist(),
                                         item_ids=rng.choice(ids, size=size).tolist(),
                                         client_time_ms=times.tolist(), values=vals.tolist()).SerializeToString())
    return out


def _client(sock: str, sessions: list[str], ids: np.ndarray, batch: int, threads: int, seconds: float,
            seed: int, start: Any, out: Any) -> None:
    import grpc

    from appliance.v1 import events_pb2

    channel = grpc.insecure_channel(f"unix:{sock}", options=[("grpc.max_send_message_length", 64 << 20)])
    call = channel.unary_unary("/appliance.v1.Events/IngestBatch", request_serializer=None,
                               response_deserializer=events_pb2.IngestAck.FromString)
    payloads = [_batches(ids, sessions[j], batch, 4 if batch > 1 else 64, seed * 100 + j) for j in range(threads)]
    stats = [{"acked": 0, "calls": 0, "exhausted": 0, "errors": 0, "lat": []} for _ in range(threads)]
    call(payloads[0][0], timeout=30)  # warm the channel (these events are not counted)
    stop_at = [0.0]

    def loop(j: int) -> None:
        st, mine = stats[j], payloads[j]
        k = 0
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                ack, c = call.with_call(mine[k % len(mine)], timeout=30)
                st["lat"].append((time.perf_counter() - t0) * 1e3)
                st["acked"] += ack.accepted
                st["calls"] += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    st["exhausted"] += 1
                    hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms", "10")
                    time.sleep(min(float(hint), 1000.0) / 1e3)
                else:
                    st["errors"] += 1
                    st.setdefault("codes", []).append(exc.code().name)
            k += 1

    start.wait()
    t_begin = time.perf_counter()
    stop_at[0] = t_begin + seconds
    workers = [threading.Thread(target=loop, args=(j,)) for j in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t_begin
    channel.close()
    out.put({"acked": sum(s["acked"] for s in stats), "calls": sum(s["calls"] for s in stats),
             "exhausted": sum(s["exhausted"] for s in stats), "errors": sum(s["errors"] for s in stats),
             "codes": sorted({c for s in stats for c in s.get("codes", [])}),
             "lat": [x for s in stats for x in s["lat"]], "elapsed_s": elapsed})


def _run(ctx: Any, sock: str, sessions: list[str], ids: np.ndarray, batch: int, procs: int, threads: int,
         seconds: float, server: psutil.Process) -> dict[str, Any]:
    start, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_client, args=(sock, sessions[i * threads:(i + 1) * threads], ids, batch, threads,
                                            seconds, 10 + i, start, out), daemon=True) for i in range(procs)]
    for p in ps:
        p.start()
    time.sleep(2.0 + 0.5 * procs)  # clients build their payloads and connect
    cpu0 = server.cpu_times()
    start.set()
    res = [out.get(timeout=seconds + 120) for _ in ps]
    cpu1 = server.cpu_times()
    for p in ps:
        p.join(timeout=30)
    elapsed = max(r["elapsed_s"] for r in res)
    acked = sum(r["acked"] for r in res)
    lat = np.concatenate([np.asarray(r["lat"], dtype=np.float64) for r in res])
    cdf = [round(float(np.percentile(lat, q)), 3) for q in CDF_POINTS] if lat.size else []
    return {"events_per_s": round(acked / elapsed, 1), "ack_latency_cdf_ms": cdf, "acked_events": acked, "calls": sum(r["calls"] for r in res),
            "calls_per_s": round(sum(r["calls"] for r in res) / elapsed, 1), "batch_events": batch,
            "client_processes": procs, "threads_per_process": threads, "seconds": round(elapsed, 2),
            "resource_exhausted": sum(r["exhausted"] for r in res), "errors": sum(r["errors"] for r in res),
            "error_codes": sorted({c for r in res for c in r["codes"]}), "ack_latency": percentiles(lat),
            "server_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench ingest", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="output JSON (default bench/results/ingest-cpu.json)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    ap.add_argument("--batch", type=int, default=10_000, help="events per IngestBatch call")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--threads", type=int, default=4, help="threads (calls in flight) per client process")
    ap.add_argument("--single-procs", type=int, default=2)
    ap.add_argument("--single-threads", type=int, default=8)
    args = ap.parse_args(argv)

    from appliance.client import ApplianceClient

    serving = {"client_events_per_s": 0, "max_message_bytes": 16 << 20, "max_batch_events": max(args.batch, 1)}
    with RankerWorker("ingest", serving) as w:
        cfg, sock, server, ids, db_path = w.cfg, w.sock, w.server, w.ids, w.db_path
        client = ApplianceClient(f"unix:{sock}")
        n_sessions = max(args.procs * args.threads, args.single_procs * args.single_threads)
        sessions = [client.start_session(f"bench{i % 4}") for i in range(n_sessions)]
        rss_start = server.memory_info().rss / 2**20
        ctx = mp.get_context("spawn")
        print(f"ingest: batches of {args.batch}, {args.procs} x {args.threads} clients, {args.seconds:.0f} s ...",
              flush=True)
        batched = _run(ctx, sock, sessions, ids, args.batch, args.procs, args.threads, args.seconds, server)
        print(f"ingest: single events, {args.single_procs} x {args.single_threads} clients ...", flush=True)
        single = _run(ctx, sock, sessions, ids, 1, args.single_procs, args.single_threads, args.seconds, server)
        rss_end = server.memory_info().rss / 2**20
        t0 = time.perf_counter()
        sid = sessions[0]
        client.send_events(sid, [(5, int(ids[0]))])
        visible_ms = (time.perf_counter() - t0) * 1e3
        client.close()
        w.stop()  # a clean shutdown, then count what the database holds
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        stored = int(db.execute("SELECT COALESCE(SUM(n), 0) FROM event_batches").fetchone()[0])
        db_mb = os.path.getsize(db_path) / 2**20
        db.close()
        server_log = w.log_tail[-2000:]
    acked_total = batched["acked_events"] + single["acked_events"]
    result: dict[str, Any] = {
        "benchmark": "ingest", "machine": machine(),
        "config": {"transport": "unix socket", "clients_are": "processes x threads (one channel per process)",
                   "event_mix": {str(k): v for k, v in MIX.items()}, "durability": "WAL, synchronous=FULL "
                   "(fsync per group commit); ack after commit and after the in-memory apply",
                   "client_rate_limit": "off for this run", "ingest_queue_events": cfg.serving.ingest_queue_events,
                   "ingest_group_events": cfg.serving.ingest_group_events},
        "ingest": batched, "single_event": single,
        "store_check": {"acked_events": acked_total, "stored_events": stored,
                        "ok": stored >= acked_total, "db_mb": round(db_mb, 1)},
        "one_event_ack_ms_after_run": round(visible_ms, 3),
        "server_rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
    }
    if batched["errors"] or single["errors"]:
        result["server_log_tail"] = server_log
    b, s = batched, single
    md = "\n".join([
        f"# Ingest into the ranker process ({result['machine']['host_cpu']}, {result['machine']['cores']} cores)", "",
        "Acknowledged = durable (fsync'd group commit) and applied to the in-memory state. Unix socket, "
        "client processes x threads.", "",
        "| run | events/s acked | calls/s | ack p50 ms | ack p99 ms | RESOURCE_EXHAUSTED | errors | server CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| batches of {b['batch_events']} ({b['client_processes']}x{b['threads_per_process']}) | "
        f"{b['events_per_s']:,.0f} | {b['calls_per_s']:,.1f} | {b['ack_latency'].get('p50_ms', 0):.2f} | "
        f"{b['ack_latency'].get('p99_ms', 0):.2f} | {b['resource_exhausted']} | {b['errors']} | {b['server_cpu_s']} |",
        f"| single events ({s['client_processes']}x{s['threads_per_process']}) | {s['events_per_s']:,.0f} | "
        f"{s['calls_per_s']:,.1f} | {s['ack_latency'].get('p50_ms', 0):.2f} | {s['ack_latency'].get('p99_ms', 0):.2f} | "
        f"{s['resource_exhausted']} | {s['errors']} | {s['server_cpu_s']} |", "",
        f"Store check: {stored:,} events stored, {acked_total:,} acknowledged ({'ok' if stored >= acked_total else 'LOST'}); "
        f"database {db_mb:.0f} MB. Server RSS {rss_start:.0f} -> {rss_end:.0f} MB.", ""])
    out = write_results("ingest-cpu", result, md, args.json)
    line_plot(out.with_suffix(".png"), "Ingest: time to a durable ack", "ack latency ms (log)", "percentile",
              {f"batches of {b['batch_events']}": list(zip(b["ack_latency_cdf_ms"], CDF_POINTS)),
               "single events": list(zip(s["ack_latency_cdf_ms"], CDF_POINTS))}, logx=True)
    print(md)
    print(f"wrote {out}, {out.with_suffix('.png')}")
    print(json.dumps({"ingest.events_per_s": b["events_per_s"], "single_event.events_per_s": s["events_per_s"]}))
    return 0 if stored >= acked_total else 1
