"""In-process ranking latency of the shipped bundle: `python -m bench rank-model [--json OUT]`.

Measures, on this CPU, what one `Ranker.rank` call costs for 100 / 1,000 / 10,000 candidates (k = 10, the
product's MMR setting, a household with 40 titles of history), in two regimes:

- `after_event`: a new event arrived since the last Rank (the usual case while someone browses). As on the
  box, the event path applies it and calls `Ranker.prepare` (sequence encoder on ONNX Runtime, taste,
  per-title terms) before its ack; that cost is reported as the event update, the Rank after it as Rank;
- `repeat`: nothing changed since the last Rank.

Also: bundle load time (sha256 verification + arrays + ONNX session), the ranker's construction time, the
event-update cost, and the process's RSS. Each figure is over many calls after a warm-up; the machine is
shared, so we report the median and p99 of every run and the run-to-run spread of the p99 too.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np

from bench.common import machine, peak_rss_mb, percentiles, write_results

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "ranker"


def _state(catalog, rng, n_hist: int):
    from appliance.fusion.state import COMPLETE, ProfileState, SessionState

    p, s = ProfileState("bench", catalog), SessionState("bench", "s", catalog)
    for t, item in enumerate(rng.choice(catalog.ids, n_hist, replace=False).tolist()):
        p.apply_event(COMPLETE, item, 1_700_000_000_000 + t, 0.0)
        s.apply_event(COMPLETE, item, 1_700_000_000_000 + t, 0.0)
    return p, s


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench rank-model")
    ap.add_argument("--json", type=Path, default=None, help="output (default bench/results/rank-model-cpu.json)")
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--calls", type=int, default=2000, help="Rank calls per size and regime in each run")
    ap.add_argument("--runs", type=int, default=5, help="independent runs (spread of p50/p99 across runs)")
    ap.add_argument("--history", type=int, default=40)
    args = ap.parse_args(argv)

    from appliance.config.schema import RankingConfig
    from appliance.fusion.state import PLAY
    from appliance.ranking import RankContext, Ranker, RankerBundle

    # The ranker process's own settings (appliance/serving/tuning.py): one BLAS thread, frozen start-up heap.
    try:
        from appliance.serving.tuning import freeze_heap, tune_for_latency

        tune_for_latency(1)
    except ImportError:  # pragma: no cover - serving layer without the tuning module
        freeze_heap = None

    rss0 = peak_rss_mb()
    t = time.perf_counter()
    bundle = RankerBundle.load(args.bundle)
    load_ms = (time.perf_counter() - t) * 1e3
    catalog = bundle.catalog()
    cfg = RankingConfig()
    t = time.perf_counter()
    ranker = Ranker(bundle, catalog, affect_weight=cfg.affect_weight, diversity=cfg.diversity,
                    affect_stale_s=cfg.affect_stale_s)
    init_ms = (time.perf_counter() - t) * 1e3
    rss_loaded = peak_rss_mb()
    if freeze_heap is not None:
        freeze_heap()
    rng = np.random.default_rng(0)
    ctx = RankContext(device=1, local_hour=20, weekday=1, max_maturity=5)
    sizes = [n for n in (100, 1_000, 10_000) if n <= len(catalog)] or [len(catalog)]
    if len(catalog) < 10_000:
        sizes.append(len(catalog))  # the whole catalog stands in for 10,000 when it is smaller
    sizes = sorted(set(sizes))
    results: dict[str, dict] = {}
    event_ms: list[float] = []
    for n in sizes:
        for regime in ("after_event", "repeat"):
            runs = []
            for r in range(args.runs):
                prof, sess = _state(catalog, rng, args.history)
                cands = rng.choice(catalog.ids, n, replace=False)
                fresh = rng.choice(catalog.ids, args.calls + 50, replace=True).tolist()
                samples = []
                gc.collect()
                for i in range(args.calls + 50):
                    if regime == "after_event":
                        t = time.perf_counter()
                        prof.apply_event(PLAY, fresh[i], 1_800_000_000_000 + i, 0.0)
                        sess.apply_event(PLAY, fresh[i], 1_800_000_000_000 + i, 0.0)
                        ranker.prepare(prof, sess)
                        event_ms.append((time.perf_counter() - t) * 1e3)
                    t = time.perf_counter()
                    ranker.rank(prof, sess, None, False, ctx, cands, 10, 0)
                    if i >= 50:  # warm-up
                        samples.append((time.perf_counter() - t) * 1e3)
                runs.append(percentiles(samples))
                del r
            p50s = [x["p50_ms"] for x in runs]
            p99s = [x["p99_ms"] for x in runs]
            results[f"{n}/{regime}"] = {
                "candidates": n, "regime": regime, "calls_per_run": args.calls, "runs": runs,
                "p50_ms_median_of_runs": round(float(np.median(p50s)), 4),
                "p99_ms_median_of_runs": round(float(np.median(p99s)), 4),
                "p99_ms_max_of_runs": round(float(np.max(p99s)), 4),
            }
            print(f"{n:>6} candidates {regime:<11}: p50 {np.median(p50s):.3f} ms, p99 {np.median(p99s):.3f} ms "
                  f"(p99 over {args.runs} runs {min(p99s):.3f}..{max(p99s):.3f})", flush=True)
    ev = percentiles(event_ms[len(event_ms) // 10:])
    out = {
        "benchmark": "rank-model", "machine": machine(),
        "config": {"bundle": str(args.bundle), "bundle_version": bundle.version, "k": 10,
                   "diversity": cfg.diversity, "history_titles": args.history, "calls": args.calls,
                   "runs": args.runs, "sequence_model": bundle.sequence is not None,
                   "onnx_threads": 1, "blas_threads": 1, "process_tuning": "appliance.serving.tuning"},
        "load_ms": round(load_ms, 1), "ranker_init_ms": round(init_ms, 1),
        "rss_mb": {"before_load": rss0, "after_load": rss_loaded, "after_bench": peak_rss_mb()},
        "event_update": ev,
        "rank": results,
        "must_show": {
            "rank_1000_after_event_p99_ms": results.get("1000/after_event", {}).get("p99_ms_median_of_runs"),
            "bar_ms": 1.0,
        },
    }
    lines = [f"# rank-model on {out['machine']['host_cpu']} ({out['machine']['cores']} cores)", "",
             f"bundle `{bundle.version}`; load {out['load_ms']} ms (sha256 + arrays + ONNX session), "
             f"ranker init {out['ranker_init_ms']} ms; RSS {rss0} -> {rss_loaded} MB (USS); event update "
             f"(profile + session + Ranker.prepare, as the event path does before its ack) "
             f"p50 {ev.get('p50_ms')} ms / p99 {ev.get('p99_ms')} ms", "",
             "| candidates | regime | p50 ms (median of runs) | p99 ms (median of runs) | p99 ms (worst run) |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for r in results.values():
        lines.append(f"| {r['candidates']} | {r['regime']} | {r['p50_ms_median_of_runs']} | "
                     f"{r['p99_ms_median_of_runs']} | {r['p99_ms_max_of_runs']} |")
    lines += ["", "`after_event`: a PLAY event was applied (and the ranking state prepared, sequence encoder on "
              "ONNX Runtime with 1 thread included) before each Rank; `repeat`: the state did not change.",
              f"{args.runs} runs x {args.calls} calls each, after 50 warm-up calls; the machine is shared "
              "with other work, so the worst run's p99 is shown too.", ""]
    path = write_results("rank-model-cpu", out, "\n".join(lines), args.json)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
