"""Our emotion networks recomputed from their original PyTorch checkpoints without PyTorch (numpy, float64).

The box and CI have no torch, yet the ONNX files we ship must be checked against the weights they were
exported from on every test run. A `.pt` state dict is a zip of one pickle plus raw little-endian storages;
reading it needs only a restricted unpickler that turns `torch._utils._rebuild_tensor_v2` into a numpy view.
The forward pass mirrors `train_emotion.build_model(arch="vgg")` in eval mode (BatchNorm with running
statistics, dropout off) and `export_wrapper` (NHWC input, logit shift, softmax).
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
           "LongStorage": np.int64, "IntStorage": np.int32, "BoolStorage": np.bool_}
BN_EPS = 1e-5  # torch.nn.BatchNorm2d default


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_ignored) -> np.ndarray:
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * storage.itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str) -> None:  # noqa: ANN001
        super().__init__(fh)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):  # noqa: ANN201 - only what a state dict needs
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _DTYPES:
            return name
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a state dict")

    def persistent_load(self, pid):  # noqa: ANN001, ANN201
        kind, storage_type, key, _location, _numel = pid
        assert kind == "storage"
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=np.dtype(_DTYPES[storage_type]).newbyteorder("<"))


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A `torch.save(state_dict)` file -> {name: numpy array}, without importing torch."""
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        with archive.open(pkl) as fh:
            state = _Unpickler(fh, archive, prefix).load()
    return {k: np.asarray(v) for k, v in state.items()}


def _conv3x3(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """NHWC x, OIHW w, padding 1, no bias."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    win = sliding_window_view(xp, (3, 3), axis=(1, 2))[:, ::stride, ::stride]  # N, H', W', C, 3, 3
    n, h, wd = win.shape[:3]
    cols = np.ascontiguousarray(win).reshape(n * h * wd, -1)
    return (cols @ w.reshape(w.shape[0], -1).T).reshape(n, h, wd, w.shape[0])


def _maxpool2(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def vgg_probs(state: dict[str, np.ndarray], widths: tuple[int, ...], stem: str, x_nhwc: np.ndarray,
              logit_shift: np.ndarray) -> np.ndarray:
    """softmax(EmotionCNN(x) + shift) in float64, walking the layers in build_model's order."""
    p = {k: v.astype(np.float64) for k, v in state.items()}
    x = x_nhwc.astype(np.float64)
    k = 0  # index into the nn.Sequential, as build_model appends layers
    for si, _w in enumerate(widths):
        for j in range(2):
            first = si == 0 and j == 0
            x = _conv3x3(x, p[f"features.{k}.weight"], 2 if (first and stem == "stride") else 1)
            g, b = p[f"features.{k + 1}.weight"], p[f"features.{k + 1}.bias"]
            mean, var = p[f"features.{k + 1}.running_mean"], p[f"features.{k + 1}.running_var"]
            x = np.maximum((x - mean) / np.sqrt(var + BN_EPS) * g + b, 0.0)
            k += 3
            if first and stem == "pool":
                x = _maxpool2(x)
                k += 1
        if si < len(widths) - 1:
            x = _maxpool2(x)
            k += 1
    z = x.mean(axis=(1, 2)) @ p["fc.weight"].T + p["fc.bias"] + logit_shift.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
