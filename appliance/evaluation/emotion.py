"""`appliance eval emotion DIR`: our emotion classifier against the `fer` package, same images, same run.

DIR holds `DIR/<class>/*.png|jpg` with FER2013 class names (angry, disgust, fear, happy, sad, surprise,
neutral); the images are face crops (as FER2013's are). For each classifier we report top-1 accuracy,
macro-F1, per-class recall with a 95% Wilson interval, precision/F1 and the confusion matrix (rows = true
class, columns = predicted), and the ratio ours / fer. If `DIR/IN_TRAIN.txt` lists images that also
appear in the training data (as in the FER2013 sample), the same figures are given for the "clean"
subset without them, which is the one to compare models on.

Besides the product's preprocessing, every run measures the alternatives for our model (resize
method, test-time horizontal-flip averaging, fer's 10 px grey band) and, through the real detector,
how the product's crop of a detected face compares with the image's own framing. The product keeps
the preprocessing these measurements favour (see `PRODUCT_PREPROCESSING`).

"ours" is the product's classifier (`appliance.vision.emotion.DEFAULT_EMOTION_MODEL`, or `--model`);
every other emotion model in the manifest is scored on the same images in the same run under
`ours_alternatives`, so a switch of the product's model is backed by one run.

The `fer` peer runs in its own virtual environment (`make peers`) through `appliance.evaluation.fer_peer`;
without it the peer is reported as skipped (`peers.fer` is null), never estimated.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from appliance.evaluation.fer_peer import FerPeer
from appliance.models.manifest import DEFAULT_MODELS_DIR, load_manifest, model_path, verify_models
from appliance.vision.detector import BlazeFaceDetector, Detection
from appliance.vision.emotion import (
    DEFAULT_EMOTION_MODEL,
    LABELS,
    EmotionClassifier,
    crop_faces,
    normalise,
    prepare_gray,
)
from appliance.vision.runtime import create_session

EXTENSIONS = (".png", ".jpg", ".jpeg")
IN_TRAIN = "IN_TRAIN.txt"
EMOTION_MODEL = DEFAULT_EMOTION_MODEL
DETECTOR_MODEL = "blazeface_short_range"
PRODUCT_PREPROCESSING = "bilinear resize to the model's input side, no flip averaging"
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "bicubic": cv2.INTER_CUBIC,
                  "lanczos": cv2.INTER_LANCZOS4, "nearest": cv2.INTER_NEAREST}
# Scales at which FER images are placed in a larger frame for the detector path (48 px -> 72..192 px faces).
DETECTOR_SCALES = (1.5, 2.5, 4.0)


@dataclass
class Dataset:
    root: Path
    paths: list[str]          # relative to root, "<class>/<file>"
    images: list[np.ndarray]  # gray uint8
    labels: np.ndarray        # (N,) index into LABELS
    clean: np.ndarray | None  # (N,) bool, None without IN_TRAIN.txt


def load_dataset(root: Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"eval emotion: {root} is not a directory")
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in LABELS)
    if unknown:
        raise SystemExit(f"eval emotion: class folders {unknown} are not FER2013 class names {list(LABELS)}")
    paths, images, labels = [], [], []
    for i, label in enumerate(LABELS):
        folder = root / label
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() not in EXTENSIONS:
                continue
            img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise SystemExit(f"eval emotion: cannot read image {p}")
            paths.append(f"{label}/{p.name}")
            images.append(img)
            labels.append(i)
    if not paths:
        raise SystemExit(f"eval emotion: no *.png/*.jpg images under {root}/<class>/")
    clean = None
    listed = root / IN_TRAIN
    if listed.is_file():
        leaked = set(listed.read_text().split())
        clean = np.array([p not in leaked for p in paths])
    return Dataset(root, paths, images, np.array(labels), clean)


# -- metrics ------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sensible for small n and for 0 or n successes)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """accuracy, macro-F1, per-class recall (Wilson 95%), precision, F1, confusion for one prediction."""
    k = len(LABELS)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    per_class: dict[str, Any] = {}
    f1s = []
    for i, label in enumerate(LABELS):
        n_true, n_pred, tp = int(conf[i].sum()), int(conf[:, i].sum()), int(conf[i, i])
        recall = tp / n_true if n_true else float("nan")
        precision = tp / n_pred if n_pred else 0.0
        f1 = 2 * precision * recall / (precision + recall) if n_true and (precision + recall) > 0 else 0.0
        if n_true:
            f1s.append(f1)
        lo, hi = wilson(tp, n_true)
        per_class[label] = {"n": n_true, "recall": _r(recall), "recall_ci95": [_r(lo), _r(hi)],
                            "precision": _r(precision), "f1": _r(f1)}
    n = int(len(y))
    acc_k = int((y == pred).sum())
    lo, hi = wilson(acc_k, n)
    return {"accuracy": _r(acc_k / n if n else float("nan")), "accuracy_ci95": [_r(lo), _r(hi)],
            "macro_f1": _r(float(np.mean(f1s)) if f1s else float("nan")), "n": n,
            "per_class": per_class, "confusion": conf.tolist(), "confusion_labels": list(LABELS)}


def _r(x: float) -> float:
    return round(float(x), 4)


def report(y: np.ndarray, pred: np.ndarray, clean: np.ndarray | None) -> dict[str, Any]:
    out = scores(y, pred)
    if clean is not None:
        out["clean"] = scores(y[clean], pred[clean])
    return out


# -- our classifier -----------------------------------------------------------------------------------
def _classifier(models_dir: Path, name: str = EMOTION_MODEL, threads: int = 1) -> EmotionClassifier:
    return EmotionClassifier(create_session(model_path(models_dir, name), ("cpu",), threads))


def _grey_band(images: list[np.ndarray], band: int) -> list[np.ndarray]:
    """What fer does to a whole-image rectangle: a `band` px border of the mean of the bottom two rows."""
    out = []
    for g in images:
        mean = cv2.mean(g[g.shape[0] - 2:])[0]
        out.append(cv2.copyMakeBorder(g, band, band, band, band, cv2.BORDER_CONSTANT, value=(mean,) * 3))
    return out


def preprocessing_sweep(clf: EmotionClassifier, data: Dataset) -> list[dict[str, Any]]:
    """Accuracy of our model under each crop preprocessing, on all images and on the clean subset."""
    rows = []
    for band in (0, 10):
        images = data.images if band == 0 else _grey_band(data.images, band)
        for name, interp in INTERPOLATIONS.items():
            x = prepare_gray(images, size=clf.size, interpolation=interp)
            p = clf.classify(x)
            p_flip = clf.classify(np.ascontiguousarray(x[:, :, ::-1]))
            for flip, probs in ((False, p), (True, (p + p_flip) / 2.0)):
                pred = probs.argmax(axis=1)
                row = {"resize": name, "flip_average": flip, "grey_band_px": band,
                       "accuracy": _r((pred == data.labels).mean()),
                       "macro_f1": scores(data.labels, pred)["macro_f1"]}
                if data.clean is not None:
                    c = data.clean
                    row["clean_accuracy"] = _r((pred[c] == data.labels[c]).mean())
                rows.append(row)
    return rows


def _relative_crop(frame_bgr: np.ndarray, det: Detection, margin: float, size: int) -> np.ndarray:
    """A square crop around the detection grown by `margin` of its side on each side (scale-free)."""
    x1, y1, x2, y2 = det.box
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    h, w = frame_bgr.shape[:2]
    ax1, ay1 = int(round(cx - side / 2)), int(round(cy - side / 2))
    ax2, ay2 = int(round(cx + side / 2)), int(round(cy + side / 2))
    gray = cv2.cvtColor(frame_bgr[max(0, ay1):min(h, ay2), max(0, ax1):min(w, ax2)], cv2.COLOR_BGR2GRAY)
    return normalise(cv2.resize(gray, (size, size))[None])[0]


def detector_path(clf: EmotionClassifier, det: BlazeFaceDetector, data: Dataset) -> list[dict[str, Any]]:
    """The product path on labelled faces: each image, enlarged, in a bigger frame -> BlazeFace -> crop.

    The frame continues the image's edges (BORDER_REPLICATE), so the detector sees a face in context
    and the crop cannot fall off the picture. Compares fer's crop (square + 10 px, what the product
    uses) with a scale-free margin and with the image's own framing, on the faces that were detected.
    """
    rows = []
    for scale in DETECTOR_SCALES:
        side = int(round(48 * scale))
        idx, frames, dets = [], [], []
        for i, g in enumerate(data.images):
            big = cv2.resize(g, (side, side), interpolation=cv2.INTER_CUBIC)
            frame = cv2.cvtColor(cv2.copyMakeBorder(big, side, side, side, side, cv2.BORDER_REPLICATE),
                                 cv2.COLOR_GRAY2BGR)
            found = det.detect(frame)
            if found:
                idx.append(i)
                frames.append(frame)
                dets.append(found[0])
        if not idx:
            rows.append({"face_px": side, "detected": 0})
            continue
        y = data.labels[idx]
        fer_crop = np.concatenate([crop_faces(f, [d], clf.size) for f, d in zip(frames, dets)])
        row: dict[str, Any] = {"face_px": side, "detected": len(idx), "of": len(data.images),
                               "product_crop_fer_style": _r((clf.classify(fer_crop).argmax(1) == y).mean())}
        for margin in (0.0, 0.0625, 0.1, 0.15):
            crops = np.stack([_relative_crop(f, d, margin, clf.size) for f, d in zip(frames, dets)])
            row[f"relative_margin_{margin:g}"] = _r((clf.classify(crops).argmax(1) == y).mean())
        own = prepare_gray([data.images[i] for i in idx], size=clf.size)
        row["image_own_framing"] = _r((clf.classify(own).argmax(1) == y).mean())
        rows.append(row)
    return rows


def _batch8_ms(clf: EmotionClassifier, data: Dataset, repeats: int = 200) -> dict[str, float]:
    """ONNX Runtime CPU, 1 thread: one call on a batch of 8 faces (the edge budget), p50 and p90."""
    x = prepare_gray(data.images[:8], size=clf.size)
    x = np.resize(x, (8, *x.shape[1:])) if len(x) < 8 else x
    for _ in range(20):
        clf.classify(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf.classify(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"p50": _r(np.percentile(ts, 50)), "p90": _r(np.percentile(ts, 90))}


def score_model(data: Dataset, models_dir: Path, name: str) -> tuple[EmotionClassifier, dict[str, Any]]:
    """One manifest model on the images with the product's preprocessing: scores, tag, size, latency."""
    clf = _classifier(models_dir, name)
    x = prepare_gray(data.images, size=clf.size)
    t0 = time.perf_counter()
    probs = clf.classify(x)
    ms = (time.perf_counter() - t0) * 1e3 / len(data.images)
    out = report(data.labels, probs.argmax(axis=1), data.clean)
    entry = load_manifest(models_dir).entry(name)
    out.update({"model": entry.tag, "input_side": clf.size, "onnx_bytes": entry.output.bytes,
                "runtime": "onnxruntime CPU, 1 thread", "preprocessing": PRODUCT_PREPROCESSING,
                "ms_per_image_batched": _r(ms), "ms_batch8_1thread": _batch8_ms(clf, data)})
    return clf, out


