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
decode excluded for both (with-decode figures are reported too), as the median over `--rounds` rounds
in which ours and fer run back to back (the shared machine's speed drifts over minutes).

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
    from appliance.config import default_config

    threads = default_config().capture.decode_threads  # as the capture thread opens a file
    cap = cv2.VideoCapture(str(video), cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, threads] if threads > 0 else [])
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


def _stream(pipe, video: Path, size: tuple[int, int], limit: int, n: int):  # noqa: ANN001, ANN202
    """One pass over the video as a new stream (pass n > 0 resets the tracks first)."""
    if n:
        pipe.reset()
    yield from _frames(video, *size, limit)


def _pipeline(threads: int, detect_interval: int = 1, vision: dict[str, Any] | None = None):
    """The product's VisionPipeline; `vision` overrides runtime/providers/precision/calibration_dir
    (default: ONNX Runtime on CPU at FP32, the CPU benchmark's configuration)."""
    from appliance.config import default_config
    from appliance.vision.process import VisionPipeline

    cfg = default_config()
    cfg = cfg.with_overrides(vision={"intra_op_threads": threads, "detect_interval": detect_interval,
                                     "providers": ["cpu"], **(vision or {})},
                             data_dir=tempfile.gettempdir())
    return cfg, VisionPipeline(cfg)


def active_providers(pipe) -> dict[str, list[str]]:  # noqa: ANN001 - VisionPipeline
    """What each model really runs on (a GPU provider that failed to load shows up as CPU here)."""
    return {"detector": list(pipe.detector._session.get_providers()),
            "classifier": list(pipe.classifier._session.get_providers())}


def run_ours(video: Path, size: tuple[int, int], limit: int, threads: int, detect_interval: int = 1,
             warmup: int = 10, vision: dict[str, Any] | None = None, pipeline=None,  # noqa: ANN001
             passes: int = 1) -> dict[str, Any]:
    """The product pipeline on every frame, `passes` times over the video (each pass a new stream: the
    tracks are reset); per-stage and end-to-end latency, decode excluded/included."""
    import numpy as np

    from appliance.bus import LatestPublisher, LatestSubscriber
    from appliance.v1 import vision_pb2
    from bench.common import percentiles

    cfg, pipe = pipeline if pipeline is not None else _pipeline(threads, detect_interval, vision)
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
    frames = (x for p in range(passes) for x in _stream(pipe, video, size, limit, p))
    for i, (img, dec_ms) in enumerate(frames):
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
        "threads": threads, "detect_interval": detect_interval, "frames": n, "passes": passes,
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
        "runtime": cfg.vision.runtime, "precision": cfg.vision.precision,
        "active_providers": active_providers(pipe),
    }


