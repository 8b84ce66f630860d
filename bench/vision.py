"""`python -m bench vision --video FILE --json OUT`: our vision pipeline against the `fer` package.

Ours is the product's own `VisionPipeline` (BlazeFace -> crop -> batched mini-Xception -> IoU tracker)
plus publishing, where publish = building the AffectSample, serialising the VisionUpdate protobuf and
sending it on a real ZeroMQ ipc:// socket with a subscriber connected. Every frame is decoded with
OpenCV and scaled to the configured capture size (640x360, as the capture thread does); decode is
timed apart, and each latency is given with decode excluded and included. We run intra-op threads 1
and 2, detect-every-N as the governor would ask, and a classifier batch-size sweep.

The peer is `fer.FER()` with default arguments (Haar cascade + quantised TFLite classifier) on the same
video in the same run, through the worker in `.venv-peers` (`make peers`); without it the peer is
skipped with a message and `peers.fer` is null. The speedup is ours / fer in frames per second with
decode excluded for both (with-decode figures are reported too).

Top-level imports are the standard library only, so `--plot-only` can run with the peers venv's Python
(it has matplotlib; the runtime venv does not, on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGES = ("decode", "detect", "classify", "track", "publish")
TARGET_SPEEDUP = 10.0
TARGET_P99_MS = 10.0


def _ru_maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


# -- ours ---------------------------------------------------------------------------------------------
def _frames(video: Path, width: int, height: int, limit: int):
    """Yield (frame, decode ms): OpenCV decode + scale to the capture size, as the capture thread does.

    Decoding is deterministic, so every configuration below sees exactly the same pixels, and no frame
    is held after its turn (the peak RSS is the pipeline's, not a frame store's).
    """
    import cv2

    from appliance.capture.frame import fit_frame

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise SystemExit(f"bench vision: cannot open video {video}")
    n = 0
    try:
        while limit <= 0 or n < limit:
            t0 = time.perf_counter()
            ok, img = cap.read()
            if not ok:
                break
            img = fit_frame(img, width, height)
            n += 1
            yield img, (time.perf_counter() - t0) * 1e3
    finally:
        cap.release()
    if n == 0:
        raise SystemExit(f"bench vision: no frame decoded from {video}")


def _pipeline(threads: int, detect_interval: int = 1):
    from appliance.config import default_config
    from appliance.vision.process import VisionPipeline

    cfg = default_config()
    cfg = cfg.with_overrides(vision={"intra_op_threads": threads, "detect_interval": detect_interval,
                                     "providers": ["cpu"]},
                             data_dir=tempfile.gettempdir())
    return cfg, VisionPipeline(cfg)


def run_ours(video: Path, size: tuple[int, int], limit: int, threads: int, detect_interval: int = 1,
             warmup: int = 10) -> dict[str, Any]:
    """The product pipeline on every frame; per-stage and end-to-end latency, decode excluded/included."""
    import numpy as np

    from appliance.bus import LatestPublisher, LatestSubscriber
    from appliance.v1 import vision_pb2
    from bench.common import percentiles

    cfg, pipe = _pipeline(threads, detect_interval)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-vision-", dir="/tmp"))
    endpoint = f"ipc://{run_dir}/affect.ipc"
    pub = LatestPublisher(endpoint, bind=True)
    sub = LatestSubscriber(endpoint, bind=False)
    time.sleep(0.2)  # let the subscription reach the publisher: every message then really travels
    for img, _ in _frames(video, *size, warmup):  # warm caches and allocator; not measured
        pipe.analyse(img)
    pipe.reset()

    stage: dict[str, list[float]] = {s: [] for s in STAGES}
    e2e, faces, sizes, decode_ms = [], [], [], []
    shape = (size[1], size[0], 3)
    t_wall = time.perf_counter()
    for i, (img, dec_ms) in enumerate(_frames(video, *size, limit)):
        t0 = time.perf_counter()
        tracks, seen = pipe.analyse(img)
        t1 = time.perf_counter()
        sample = pipe.affect_sample(tracks, shape, "bench", time.monotonic_ns())
        update = vision_pb2.VisionUpdate(status=vision_pb2.VisionStatus(camera_open=True, frames=i + 1))
        update.affect.CopyFrom(sample)
        payload = update.SerializeToString()
        pub.publish(payload)
        t2 = time.perf_counter()
        for k, v in pipe.stage_ms.items():
            stage[k].append(v)
        stage["publish"].append((t2 - t1) * 1e3)
        stage["decode"].append(dec_ms)
        decode_ms.append(dec_ms)
        e2e.append((t2 - t0) * 1e3)
        faces.append(len(sample.faces) if seen < 0 else seen)
        sizes.append(len(payload))
        sub.recv(0)  # the consumer takes the newest message now and then, as the ranker does
    wall = time.perf_counter() - t_wall
    received = sub.received + (1 if sub.recv(100) is not None else 0)
    pub.close()
    sub.close()
    for p in run_dir.iterdir():
        p.unlink()
    run_dir.rmdir()

    e2e_a = np.asarray(e2e)
    with_decode = e2e_a + np.asarray(decode_ms)
    n = len(e2e)
    return {
        "threads": threads, "detect_interval": detect_interval, "frames": n,
        "frame_size": f"{size[0]}x{size[1]}",
        "fps": round(n / float(e2e_a.sum() / 1e3), 2),
        "fps_with_decode": round(n / float(with_decode.sum() / 1e3), 2),
        "p50_ms": round(float(np.percentile(e2e_a, 50)), 4),
        "p90_ms": round(float(np.percentile(e2e_a, 90)), 4),
        "p99_ms": round(float(np.percentile(e2e_a, 99)), 4),
        "latency_ms": percentiles(e2e_a), "latency_with_decode_ms": percentiles(with_decode),
        "stages_ms": {k: percentiles(v) for k, v in stage.items()},
        "faces_per_frame": round(float(np.mean(faces)), 4),
        "frames_with_face": int(sum(1 for f in faces if f)),
        "detector_runs": pipe.detections,
        "message_bytes": {"mean": round(float(np.mean(sizes)), 1), "max": int(max(sizes))},
        "messages_received_by_subscriber": received,
        "loop_wall_s": round(wall, 3),
        "model_version": pipe.model_version,
        "providers": list(cfg.vision.providers),
    }


def batch_sweep(video: Path, size: tuple[int, int], threads: int, sizes: tuple[int, ...] = (1, 2, 4, 8, 16),
                repeats: int = 200) -> list[dict[str, Any]]:
    """Classifier time per call and per face for batches of real face crops from the video."""
    import numpy as np

    from appliance.vision.emotion import crop_faces
    from bench.common import percentiles

    _, pipe = _pipeline(threads)
    crops = None
    for i, (img, _) in enumerate(_frames(video, *size, 0)):
        if i % 20:
            continue
        dets = pipe.detector.detect(img)
        if dets:
            c = crop_faces(img, dets, pipe.classifier.size)
            crops = c if crops is None else np.concatenate([crops, c])
    if crops is None:
        return []
    rows = []
    for b in sizes:
        batch = np.ascontiguousarray(np.resize(crops, (b, *crops.shape[1:])))
        for _ in range(10):
            pipe.classifier.classify(batch)
        ms = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe.classifier.classify(batch)
            ms.append((time.perf_counter() - t0) * 1e3)
        p = percentiles(ms)
        rows.append({"batch": b, "threads": threads, "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"],
                     "per_face_p50_ms": round(p["p50_ms"] / b, 4),
                     "faces_per_s": round(b / (p["mean_ms"] / 1e3), 1)})
    return rows


# -- peer ---------------------------------------------------------------------------------------------
def run_fer(video: Path, limit: int) -> tuple[dict[str, Any] | None, str]:
    from appliance.evaluation.fer_peer import FerPeer

    peer, why = FerPeer.find()
    if peer is None:
        return None, why
    with peer:
        out = peer.video(str(video), max_frames=limit)
        out["versions"] = peer.info["versions"]
    out["frame_size"] = "native (fer gets the decoded frame as is)"
    return out, ""


# -- output -------------------------------------------------------------------------------------------
def markdown(r: dict[str, Any]) -> str:
    m, o, fer = r["machine"], r["ours"], r["peers"]["fer"]
    lines = [f"# Vision benchmark: `{Path(r['video']).name}` — ours vs the `fer` package", "",
             f"Machine: {m['host_cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
             f"onnxruntime {m['onnxruntime']} ({', '.join(m['providers'])}); {m['time_utc']}. CPU only. "
             f"Load average before/after (1, 5, 15 min): {r['load_average']['before']} / "
             f"{r['load_average']['after']} (the machine was shared with other jobs).", "",
             "Latency is per frame from the decoded frame to the AffectSample sent on ZeroMQ (detect + "
             "classify + track + publish), decode excluded unless stated. fps = frames / summed per-frame "
             "time (a single stream, back to back).", "",
             "| pipeline | fps | fps incl. decode | p50 ms | p90 ms | p99 ms | p99 ms incl. decode | faces/frame | "
             "peak RSS MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in r["ours_runs"]:
        lw = run["latency_with_decode_ms"]
        lines.append(f"| ours, {run['threads']} thread(s), detect every {run['detect_interval']} | {run['fps']:.1f} | "
                     f"{run['fps_with_decode']:.1f} | {run['p50_ms']:.2f} | {run['p90_ms']:.2f} | {run['p99_ms']:.2f} | "
                     f"{lw['p99_ms']:.2f} | {run['faces_per_frame']:.2f} | {r['ours_peak_rss_mb']} |")
    if fer is not None:
        lat, lwd = fer["latency_ms"], fer["latency_with_decode_ms"]
        lines.append(f"| fer {fer['versions']['fer']} FER() defaults | {fer['fps']:.1f} | {fer['fps_with_decode']:.1f} | "
                     f"{lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} | {lwd['p99_ms']:.2f} | "
                     f"{fer['faces_per_frame']:.2f} | {fer['peak_rss_mb']} |")
        lines += ["", f"**Speedup (ours / fer, fps, decode excluded): {r['speedup']:.1f}x** "
                  f"(incl. decode: {r['speedup_with_decode']:.1f}x). Target >= {TARGET_SPEEDUP:.0f}x: "
                  f"{'met' if r['targets']['speedup_met'] else 'NOT met'}."]
    else:
        lines += ["", f"**fer peer skipped:** {r['peers_skipped']['fer']}"]
    lines += [f"Ours p99 {o['p99_ms']:.2f} ms (target <= {TARGET_P99_MS:.0f} ms: "
              f"{'met' if r['targets']['p99_met'] else 'NOT met'}); headline configuration: "
              f"{o['threads']} thread(s), detect every frame.", "",
              f"## Per-stage times, ours ({o['threads']} thread(s), detect every frame)", "",
              "| stage | p50 ms | p90 ms | p99 ms | mean ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for k in STAGES:
        s = o["stages_ms"][k]
        lines.append(f"| {k} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | {s['mean_ms']:.3f} |")
    lines += ["", "decode = OpenCV H.264 decode + scale to 640x360 (the capture thread's work); publish = "
              f"AffectSample + VisionUpdate protobuf ({o['message_bytes']['mean']:.0f} B mean) sent on a "
              "ZeroMQ ipc:// PUB socket with a subscriber connected.", "",
              "## Classifier batch-size sweep (real face crops from the video)", "",
              "| threads | batch | p50 ms | p99 ms | per face p50 ms | faces/s |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["batch_sweep"]:
        lines.append(f"| {row['threads']} | {row['batch']} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
                     f"{row['per_face_p50_ms']:.3f} | {row['faces_per_s']:.0f} |")
    if r.get("plot"):
        lines += ["", f"![latency]({Path(r['plot']).name})"]
    elif r.get("plot_skipped"):
        lines += ["", f"Plot: {r['plot_skipped']}"]
    if fer is not None:
        lines += ["", f"fer: {fer['config']}; model load {fer['model_load_s']} s (not timed per frame); "
                  f"{fer['frames_with_face']}/{fer['frames']} frames with a face."]
    return "\n".join(lines) + "\n"


def plot(json_path: Path, png_path: Path) -> None:
    """Latency histogram per pipeline and the per-stage breakdown (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(json_path).read_text())
    o, fer = r["ours"], r["peers"]["fer"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names, p50, p99 = [], [], []
    for run in r["ours_runs"]:
        names.append(f"ours\n{run['threads']}t, every {run['detect_interval']}")
        p50.append(run["p50_ms"])
        p99.append(run["p99_ms"])
    if fer is not None:
        names.append("fer\nFER()")
        p50.append(fer["latency_ms"]["p50_ms"])
        p99.append(fer["latency_ms"]["p99_ms"])
    x = range(len(names))
    a1.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    a1.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    a1.set_yscale("log")
    a1.set_xticks(list(x), names, fontsize=8)
    a1.set_ylabel("ms per frame (log), decode excluded")
    a1.axhline(TARGET_P99_MS, color="red", lw=0.8, ls="--", label=f"p99 target {TARGET_P99_MS:.0f} ms")
    a1.legend(fontsize=8)
    title = f"{Path(r['video']).name}: ours {o['fps']:.0f} fps"
    if fer is not None:
        title += f" vs fer {fer['fps']:.1f} fps ({r['speedup']:.0f}x)"
    a1.set_title(title, fontsize=9)
    stages = [s for s in STAGES]
    means = [o["stages_ms"][s]["mean_ms"] for s in stages]
    p99s = [o["stages_ms"][s]["p99_ms"] for s in stages]
    a2.bar([i - 0.2 for i in range(len(stages))], means, 0.4, label="mean")
    a2.bar([i + 0.2 for i in range(len(stages))], p99s, 0.4, label="p99")
    a2.set_xticks(range(len(stages)), stages)
    a2.set_ylabel("ms")
    a2.set_title(f"ours per stage ({o['threads']} thread(s)); {r['machine']['host_cpu'][:40]}", fontsize=9)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def _make_plot(json_path: Path, png_path: Path) -> tuple[bool, str]:
    try:
        import matplotlib  # noqa: F401

        plot(json_path, png_path)
        return True, ""
    except ImportError:
        pass
    from appliance.evaluation.fer_peer import peers_python

    exe, why = peers_python()
    if exe is None:
        return False, "matplotlib is not in the runtime venv (on purpose) and the peers venv is absent: no plot"
    proc = subprocess.run([str(exe), "-I", str(Path(__file__).resolve()), "--plot-only", str(json_path),
                           str(png_path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return False, f"plot failed: {proc.stderr.strip()[-400:]}"
    return True, ""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench vision", description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, required=False)
    ap.add_argument("--json", type=Path, default=None, help="output JSON (Markdown and PNG beside it)")
    ap.add_argument("--frames", type=int, default=0, help="at most this many frames (0 = all)")
    ap.add_argument("--no-peer", action="store_true", help="skip the fer package")
    ap.add_argument("--sweep-repeats", type=int, default=200, help="classifier calls per batch size")
    ap.add_argument("--plot-only", nargs=2, type=Path, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(*args.plot_only)
        return 0
    if args.video is None:
        ap.error("--video is required")
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    from appliance.config import default_config
    from bench.common import machine, write_results

    cap_cfg = default_config().capture
    size = (cap_cfg.width, cap_cfg.height)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = [run_ours(args.video, size, args.frames, threads=1), run_ours(args.video, size, args.frames, threads=2),
            run_ours(args.video, size, args.frames, threads=1, detect_interval=3)]
    ours_rss = _ru_maxrss_mb()
    sweep = (batch_sweep(args.video, size, 1, repeats=args.sweep_repeats)
             + batch_sweep(args.video, size, 2, repeats=args.sweep_repeats))
    fer, why = (None, "not asked for (--no-peer)") if args.no_peer else run_fer(args.video, args.frames)
    head = runs[0]
    result: dict[str, Any] = {
        "benchmark": "vision", "video": str(args.video), "machine": machine(),
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()],
                         "note": "1/5/15-min load of the shared 2-core machine (other jobs were running)"},
        "ours": head, "ours_runs": runs, "ours_peak_rss_mb": ours_rss,
        "ours_peak_rss_note": "ru_maxrss of the benchmark process after the three pipeline runs (models, "
                              "ONNX Runtime, OpenCV decoder, ZeroMQ; frames are not kept)",
        "batch_sweep": sweep, "peers": {"fer": fer},
    }
    if fer is None:
        result["peers_skipped"] = {"fer": why}
        result["speedup"] = None
    else:
        result["speedup"] = round(float(head["fps"]) / float(fer["fps"]), 2)
        result["speedup_with_decode"] = round(float(head["fps_with_decode"]) / float(fer["fps_with_decode"]), 2)
    result["targets"] = {"speedup": TARGET_SPEEDUP, "p99_ms": TARGET_P99_MS,
                         "speedup_met": None if fer is None else bool(result["speedup"] >= TARGET_SPEEDUP),
                         "p99_met": bool(head["p99_ms"] <= TARGET_P99_MS)}
    name = f"vision-{args.video.stem}-cpu"
    out = write_results(name, result, "", args.json)
    png = out.with_suffix(".png")
    ok, why_plot = _make_plot(out, png)
    if ok:
        result["plot"] = str(png)
    else:
        result["plot_skipped"] = why_plot
    out = write_results(name, result, markdown(result), args.json)
    print(markdown(result))
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {png}" if ok else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