def evaluate_ours(data: Dataset, models_dir: Path, name: str = EMOTION_MODEL) -> dict[str, Any]:
    clf, out = score_model(data, models_dir, name)
    out["preprocessing_sweep"] = preprocessing_sweep(clf, data)
    det = BlazeFaceDetector(create_session(model_path(models_dir, DETECTOR_MODEL), ("cpu",), 1))
    out["detector_path"] = detector_path(clf, det, data)
    return out


def evaluate_alternatives(data: Dataset, models_dir: Path, product: str) -> dict[str, Any]:
    """Every other emotion model of the manifest, same images, same preprocessing, same run."""
    manifest = load_manifest(models_dir)
    return {name: score_model(data, models_dir, name)[1]
            for name, e in sorted(manifest.models.items()) if e.task == "emotion" and name != product}


# -- the fer peer -------------------------------------------------------------------------------------
def evaluate_fer(data: Dataset) -> tuple[dict[str, Any] | None, str]:
    peer, why = FerPeer.find()
    if peer is None:
        return None, why
    with peer:
        reply = peer.classify_crops([str(data.root / p) for p in data.paths])
    probs = reply["probs"]
    missing = [data.paths[i] for i, p in enumerate(probs) if p is None]
    if missing:
        return None, f"fer returned no face for {len(missing)} images (e.g. {missing[:3]}); not comparable"
    pred = np.array(probs, dtype=np.float32).argmax(axis=1)
    out = report(data.labels, pred, data.clean)
    whole = np.array(reply["probs_whole_rect"], dtype=np.float32).argmax(axis=1)
    whole_scores = scores(data.labels, whole)
    out.update({"classifier": "fer 25.10.3 FER() default: quantised TFLite mini-Xception",
                "face_rectangle": reply["rect"], "versions": peer.info["versions"],
                "rounded_prob_ties": reply["ties"], "ms_per_image": reply["ms_per_image"],
                "whole_image_rectangle": {
                    "note": "face_rectangles=[(0, 0, w, h)]: fer adds a 10 px grey band around the face",
                    "accuracy": whole_scores["accuracy"], "macro_f1": whole_scores["macro_f1"]}})
    return out, ""