def batch_sweep(video: Path, size: tuple[int, int], threads: int, sizes: tuple[int, ...] = (1, 2, 4, 8, 16),
                repeats: int = 200, vision: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Classifier time per call and per face for batches of real face crops from the video."""
    import numpy as np

    from appliance.vision.emotion import crop_faces
    from bench.common import percentiles

    _, pipe = _pipeline(threads, vision=vision)
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


# -- GPU matrix ---------------------------------------------------------------------------------------
#: (label, vision overrides, the provider each model must really run on for the row to count)
GPU_MATRIX: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("TensorRT native fp32", {"runtime": "tensorrt", "precision": "fp32"}, "TensorRT-native"),
    ("TensorRT native fp16", {"runtime": "tensorrt", "precision": "fp16"}, "TensorRT-native"),
    ("TensorRT native int8", {"runtime": "tensorrt", "precision": "int8"}, "TensorRT-native"),
    ("TensorRT EP fp32", {"providers": ["tensorrt", "cuda", "cpu"], "precision": "fp32"}, "TensorrtExecutionProvider"),
    ("TensorRT EP fp16", {"providers": ["tensorrt", "cuda", "cpu"], "precision": "fp16"}, "TensorrtExecutionProvider"),
    ("CUDA EP fp32", {"providers": ["cuda", "cpu"], "precision": "fp32"}, "CUDAExecutionProvider"),
    ("CPU fp32", {"providers": ["cpu"], "precision": "fp32"}, "CPUExecutionProvider"),
)


GPU_EMOTION_MODEL = "emotion_cnn48"  # FP32: TensorRT makes its own INT8 (the CPU boxes' QDQ build is for ORT CPU)


def gpu_matrix(video: Path, size: tuple[int, int], limit: int, calibration: Path | None,
               only: list[str] | None = None, emotion_model: str | None = None,
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each GPU_MATRIX row that really runs where it says (1 thread, detect every frame); the others are
    listed as skipped with the reason (no TensorRT, no CUDA EP in this onnxruntime, a failed build)."""
    runs, skipped = [], []
    for label, overrides, want in GPU_MATRIX:
        if only and not any(o.lower() in label.lower() for o in only):
            continue
        vision = {"emotion_model": emotion_model or GPU_EMOTION_MODEL, **overrides}
        if vision.get("precision") == "int8" and vision.get("runtime") == "tensorrt":
            if calibration is None:
                skipped.append({"label": label, "why": "no calibration set"})
                continue
            vision["calibration_dir"] = str(calibration)
        if vision.get("runtime") == "tensorrt":
            try:
                from appliance.vision.trt_engine import _trt, gpu_name

                _trt()
                gpu_name()
            except Exception as exc:  # noqa: BLE001 - ModelError: no TensorRT or no GPU here
                skipped.append({"label": label, "why": str(exc)[:400]})
                continue
        t0 = time.perf_counter()
        try:
            cfg, pipe = _pipeline(1, 1, vision)
        except Exception as exc:  # noqa: BLE001 - a row that cannot load is reported, not fatal
            skipped.append({"label": label, "why": f"{type(exc).__name__}: {exc}"[:400]})
            continue
        load_s = round(time.perf_counter() - t0, 2)
        active = active_providers(pipe)
        if not all(p and p[0].startswith(want) for p in active.values()):
            skipped.append({"label": label, "why": f"fell back: runs on {active}", "active_providers": active})
            continue
        run = run_ours(video, size, limit, threads=1, pipeline=(cfg, pipe))
        run.update({"label": label, "load_s_incl_engine_build": load_s})
        runs.append(run)
        print(f"{label}: {run['fps']:.1f} fps, p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.3f} ms", flush=True)
    return runs, skipped


def _device_name() -> str:
    try:
        from appliance.vision.trt_engine import gpu_name

        return gpu_name()
    except Exception as exc:  # noqa: BLE001
        return f"no GPU ({exc})"


# -- peer ---------------------------------------------------------------------------------------------
def run_fer(video: Path, limit: int) -> tuple[dict[str, Any] | None, str]:
    from appliance.evaluation.fer_peer import FerPeer

    peer, why = FerPeer.find()
    if peer is None:
        return None, why
    with peer:
        out = _fer_video(peer, video, limit)
    return out, ""


def _fer_video(peer, video: Path, limit: int) -> dict[str, Any]:  # noqa: ANN001 - a started FerPeer
    out = peer.video(str(video), max_frames=limit)
    out["versions"] = peer.info["versions"]
    out["frame_size"] = "native (fer gets the decoded frame as is)"
    return out


def interleaved(video: Path, size: tuple[int, int], limit: int, rounds: int, vision: dict[str, Any],
                with_peer: bool, passes: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Ours (1 thread, every frame) and fer, one after the other, `rounds` times: (ours runs, fer runs,
    why fer is missing). This machine's speed drifts by tens of percent over minutes (shared host), so a
    ratio of two runs minutes apart measures the drift as much as the software; each round's pair runs
    back to back, and the speedup is the median of the rounds' ratios. Ours goes `passes` times over the
    video per round, so both sides run for about as long (fer's pass takes ~10x ours) and see the same
    spells of a faster or slower host, not ours a 1.5-second sample of them."""
    from appliance.evaluation.fer_peer import FerPeer

    pipeline = _pipeline(1, 1, vision)
    peer, why = FerPeer.find() if with_peer else (None, "not asked for (--no-peer)")
    ours: list[dict[str, Any]] = []
    fers: list[dict[str, Any]] = []
    if peer is None:
        return [run_ours(video, size, limit, threads=1, vision=vision, pipeline=pipeline, passes=passes)
                for _ in range(rounds)], fers, why
    with peer:
        for _ in range(rounds):
            ours.append(run_ours(video, size, limit, threads=1, vision=vision, pipeline=pipeline, passes=passes))
            fers.append(_fer_video(peer, video, limit))
    return ours, fers, ""


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median frames/s (a real run: its latencies and stages belong together)."""
    return sorted(runs, key=lambda r: r["fps"])[len(runs) // 2]


# -- output -------------------------------------------------------------------------------------------
def markdown(r: dict[str, Any]) -> str:
    m, o, fer = r["machine"], r["ours"], r["peers"]["fer"]
    lines = [f"# Vision benchmark: `{Path(r['video']).name}` — ours vs the `fer` package", "",
             f"Machine: {m['host_cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
             f"onnxruntime {m['onnxruntime']} ({', '.join(m['providers'])}); {m['time_utc']}. "
             f"{('GPU: ' + r['gpu'] + '.') if r.get('gpu') else 'CPU only.'} "
             f"Load average before/after (1, 5, 15 min): {r['load_average']['before']} / "
             f"{r['load_average']['after']} (the machine was shared with other jobs).", "",
             "Latency is per frame from the decoded frame to the AffectSample sent on ZeroMQ (detect + "
             "classify + track + publish), decode excluded unless stated. fps = frames / summed per-frame "
             "time (a single stream, back to back).", "",
             "| pipeline | fps | fps incl. decode | p50 ms | p90 ms | p99 ms | p99 ms incl. decode | faces/frame | "
             "peak RSS MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in r["ours_runs"]:
        lw = run["latency_with_decode_ms"]
        name = (f"ours, {run['label']}" if run.get("label") else
                f"ours, {run['threads']} thread(s), detect every {run['detect_interval']}")
        lines.append(f"| {name} | {run['fps']:.1f} | "
                     f"{run['fps_with_decode']:.1f} | {run['p50_ms']:.2f} | {run['p90_ms']:.2f} | {run['p99_ms']:.2f} | "
                     f"{lw['p99_ms']:.2f} | {run['faces_per_frame']:.2f} | {r['ours_peak_rss_mb']} |")
    if fer is not None:
        lat, lwd = fer["latency_ms"], fer["latency_with_decode_ms"]
        lines.append(f"| fer {fer['versions']['fer']} FER() defaults | {fer['fps']:.1f} | {fer['fps_with_decode']:.1f} | "
                     f"{lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} | {lwd['p99_ms']:.2f} | "
                     f"{fer['faces_per_frame']:.2f} | {fer['peak_rss_mb']} |")
        if r.get("rounds"):
            lines += ["", "Rounds (ours, then fer, back to back; the table shows each side's median-fps run):", "",
                      "| round | ours fps | ours p99 ms | fer fps | ours / fer |", "| ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {i + 1} | {x['ours_fps']:.1f} | {x['ours_p99_ms']:.2f} | {x['fer_fps']:.1f} | {x['ratio']:.2f} |"
                      for i, x in enumerate(r["rounds"])]
        lines += ["", f"**Speedup (ours / fer, fps, decode excluded): {r['speedup']:.1f}x** "
                  f"(incl. decode: {r['speedup_with_decode']:.1f}x). Target >= {TARGET_SPEEDUP:.0f}x: "
                  f"{'met' if r['targets']['speedup_met'] else 'NOT met'}."]
    else:
        lines += ["", f"**fer peer skipped:** {r['peers_skipped']['fer']}"]
    for row in r.get("gpu_skipped", []):
        lines.append(f"- skipped {row['label']}: {row['why']}")
    lines += [f"Ours p99 {o['p99_ms']:.2f} ms (target <= {TARGET_P99_MS:.0f} ms: "
              f"{'met' if r['targets']['p99_met'] else 'NOT met'}); headline configuration: "
              f"{o.get('label') or str(o['threads']) + ' thread(s)'}, detect every frame.", "",
              f"## Per-stage times, ours ({o.get('label') or str(o['threads']) + ' thread(s)'}, detect every frame)",
              "",
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
    ap.add_argument("--rounds", type=int, default=5,
                    help="ours and fer alternately this many times (the speedup is the median round ratio)")
    ap.add_argument("--passes", type=int, default=8,
                    help="ours goes this many times over the video per round (about fer's time for one pass)")
    ap.add_argument("--sweep-repeats", type=int, default=200, help="classifier calls per batch size")
    ap.add_argument("--runtime", choices=("onnxruntime", "tensorrt"), default=None,
                    help="run ours with this vision.runtime (default: onnxruntime)")
    ap.add_argument("--providers", default=None, help="comma list for vision.providers (default: cpu)")
    ap.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None)
    ap.add_argument("--emotion-model", default=None, help="vision.emotion_model (default: the product's)")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="calibration sets (appliance models calibrate) for INT8; made from the video if absent")
    ap.add_argument("--gpu-matrix", action="store_true",
                    help="TensorRT native / TensorRT EP / CUDA EP / CPU at FP32/FP16/INT8 in one run "
                         "(writes vision-<video>-gpu.*)")
    ap.add_argument("--only", default=None, help="with --gpu-matrix: comma list of row-label substrings")
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
    vision: dict[str, Any] = {}
    if args.runtime:
        vision["runtime"] = args.runtime
    if args.providers:
        vision["providers"] = [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.precision:
        vision["precision"] = args.precision
    if args.emotion_model:
        vision["emotion_model"] = args.emotion_model
    calibration = args.calibration
    needs_calib = args.gpu_matrix or (vision.get("runtime") == "tensorrt" and vision.get("precision") == "int8")
    made_calibration = needs_calib and calibration is None
    if made_calibration:
        from appliance.models.calibrate import calibrate

        calibration = Path(tempfile.mkdtemp(prefix="bench-calib-", dir="/tmp"))
        calibrate(calibration, video=args.video, every=3, frames=300,
                  emotion_model=(args.emotion_model or GPU_EMOTION_MODEL) if args.gpu_matrix else args.emotion_model)
    if calibration is not None and vision.get("precision") == "int8":
        vision["calibration_dir"] = str(calibration)
    gpu_skipped: list[dict[str, Any]] = []
    if args.gpu_matrix:
        only = [o.strip() for o in args.only.split(",")] if args.only else None
        runs, gpu_skipped = gpu_matrix(args.video, size, args.frames, calibration, only, args.emotion_model)
        if not runs:
            raise SystemExit(f"bench vision: no configuration ran: {gpu_skipped}")
        head = min(runs, key=lambda r: r["p50_ms"])
        vision = {"emotion_model": args.emotion_model or GPU_EMOTION_MODEL,
                  **GPU_MATRIX[[x[0] for x in GPU_MATRIX].index(head["label"])][1]}
        if vision.get("precision") == "int8" and vision.get("runtime") == "tensorrt":
            vision["calibration_dir"] = str(calibration)
        fer, why = (None, "not asked for (--no-peer)") if args.no_peer else run_fer(args.video, args.frames)
        rounds: list[dict[str, Any]] = []
    else:
        ours_rounds, fer_rounds, why = interleaved(args.video, size, args.frames, args.rounds, vision,
                                                   not args.no_peer, args.passes)
        head = median_run(ours_rounds)
        fer = median_run(fer_rounds) if fer_rounds else None
        rounds = [{"ours_fps": o["fps"], "ours_p99_ms": o["p99_ms"],
                   **({"fer_fps": f["fps"], "ratio": round(o["fps"] / f["fps"], 3)} if f else {})}
                  for o, f in zip(ours_rounds, fer_rounds or [None] * len(ours_rounds))]
        runs = [head,
                run_ours(args.video, size, args.frames, threads=2, vision=vision),
                run_ours(args.video, size, args.frames, threads=1, detect_interval=3, vision=vision)]
    ours_rss = _ru_maxrss_mb()
    sweep = (batch_sweep(args.video, size, 1, repeats=args.sweep_repeats, vision=vision)
             + batch_sweep(args.video, size, 2, repeats=args.sweep_repeats, vision=vision))
    if made_calibration:  # face crops: not left lying around
        import shutil

        shutil.rmtree(calibration, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "vision", "video": str(args.video), "machine": machine(),
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()],
                         "note": "1/5/15-min load of the shared 2-core machine (other jobs were running)"},
        "ours": head, "ours_runs": runs, "ours_peak_rss_mb": ours_rss,
        "ours_peak_rss_note": "ru_maxrss of the benchmark process after the three pipeline runs (models, "
                              "ONNX Runtime, OpenCV decoder, ZeroMQ; frames are not kept)",
        "batch_sweep": sweep, "peers": {"fer": fer},
    }
    gpu_run = args.gpu_matrix or bool(vision.get("runtime") == "tensorrt"
                                       or set(vision.get("providers", ["cpu"])) - {"cpu"})
    if gpu_run:
        result["gpu"] = _device_name()
        result["gpu_skipped"] = gpu_skipped
        result["ours_peak_rss_note"] = "ru_maxrss of the benchmark process after all configurations"
    if fer is None:
        result["peers_skipped"] = {"fer": why}
        result["speedup"] = None
    elif rounds:
        import statistics

        result["rounds"] = rounds
        result["speedup"] = round(statistics.median(r["ratio"] for r in rounds), 2)
        result["speedup_min_max"] = [min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds)]
        result["speedup_with_decode"] = round(float(head["fps_with_decode"]) / float(fer["fps_with_decode"]), 2)
        result["speedup_note"] = (f"median over {len(rounds)} rounds of (ours fps / fer fps), each round's two runs "
                                  f"back to back (ours {args.passes} passes over the video, fer one: about the "
                                  "same wall time); `ours` and `peers.fer` are the runs with the median fps")
    else:
        result["speedup"] = round(float(head["fps"]) / float(fer["fps"]), 2)
        result["speedup_with_decode"] = round(float(head["fps_with_decode"]) / float(fer["fps_with_decode"]), 2)
    result["targets"] = {"speedup": TARGET_SPEEDUP, "p99_ms": TARGET_P99_MS,
                         "speedup_met": None if fer is None else bool(result["speedup"] >= TARGET_SPEEDUP),
                         "p99_met": bool(head["p99_ms"] <= TARGET_P99_MS)}
    name = f"vision-{args.video.stem}-{'gpu' if gpu_run else 'cpu'}"
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
