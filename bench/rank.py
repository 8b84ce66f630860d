"""`python -m bench rank --json OUT`: Rank latency over the Unix socket against the bare-gRPC floor.

The ranker runs as its own process (`appliance worker ranker`, exactly what the supervisor starts);
clients are separate processes (one gRPC channel each), so no client shares the server's GIL. Every
client alternates a `Status.Ping` (an empty call on the same server, same socket, same thread pool: the
floor) with a `Rank` of 1,000 candidates, so both see the same machine noise, and the ratio of the two is
what this benchmark reports.

Patterns: `fresh` draws a new random candidate set for every call (nothing can be reused between calls);
`repeat` re-ranks the same row again and again (a TV grid on focus changes). The headline keys
(`rank`, `floor`, `ratio_p99`) are the one-client `fresh` run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import RankerWorker, machine, percentiles, scrape_metrics, write_results

REPO = Path(__file__).resolve().parents[1]
CDF_POINTS = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 99, 99.5, 99.9]
COLORS = [(200, 80, 0), (0, 140, 255), (40, 160, 40), (180, 0, 180), (0, 0, 200), (120, 120, 0), (90, 90, 90)]


def line_plot(png: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
              logx: bool = False) -> None:
    """A small line chart with OpenCV (the runtime venv has no matplotlib, on purpose)."""
    import math

    import cv2

    w, h, left, right, top, bottom = 900, 520, 80, 230, 50, 60
    img = np.full((h, w, 3), 255, np.uint8)
    pts = [p for v in series.values() for p in v if p[0] > 0 or not logx]
    if not pts:
        return
    fx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    x0, x1 = min(fx(p[0]) for p in pts), max(fx(p[0]) for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    y0 = min(y0, 0.0)

    def xy(p: tuple[float, float]) -> tuple[int, int]:
        return (int(left + (fx(p[0]) - x0) / (x1 - x0) * (w - left - right)),
                int(h - bottom - (p[1] - y0) / (y1 - y0) * (h - top - bottom)))

    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    for k in range(5):
        xv = x0 + (x1 - x0) * k / 4
        yv = y0 + (y1 - y0) * k / 4
        xp, _ = xy((10**xv if logx else xv, y0))
        _, yp = xy((10**x0 if logx else x0, yv))
        cv2.putText(img, f"{10**xv if logx else xv:.3g}", (xp - 15, h - bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{yv:.3g}", (5, yp + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(img, (xp, top), (xp, h - bottom), (230, 230, 230), 1)
        cv2.line(img, (left, yp), (w - right, yp), (230, 230, 230), 1)
    for i, (name, v) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        p = [xy(q) for q in v if q[0] > 0 or not logx]
        for a, b in zip(p, p[1:]):
            cv2.line(img, a, b, c, 2, cv2.LINE_AA)
        cv2.putText(img, name, (w - right + 10, top + 20 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, c, 1, cv2.LINE_AA)
    cv2.putText(img, title, (left + 110, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (left + 200, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (5, top - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(png), img)


def _client(sock: str, session: str, ids: np.ndarray, calls: int, warmup: int, candidates: int, k: int,
            pattern: str, seed: int, start: Any, out: Any) -> None:
    """One player client process: `calls` (Ping, Rank) pairs, order alternating, timed with perf_counter."""
    import grpc

    from appliance.client import ApplianceClient
    from appliance.v1 import common_pb2, ranker_pb2, status_pb2

    rng = np.random.default_rng(seed)
    client = ApplianceClient(f"unix:{sock}")
    ping_req = status_pb2.PingRequest()
    fixed = rng.choice(ids, candidates, replace=False).tolist()

    def request() -> ranker_pb2.RankRequest:
        cands = fixed if pattern == "repeat" else rng.choice(ids, candidates, replace=False).tolist()
        ctx = common_pb2.Context(device=common_pb2.DEVICE_TYPE_TV, local_time_unix_ms=time.time_ns() // 1_000_000,
                                 utc_offset_minutes=60)
        return ranker_pb2.RankRequest(session_id=session, context=ctx, candidate_ids=cands, k=k)

    ping, rank = client.status.Ping, client.ranker.Rank
    pings = np.empty(calls)
    ranks = np.empty(calls)
    errors = 0
    for _ in range(warmup):
        ping(ping_req, timeout=10)
        rank(request(), timeout=10)
    start.wait()
    t_begin = time.perf_counter()
    for i in range(calls):
        req = request()  # built outside the timed region: the candidate draw is the benchmark's, not the API's
        try:
            if i & 1:
                t0 = time.perf_counter()
                ping(ping_req, timeout=10)
                t1 = time.perf_counter()
                rank(req, timeout=10)
                t2 = time.perf_counter()
                pings[i], ranks[i] = t1 - t0, t2 - t1
            else:
                t0 = time.perf_counter()
                rank(req, timeout=10)
                t1 = time.perf_counter()
                ping(ping_req, timeout=10)
                t2 = time.perf_counter()
                ranks[i], pings[i] = t1 - t0, t2 - t1
        except grpc.RpcError:
            errors += 1
            pings[i] = ranks[i] = np.nan
    elapsed = time.perf_counter() - t_begin
    client.close()
    out.put({"ping_ms": (pings * 1e3).tolist(), "rank_ms": (ranks * 1e3).tolist(), "errors": errors,
             "elapsed_s": elapsed})


def _handler_seconds(server: psutil.Process) -> dict[str, tuple[float, float]]:
    """The ranker's own handler time (sum, count) per method, from its Prometheus endpoint on loopback
    (appliance_rpc_seconds: measured inside the server, decode to encode); {} when it is not reachable."""
    out: dict[str, list[float]] = {}
    for key, value in scrape_metrics(server).items():
        for part, i in (("appliance_rpc_seconds_sum{", 0), ("appliance_rpc_seconds_count{", 1)):
            if key.startswith(part):
                method = key.split('method="', 1)[1].split('"', 1)[0]
                out.setdefault(method, [0.0, 0.0])[i] = value
    return {m: (v[0], v[1]) for m, v in out.items()}


def _run_level(ctx: Any, sock: str, session: str, ids: np.ndarray, clients: int, calls: int, args: Any,
               server: psutil.Process) -> dict[str, Any]:
    start = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(sock, session, ids, calls, args.warmup, args.candidates, args.k,
                                               args.pattern_now, 1000 + j, start, out), daemon=True)
             for j in range(clients)]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.2 * clients)  # let every client connect and warm up
    cpu0 = server.cpu_times()
    h0 = _handler_seconds(server)
    t0 = time.perf_counter()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    cpu1 = server.cpu_times()
    h1 = _handler_seconds(server)
    handler = {m: round((h1[m][0] - h0.get(m, (0.0, 0.0))[0]) / (h1[m][1] - h0.get(m, (0.0, 0.0))[1]) * 1e3, 4)
               for m in ("Ranker/Rank", "Status/Ping") if m in h1 and h1[m][1] > h0.get(m, (0.0, 0.0))[1]}
    for p in procs:
        p.join(timeout=30)
    ping = np.concatenate([r["ping_ms"] for r in results])
    rank = np.concatenate([r["rank_ms"] for r in results])
    ping, rank = ping[np.isfinite(ping)], rank[np.isfinite(rank)]
    f, r = percentiles(ping), percentiles(rank)
    f["cdf_ms"] = [round(float(np.percentile(ping, q)), 4) for q in CDF_POINTS]
    r["cdf_ms"] = [round(float(np.percentile(rank, q)), 4) for q in CDF_POINTS]
    return {"clients": clients, "calls_per_client": calls, "errors": int(sum(r_["errors"] for r_ in results)),
            "rank": r, "floor": f,
            "ratio_p50": round(r["p50_ms"] / f["p50_ms"], 3), "ratio_p99": round(r["p99_ms"] / f["p99_ms"], 3),
            "ranks_per_s": round(len(rank) / wall, 1),
            "server_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2), "wall_s": round(wall, 2),
            "server_handler_mean_ms": handler}


def _seed(client: Any, ids: np.ndarray, rng: np.random.Generator) -> str:
    """A profile with some history, so every signal of the ranker is at work."""
    from appliance.v1 import events_pb2

    sid = client.start_session("bench")
    hist = rng.choice(ids, 40, replace=False).tolist()
    kinds = [events_pb2.EVENT_TYPE_PLAY, events_pb2.EVENT_TYPE_LIKE, events_pb2.EVENT_TYPE_COMPLETE,
             events_pb2.EVENT_TYPE_BROWSE, events_pb2.EVENT_TYPE_SKIP]
    client.send_events(sid, [(kinds[i % len(kinds)], item) for i, item in enumerate(hist)])
    return sid


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench rank", description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", type=int, default=10_000,
                    help="catalog titles: the bundle's 9,742 plus new titles it never saw (0: the bundle's only)")
    ap.add_argument("--json", type=Path, default=None, help="output JSON (default bench/results/rank-cpu.json)")
    ap.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    ap.add_argument("--calls", type=int, default=3000, help="(Ping, Rank) pairs for the one-client level")
    ap.add_argument("--calls-concurrent", type=int, default=400, help="pairs per client above one client")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--patterns", default="fresh,repeat", help="fresh (new candidates every call), repeat")
    ap.add_argument("--server", choices=["sync", "aio"], default=None, help="override serving.server")
    ap.add_argument("--sequence-runtime", default=None,
                    help="the ranker's sequence encoder runtime (ranking.sequence_runtime; default: the config's)")
    args = ap.parse_args(argv)

    from appliance.client import ApplianceClient

    serving: dict[str, Any] = {}
    if args.server:
        serving["server"] = args.server
    ranking = {"sequence_runtime": args.sequence_runtime} if args.sequence_runtime else None
    with RankerWorker("rank", serving, stop_timeout_s=10, catalog_titles=args.catalog, ranking=ranking) as w:
        cfg, sock, server, ids = w.cfg, w.sock, w.server, w.ids
        client = ApplianceClient(f"unix:{sock}")
        session = _seed(client, ids, np.random.default_rng(7))
        rss_start = server.memory_info().rss / 2**20
        ctx = mp.get_context("spawn")
        levels: dict[str, dict[str, Any]] = {}
        for pattern in [p.strip() for p in args.patterns.split(",") if p.strip()]:
            args.pattern_now = pattern
            for n in [int(c) for c in args.clients.split(",")]:
                calls = args.calls if n == 1 else args.calls_concurrent
                print(f"rank: {pattern}, {n} client(s) x {calls} (Ping, Rank) pairs ...", flush=True)
                levels[f"{pattern}/{n}"] = _run_level(ctx, sock, session, ids, n, calls, args, server)
        rss_end = server.memory_info().rss / 2**20
        client.close()
        w.stop()
        server_log = w.log_tail[-2000:]

    head = levels.get("fresh/1") or next(iter(levels.values()))
    result: dict[str, Any] = {
        "benchmark": "rank", "machine": machine(),
        "config": {"candidates": args.candidates, "k": args.k, "catalog_titles": int(len(ids)),
                   "server": cfg.serving.server if hasattr(cfg.serving, "server") else "sync",
                   "sequence_runtime": cfg.ranking.sequence_runtime, "workers": cfg.serving.workers, "blas_threads": getattr(cfg.serving, "blas_threads", None),
                   "clients_are": "processes (one gRPC channel each)", "transport": "unix socket",
                   "floor_call": "appliance.v1.Status/Ping (empty request and response, same server)",
                   "headline": "fresh candidates, one client"},
        "rank": head["rank"], "floor": head["floor"], "ratio_p99": head["ratio_p99"], "ratio_p50": head["ratio_p50"],
        "levels": levels,
        "server_rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
    }
    if any(lv["errors"] for lv in levels.values()):
        result["server_log_tail"] = server_log
    md = [f"# Rank over the Unix socket vs the bare-gRPC floor ({result['machine']['host_cpu']}, "
          f"{result['machine']['cores']} cores)", "",
          f"{args.candidates} candidates, k={args.k}, catalog {len(ids)} titles, server `{result['config']['server']}`, "
          "clients are processes; every client alternates Ping (floor) and Rank.", "",
          "| pattern / clients | Rank p50 | p90 | p99 | floor p50 | p99 | ratio p50 | ratio p99 | Ranks/s | errors "
          "| server handler mean: Rank / Ping |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, lv in levels.items():
        r, f, hd = lv["rank"], lv["floor"], lv.get("server_handler_mean_ms", {})
        md.append(f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {f['p50_ms']:.3f} | "
                  f"{f['p99_ms']:.3f} | {lv['ratio_p50']:.2f} | {lv['ratio_p99']:.2f} | {lv['ranks_per_s']:.0f} | "
                  f"{lv['errors']} | {hd.get('Ranker/Rank', float('nan')):.3f} / {hd.get('Status/Ping', float('nan')):.3f} |")
    md += ["", f"Headline (fresh, 1 client): Rank p99 {result['rank']['p99_ms']:.3f} ms, floor p99 "
           f"{result['floor']['p99_ms']:.3f} ms, ratio {result['ratio_p99']:.2f}. Server RSS "
           f"{rss_start:.0f} -> {rss_end:.0f} MB. Times in ms.", ""]
    out = write_results("rank-cpu", result, "\n".join(md), args.json)
    series = {}
    for name, lv in levels.items():
        if name.endswith("/1"):
            series[f"Rank {name}"] = list(zip(lv["rank"]["cdf_ms"], CDF_POINTS))
            series[f"floor {name}"] = list(zip(lv["floor"]["cdf_ms"], CDF_POINTS))
    line_plot(out.with_suffix(".png"), f"Rank vs Ping over the Unix socket, 1 client, {args.candidates} candidates",
              "latency ms (log)", "percentile", series, logx=True)
    print("\n".join(md))
    print(f"wrote {out}, {out.with_suffix('.png')}")
    print(json.dumps({"rank.p99_ms": result["rank"]["p99_ms"], "floor.p99_ms": result["floor"]["p99_ms"],
                      "ratio_p99": result["ratio_p99"]}))
    return 0
