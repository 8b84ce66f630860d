"""`python -m bench detector-rows`: the detector on fitted rows (96 for 16:9) against MediaPipe's square input.

Same model, same frames, same run: how many faces each finds, how far their boxes and scores differ, and
what each costs (the detector's ONNX Runtime call alone, interleaved, one thread). Frames: every frame of
the video, the photos, and 16:9 windows of the photos at many offsets (faces touching the top and bottom
edges are where the two inputs differ most). Writes JSON + Markdown under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MEDIA = HERE.parent.parent / "shared" / "media"


def _frames(media: Path, size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    import cv2

    out: list[tuple[str, np.ndarray]] = []
    for video in sorted(media.glob("*.mp4")):
        cap = cv2.VideoCapture(str(video))
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            out.append((video.name, cv2.resize(frame, size, interpolation=cv2.INTER_AREA)))
        cap.release()
    for photo in sorted([*media.glob("*.jpg"), *media.glob("*.png")]):
        img = cv2.imread(str(photo))
        if img is None:
            continue
        out.append((photo.name, img))
        for scale in (0.6, 1.0, 1.6):
            im = cv2.resize(img, (int(img.shape[1] * scale), int(img.shape[0] * scale)))
            h, w = im.shape[:2]
            ww = min(w, int(h * size[0] / size[1]))
            hh = int(ww * size[1] / size[0])
            for fy in np.linspace(0.0, 1.0, 9):
                for fx in (0.0, 0.5, 1.0):
                    y0, x0 = int((h - hh) * fy), int((w - ww) * fx)
                    out.append((f"{photo.name}@{scale}/{fy:.2f}/{fx}",
                                cv2.resize(im[y0:y0 + hh, x0:x0 + ww], size, interpolation=cv2.INTER_AREA)))
    return out


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    from appliance.vision.tracker import iou_matrix

    return float(iou_matrix(np.array([a], np.float32), np.array([b], np.float32))[0, 0])


def run(media: Path, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    from appliance.models.manifest import DEFAULT_MODELS_DIR, model_path
    from appliance.vision.detector import BlazeFaceDetector
    from appliance.vision.runtime import create_session

    session = create_session(model_path(DEFAULT_MODELS_DIR, "blazeface_short_range"), ("cpu",), 1)
    square = BlazeFaceDetector(session, fit_rows=False)
    fit = BlazeFaceDetector(session, fit_rows=True)
    if not fit.adaptive_rows:
        raise SystemExit("bench detector-rows: the committed detector has a fixed input height; run `make models`")
    frames = _frames(media, size)
    if not frames:
        raise SystemExit(f"bench detector-rows: no media under {media}")
    count_diff, ious, sdiff, faces, worst = 0, [], [], 0, []
    for name, frame in frames:
        a, b = square.detect(frame), fit.detect(frame)
        faces += len(a)
        if len(a) != len(b):
            count_diff += 1
            worst.append({"frame": name, "square_faces": len(a), "fit_faces": len(b)})
            continue
        for d in a:
            m = max(b, key=lambda e: _iou(d.box, e.box))
            ious.append(_iou(d.box, m.box))
            sdiff.append(abs(d.score - m.score))
            if ious[-1] < 0.95 or sdiff[-1] > 0.05:
                worst.append({"frame": name, "iou": round(ious[-1], 3), "square_score": round(d.score, 3),
                              "fit_score": round(m.score, 3), "box": [round(v) for v in d.box]})
    # cost of the model call alone, both inputs interleaved on the same frames
    video = [f for n, f in frames if n.endswith(".mp4")] or [f for _, f in frames]
    t_sq: list[float] = []
    t_fit: list[float] = []
    for _ in range(repeats):
        for frame in video:
            for det, acc in ((square, t_sq), (fit, t_fit)):
                tensor, _, _ = det._letterbox(frame)
                t0 = time.perf_counter()
                session.run(None, {det._input_name: tensor})
                acc.append((time.perf_counter() - t0) * 1e3)
    rows = fit._letterbox(video[0])[0].shape[1]

    def pct(v: list[float]) -> dict[str, float]:
        return {f"p{q}_ms": round(float(np.percentile(v, q)), 3) for q in (50, 90, 99)}

    return {
        "frames": len(frames), "frame_size": list(size), "faces_square": faces,
        "frames_with_different_face_count": count_diff,
        "iou": {"min": round(min(ious), 4), "p1": round(float(np.percentile(ious, 1)), 4),
                "median": round(float(np.median(ious)), 4)},
        "score_abs_diff": {"max": round(max(sdiff), 4), "p99": round(float(np.percentile(sdiff, 99)), 4),
                           "median": round(float(np.median(sdiff)), 5)},
        "differences": worst[:40],
        "latency": {"rows_square": 128, "rows_fit": rows, "runs_each": len(t_sq),
                    "square": pct(t_sq), "fit": pct(t_fit),
                    "ratio_p50": round(float(np.percentile(t_sq, 50) / np.percentile(t_fit, 50)), 3)},
    }


def markdown(r: dict[str, Any]) -> str:
    lat = r["latency"]
    lines = [
        "# Detector input: fitted rows vs MediaPipe's square 128x128",
        "",
        f"Machine: {r['machine']}; {r['when']}. Command: `{r['command']}`.",
        "",
        f"{r['frames']} frames at {r['frame_size'][0]}x{r['frame_size'][1]} (the video's frames, the photos, and "
        "16:9 windows of the photos at 27 offsets x 3 scales, so faces also touch the top and bottom edges).",
        "",
        "| | square (128 rows) | fit ({} rows) |".format(lat["rows_fit"]),
        "| --- | ---: | ---: |",
        f"| detector call p50 / p90 / p99 ms | {lat['square']['p50_ms']} / {lat['square']['p90_ms']} / "
        f"{lat['square']['p99_ms']} | {lat['fit']['p50_ms']} / {lat['fit']['p90_ms']} / {lat['fit']['p99_ms']} |",
        "",
        f"Speed-up of the call (p50): **{lat['ratio_p50']}x** over {lat['runs_each']} calls each, interleaved.",
        "",
        f"Faces found (square): {r['faces_square']}; frames where the face count differs: "
        f"**{r['frames_with_different_face_count']}**. Box IoU fit vs square: min {r['iou']['min']}, 1st percentile "
        f"{r['iou']['p1']}, median {r['iou']['median']}. Score difference: median {r['score_abs_diff']['median']}, "
        f"p99 {r['score_abs_diff']['p99']}, max {r['score_abs_diff']['max']}.",
        "",
        "Where they differ (IoU < 0.95 or score difference > 0.05):",
        "",
    ]
    lines += [f"- {json.dumps(d)}" for d in r["differences"]] or ["- none"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench detector-rows", description=__doc__)
    ap.add_argument("--media", type=Path, default=MEDIA, help="folder with *.mp4 and photos (default ../shared/media)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--repeats", type=int, default=4, help="passes over the video for the latency figures")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "detector-rows.json")
    args = ap.parse_args(argv)
    r = run(args.media, (args.width, args.height), args.repeats)
    import os

    from bench.common import machine  # noqa: PLC0415

    m = machine()
    r["machine"] = (f"{m['host_cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}, one thread; "
                    f"load average {[round(x, 2) for x in os.getloadavg()]} after the run")
    r["machine_details"] = m
    r["when"] = m["time_utc"]
    r["command"] = ("python -m bench detector-rows " + " ".join(argv)).strip()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    args.json.with_suffix(".md").write_text(markdown(r), encoding="utf-8")
    print(markdown(r))
    return 0