def _ratio(a: float, b: float) -> float | None:
    return _r(a / b) if b else None


def _machine() -> dict[str, Any]:
    from appliance.ops.host import describe

    d = describe()
    return {"cpu": d["host_cpu"], "cores": d["cores"], "python": d["python"], "onnxruntime": d["onnxruntime"],
            "time_utc": d["time_utc"]}


# -- command ------------------------------------------------------------------------------------------
def run(data_dir: Path, json_out: Path | None = None, with_peer: bool = True,
        models_dir: Path = DEFAULT_MODELS_DIR, model: str | None = None) -> dict[str, Any]:
    """Evaluate ours (and fer unless with_peer is False) on DIR; print a summary; write JSON + Markdown.

    `model` names the manifest entry taken as "ours" (default: the product's, DEFAULT_EMOTION_MODEL).
    """
    verify_models(models_dir)
    model = model or EMOTION_MODEL
    data = load_dataset(Path(data_dir))
    result: dict[str, Any] = {
        "dataset": {"dir": str(Path(data_dir)), "n": len(data.paths),
                    "image_sides": sorted({int(max(img.shape[:2])) for img in data.images}),
                    "per_class": {lb: int((data.labels == i).sum()) for i, lb in enumerate(LABELS)},
                    "clean_n": int(data.clean.sum()) if data.clean is not None else None,
                    "clean_rule": f"images not listed in {IN_TRAIN}" if data.clean is not None else None},
        "machine": _machine(),
        "ours": evaluate_ours(data, models_dir, model),
        "ours_alternatives": evaluate_alternatives(data, models_dir, model),
    }
    fer, why = evaluate_fer(data) if with_peer else (None, "not asked for (--no-peer)")
    result["peers"] = {"fer": fer}
    if fer is None:
        result["peers_skipped"] = {"fer": why}
    else:
        ours = result["ours"]
        result["ratio_ours_over_fer"] = {"accuracy": _ratio(ours["accuracy"], fer["accuracy"]),
                                         "macro_f1": _ratio(ours["macro_f1"], fer["macro_f1"])}
        if "clean" in ours:
            result["ratio_ours_over_fer"].update({
                "clean_accuracy": _ratio(ours["clean"]["accuracy"], fer["clean"]["accuracy"]),
                "clean_macro_f1": _ratio(ours["clean"]["macro_f1"], fer["clean"]["macro_f1"])})
    md = markdown(result)
    print(md)
    if json_out is not None:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


