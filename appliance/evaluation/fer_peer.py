"""The `fer` package (PyPI `fer==25.10.3`) as a peer, run in its own virtual environment.

`fer` needs TensorFlow and opencv-contrib-python, which must never be installed beside the appliance
(they would replace our cv2 and pin another protobuf), so `make peers` puts it in `.venv-peers` and we
talk to it through this module run as a worker subprocess with that venv's Python: one JSON request
per line on stdin, one JSON reply per line on stdout. Both sides live in this one file:

- `FerPeer` (client, imported by `appliance eval emotion` and `python -m bench vision`), and
- `serve()` (worker, `.venv-peers/bin/python appliance/evaluation/fer_peer.py`), which imports only the
  standard library, numpy, cv2 and fer, never the appliance package.

When `.venv-peers` is missing, `FerPeer.find()` returns None with the reason; callers report the peer
as skipped and never make its figures up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON_ENV = "APPLIANCE_PEERS_PYTHON"
DEFAULT_PEERS_VENV = REPO_ROOT / ".venv-peers"
FER_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


# ------------------------------------------------------------------------------------------------------
# client
# ------------------------------------------------------------------------------------------------------
class PeerError(RuntimeError):
    """The peer worker failed or answered something we cannot read."""


def peers_python() -> tuple[Path | None, str]:
    """(the peers venv's python, "") or (None, why not)."""
    env = os.environ.get(PEERS_PYTHON_ENV)
    exe = Path(env) if env else DEFAULT_PEERS_VENV / "bin" / "python"
    if not exe.exists():
        where = f"${PEERS_PYTHON_ENV}={env}" if env else str(DEFAULT_PEERS_VENV)
        return None, f"the fer peer is not installed ({where} not found); run `make peers` to compare with it"
    return exe, ""


class FerPeer:
    """A running fer worker. Use as a context manager; every call is one request/reply round trip."""

    def __init__(self, python: Path, timeout_s: float = 900.0) -> None:
        self.python = Path(python)
        self.timeout_s = timeout_s
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # the worker must not import our venv's packages
        self.proc = subprocess.Popen([str(self.python), "-I", str(Path(__file__).resolve())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, env=env, cwd=str(REPO_ROOT))
        self._stderr: list[str] = []
        import threading

        self._drain = threading.Thread(target=self._read_stderr, daemon=True, name="fer-peer-stderr")
        self._drain.start()
        self.info: dict[str, Any] = self.call({"cmd": "hello"})

    @classmethod
    def find(cls) -> tuple[FerPeer | None, str]:
        """Start the worker if the peers venv exists: (peer, "") or (None, why it is skipped)."""
        exe, why = peers_python()
        if exe is None:
            return None, why
        try:
            return cls(exe), ""
        except PeerError as exc:
            return None, f"the fer peer did not start: {exc}"

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr = (self._stderr + [line.rstrip()])[-30:]

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise PeerError(f"fer worker exited with code {self.proc.returncode}: {self.stderr_tail()}")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise PeerError(f"fer worker is gone: {self.stderr_tail()}") from None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise PeerError(f"fer worker exited with code {self.proc.returncode}: {self.stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"fer worker: {reply['error']}")
        return reply

    def stderr_tail(self) -> str:
        return " | ".join(s for s in self._stderr[-8:] if s.strip())[-1500:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except Exception:  # noqa: BLE001 - shutting down: make sure it is gone
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> FerPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------------
    def classify_crops(self, paths: list[str]) -> dict[str, Any]:
        """fer's own classifier on images that already are face crops (see `_classify_crops`)."""
        return self.call({"cmd": "classify_crops", "paths": [str(p) for p in paths]})

    def video(self, path: str, max_frames: int = 0) -> dict[str, Any]:
        """FER() with default arguments (Haar detector + quantised TFLite classifier) on every frame."""
        return self.call({"cmd": "video", "path": str(path), "max_frames": int(max_frames)})


# ------------------------------------------------------------------------------------------------------
# worker (runs in .venv-peers; standard library, numpy, cv2 and fer only)
# ------------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _percentiles(ms: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4), "max_ms": round(float(a.max()), 4)}


class _Worker:
    def __init__(self) -> None:
        import cv2
        from fer.fer import FER

        self.cv2 = cv2
        t0 = time.perf_counter()
        self.fer = FER()  # default arguments: Haar cascade + quantised TFLite classifier, offsets (10, 10)
        self.load_s = time.perf_counter() - t0
        from importlib.metadata import version

        self.versions = {name: version(name) for name in ("fer", "tensorflow", "opencv-contrib-python", "numpy")}

    def hello(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"versions": self.versions, "load_s": round(self.load_s, 3),
                "labels": [self.fer._get_labels()[i] for i in range(7)]}

    def classify_crops(self, req: dict[str, Any]) -> dict[str, Any]:
        """fer.detect_emotions with a given face rectangle on each image, which already is a face crop.

        fer grows every rectangle by its offsets (10 px each side) after padding the gray image by 40 px
        with the mean of its bottom rows (fer/fer.py, FER.detect_emotions and __apply_offsets). Passing the
        whole image (0, 0, w, h) would therefore feed the classifier a crop with a 10 px band of flat grey
        around the face, which it was not trained on. We pass (10, 10, w - 20, h - 20) instead, so that,
        after fer's own offsets, the crop is exactly the whole image, as its training images were framed.
        The "whole image as rectangle" variant is measured too and reported beside it.

        fer rounds each probability to 2 decimals in its answer; top-1 is taken from those as fer reports
        them (ties are counted and reported).
        """
        cv2 = self.cv2
        ox, oy = 10, 10  # FER() default offsets
        out: dict[str, list] = {"probs": [], "probs_whole_rect": [], "ms": []}
        ties = 0
        for path in req["paths"]:
            img = cv2.imread(path, cv2.IMREAD_COLOR)  # fer converts BGR -> gray itself
            if img is None:
                return {"error": f"cannot read image {path}"}
            h, w = img.shape[:2]
            t0 = time.perf_counter()
            res = self.fer.detect_emotions(img, face_rectangles=[(ox, oy, w - 2 * ox, h - 2 * oy)])
            out["ms"].append((time.perf_counter() - t0) * 1e3)
            whole = self.fer.detect_emotions(img, face_rectangles=[(0, 0, w, h)])
            probs = [res[0]["emotions"][label] for label in FER_LABELS] if res else None
            out["probs"].append(probs)
            out["probs_whole_rect"].append([whole[0]["emotions"][lb] for lb in FER_LABELS] if whole else None)
            if probs is not None and sorted(probs)[-1] == sorted(probs)[-2]:
                ties += 1
        return {"probs": out["probs"], "probs_whole_rect": out["probs_whole_rect"], "ties": ties,
                "ms_per_image": _percentiles(out["ms"]), "peak_rss_mb": _peak_rss_mb(),
                "rect": "(10, 10, w-20, h-20): after fer's 10 px offsets the crop is the whole image"}

    def video(self, req: dict[str, Any]) -> dict[str, Any]:
        """FER().detect_emotions on every decoded frame of a video; decode timed apart from analysis."""
        cv2 = self.cv2
        cap = cv2.VideoCapture(req["path"])
        if not cap.isOpened():
            return {"error": f"cannot open video {req['path']}"}
        limit = int(req.get("max_frames") or 0)
        decode_ms: list[float] = []
        analyse_ms: list[float] = []
        faces: list[int] = []
        t_all = time.perf_counter()
        while limit <= 0 or len(analyse_ms) < limit:
            t0 = time.perf_counter()
            ok, frame = cap.read()
            t1 = time.perf_counter()
            if not ok:
                break
            result = self.fer.detect_emotions(frame)
            t2 = time.perf_counter()
            decode_ms.append((t1 - t0) * 1e3)
            analyse_ms.append((t2 - t1) * 1e3)
            faces.append(len(result))
        wall = time.perf_counter() - t_all
        cap.release()
        n = len(analyse_ms)
        if n == 0:
            return {"error": f"no frame decoded from {req['path']}"}
        total = [a + b for a, b in zip(decode_ms, analyse_ms)]
        return {"frames": n, "fps": round(n / (sum(analyse_ms) / 1e3), 3),
                "fps_with_decode": round(n / wall, 3),
                "latency_ms": _percentiles(analyse_ms), "latency_with_decode_ms": _percentiles(total),
                "decode_ms": _percentiles(decode_ms),
                "faces_per_frame": round(sum(faces) / n, 4), "frames_with_face": sum(1 for f in faces if f),
                "peak_rss_mb": _peak_rss_mb(), "model_load_s": round(self.load_s, 3),
                "config": "FER() defaults: Haar cascade (scale 1.1, 5 neighbours, min 50 px) + quantised "
                          "TFLite mini-Xception; TensorFlow's default thread pools"}


def serve() -> int:
    # Keep the protocol channel clean: anything a library prints (C or Python) goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        worker = _Worker()
    except Exception as exc:  # noqa: BLE001 - report why, then exit
        proto.write(json.dumps({"error": f"cannot load fer: {type(exc).__name__}: {exc}"}) + "\n")
        return 1
    handlers = {"hello": worker.hello, "classify_crops": worker.classify_crops, "video": worker.video}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            handler = handlers.get(req.get("cmd"))
            reply = handler(req) if handler else {"error": f"unknown cmd {req.get('cmd')!r}"}
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the session
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(serve())
