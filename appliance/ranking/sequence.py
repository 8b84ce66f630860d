"""The box's side of the sequence model: the encoder (numpy or ONNX Runtime) + numpy scoring.

`sequence.onnx` maps the household's recent titles (catalog row + 1, left-padded to `max_len`, newest
last) to a query vector q (d floats). A title's sequence score is <q, e_title> with e_title its row of
`sequence_items.npy`; only the candidates' rows are touched, so scoring 1,000 candidates is one small
gather + mat-vec. Titles the model never saw in training have a zero row and get no sequence evidence
(`known` is False; the ranker gives them a neutral sequence term).

The encoder runs once per distinct history: the result is cached (LRU keyed by the history's bytes), so
ranking again after no new event costs no inference, and a new event costs one forward pass. The box's
ranker runs the ONNX file's weights in our own pass (`runtime="numpy"`, its config's default:
`sequence_numpy`, one C call per history where built, numpy otherwise), which saves it ~40 MB of ONNX
Runtime; `runtime="onnxruntime"` runs the graph on ONNX Runtime: the reference, which the tests and the
offline tools (evaluation, federation) use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from appliance.errors import ModelError

CACHE_SIZE = 4096
RUNTIMES = ("numpy", "onnxruntime")


class SequenceModel:
    def __init__(self, onnx_path: Path, item_table: np.ndarray, max_len: int, heads: int = 1,
                 runtime: str = "onnxruntime", threads: int = 1) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"sequence runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.runtime = runtime
        self.max_len = int(max_len)
        self.table = np.ascontiguousarray(item_table, dtype=np.float32)  # [n_bundle_items, d]
        self.known = np.linalg.norm(self.table, axis=1) > 0
        self.dim = int(self.table.shape[1])
        self.session = self._numpy = None
        if runtime == "numpy":
            from appliance.ranking.sequence_numpy import NumpySasrec

            self._numpy = NumpySasrec(onnx_path, self.max_len, heads)
            if self._numpy.d != self.dim or self._numpy.n_items != len(self.table):
                raise ModelError(f"{onnx_path}: the encoder's item table ({self._numpy.n_items} x {self._numpy.d})"
                                 f" does not match sequence_items.npy {self.table.shape}")
        else:
            self._open_onnxruntime(onnx_path, threads)
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.calls = 0

    def _open_onnxruntime(self, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{onnx_path}: cannot load the sequence model: {exc}") from None
        inp = self.session.get_inputs()
        if len(inp) != 1 or inp[0].shape[-1] != self.max_len:
            raise ModelError(f"{onnx_path}: expected one input [batch, {self.max_len}], got "
                             f"{[(i.name, i.shape) for i in inp]}")
        self.input_name = inp[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        """[b, max_len] left-padded (row + 1) -> [b, d] float32."""
        if self._numpy is not None:
            return self._numpy.batch(x)
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32)

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """Query vector for a history given as BUNDLE rows (oldest first; rows of unseen titles dropped)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self.known[rows]][-self.max_len:] if len(rows) else rows
        key = rows.tobytes()  # 8 bytes a title: a fifth of a tuple of ints' memory in a full cache
        with self._lock:
            q = self._cache.get(key)
            if q is not None:
                self._cache.move_to_end(key)
                return q
        if self._numpy is not None:  # the real positions only (the same query: see sequence_numpy)
            q = self._numpy.query(rows)
        else:
            x = np.zeros((1, self.max_len), dtype=np.int64)
            if len(rows):
                x[0, self.max_len - len(rows):] = rows + 1
            q = self._run(x)[0]
        with self._lock:
            self.calls += 1
            self._cache[key] = q
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return q

    def encode_batch(self, histories: list[np.ndarray]) -> np.ndarray:
        """Uncached batch encoding (evaluation and tests): [len(histories), d]."""
        x = np.zeros((len(histories), self.max_len), dtype=np.int64)
        for j, rows in enumerate(histories):
            rows = np.asarray(rows, dtype=np.int64)
            rows = rows[self.known[rows]][-self.max_len:] if len(rows) else rows
            if len(rows):
                x[j, self.max_len - len(rows):] = rows + 1
        return self._run(x)