def _fmt(x: Any) -> str:
    return "–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def markdown(r: dict[str, Any]) -> str:
    ours, fer = r["ours"], r["peers"]["fer"]
    d = r["dataset"]
    lines = [f"# Emotion classification: ours vs the `fer` package — `{d['dir']}`", "",
             f"{d['n']} images ({', '.join(f'{k} {v}' for k, v in d['per_class'].items())})"
             + (f"; clean subset ({d['clean_rule']}): {d['clean_n']}" if d["clean_n"] is not None else ""),
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['time_utc']}.", "",
             "| classifier | accuracy (95% CI) | macro-F1 | n | clean accuracy | clean macro-F1 | clean n |",
             "| --- | --- | --- | ---: | --- | --- | ---: |"]

    def row(name: str, s: dict[str, Any]) -> str:
        c = s.get("clean", {})
        ci = s["accuracy_ci95"]
        return (f"| {name} | {s['accuracy']:.3f} ({ci[0]:.3f}–{ci[1]:.3f}) | {s['macro_f1']:.3f} | {s['n']} | "
                f"{_fmt(c.get('accuracy'))} | {_fmt(c.get('macro_f1'))} | {_fmt(c.get('n'))} |")

    lines.append(row(f"ours ({ours['model']}, ONNX Runtime)", ours))
    for alt in r.get("ours_alternatives", {}).values():
        lines.append(row(f"our alternative ({alt['model']}, ONNX Runtime)", alt))
    speed = [f"{m['model'].split('@')[0]} {m['ms_batch8_1thread']['p50']:.2f} ms ({m['input_side']} px input, "
             f"{m['onnx_bytes'] / 1e6:.2f} MB)" for m in [ours, *r.get("ours_alternatives", {}).values()]
             if "ms_batch8_1thread" in m]
    if fer is not None:
        lines.append(row("fer 25.10.3 (quantised TFLite)", fer))
        ratio = r["ratio_ours_over_fer"]
        lines += ["", "Ratio ours / fer: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ratio.items()) + "."]
    else:
        lines += ["", f"**fer peer skipped:** {r['peers_skipped']['fer']}"]
    if speed:
        lines += ["", "ONNX Runtime CPU, 1 thread, one call for 8 faces (p50): " + "; ".join(speed) + "."]
    lines += ["", "## Per-class recall (95% Wilson interval), all images", "",
              "| class | n | ours | " + ("fer |" if fer else ""), "| --- | ---: | --- | " + ("--- |" if fer else "")]
    for label in LABELS:
        o = ours["per_class"][label]
        cell = f"{o['recall']:.2f} ({o['recall_ci95'][0]:.2f}–{o['recall_ci95'][1]:.2f})"
        extra = ""
        if fer:
            f = fer["per_class"][label]
            extra = f" {f['recall']:.2f} ({f['recall_ci95'][0]:.2f}–{f['recall_ci95'][1]:.2f}) |"
        lines.append(f"| {label} | {o['n']} | {cell} |{extra}")
    for name, s in (("ours", ours), ("fer", fer)):
        if s is None:
            continue
        lines += ["", f"## Confusion matrix, {name} (rows true, columns predicted)", "",
                  "| | " + " | ".join(LABELS) + " |", "| --- |" + " ---: |" * len(LABELS)]
        for label, counts in zip(LABELS, s["confusion"]):
            lines.append(f"| {label} | " + " | ".join(str(c) for c in counts) + " |")
    side = ours.get("input_side")
    same = side is not None and all(n == side for n in r["dataset"].get("image_sides", []))
    lines += ["", f"## Our preprocessing of the crop (product: {ours['preprocessing']})", ""]
    if same:
        lines += [f"The images already are {side}x{side} px, the model's input side: no resize happens, so the "
                  "resize methods below agree; flip averaging and the grey band still apply.", ""]
    lines += [
              "| resize | flip average | grey band px | accuracy | macro-F1 | clean accuracy |",
              "| --- | --- | ---: | --- | --- | --- |"]
    for s in ours["preprocessing_sweep"]:
        lines.append(f"| {s['resize']} | {'yes' if s['flip_average'] else 'no'} | {s['grey_band_px']} | "
                     f"{s['accuracy']:.3f} | {s['macro_f1']:.3f} | {_fmt(s.get('clean_accuracy'))} |")
    lines += ["", "## Through the detector (image enlarged in a larger frame -> BlazeFace -> crop)", "",
              "| face px | detected | fer-style crop (product) | margin 0 | margin 0.0625 | margin 0.1 | "
              "margin 0.15 | image's own framing |", "| ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for s in ours["detector_path"]:
        if not s.get("detected"):
            lines.append(f"| {s['face_px']} | 0 | | | | | | |")
            continue
        lines.append(f"| {s['face_px']} | {s['detected']}/{s['of']} | {s['product_crop_fer_style']:.3f} | "
                     f"{s['relative_margin_0']:.3f} | {s['relative_margin_0.0625']:.3f} | "
                     f"{s['relative_margin_0.1']:.3f} | {s['relative_margin_0.15']:.3f} | "
                     f"{s['image_own_framing']:.3f} |")
    if fer is not None:
        w = fer["whole_image_rectangle"]
        lines += ["", f"fer with the whole image as its face rectangle (its 10 px offsets then add a grey band): "
                  f"accuracy {w['accuracy']:.3f}, macro-F1 {w['macro_f1']:.3f}. The figures above give fer "
                  f"the rectangle {fer['face_rectangle']}. Ties among fer's rounded probabilities: "
                  f"{fer['rounded_prob_ties']}."]
    return "\n".join(lines) + "\n"
