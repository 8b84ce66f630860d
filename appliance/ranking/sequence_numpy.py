"""The sequence encoder's forward pass in numpy, with the weights of the bundle's own `sequence.onnx`.

Why not ONNX Runtime in the ranker: importing it and opening one session costs the ranker process ~40 MB
of resident memory (its 27 MB library, kernel registries, an arena), a fifth of the box's 180 MB ranker
budget, to run a 2-block, d = 64 encoder once per new event. The graph is ours (`seqmodel.SASRec`), so its
forward pass is a few matrix products here. ONNX Runtime stays the reference: `SequenceModel` can run on
it (`runtime="onnxruntime"`), and the tests hold the two within the bundle's parity tolerance.

The weights are read from the ONNX file with protobuf (the box has no `onnx` package): private messages
with ONNX's field numbers for the few fields used (unknown fields are skipped). Layers are found by the
names `torch.onnx.export` gives them (initializers such as `blocks.0.ln1.weight`; the transposed Linear
weights are the second input of the MatMul nodes named `/blocks.0/qkv/MatMul`...). A graph that does not
have exactly the expected layers with the expected shapes is a ModelError, never a silent misreading.

Only what the query needs is computed: the real (non-padding) positions, because a real position never
attends to padding and padding is zeroed after every block (see `SASRec.encode`), and in the last block
only the newest position's feed-forward.

One history's query (`query`, what the ranker calls on every event batch) runs as one C call when the build
compiled `_seqcore.c` (the same pass, with the GIL released: as ~60 numpy calls it held the GIL long enough
to queue the gRPC threads under load); batches (`batch`: evaluation, tests) and boxes without the module run
the numpy pass below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from appliance.errors import ModelError
from appliance.ranking.native import load as load_native

_F = descriptor_pb2.FieldDescriptorProto


def _onnx_subset() -> type:
    """ModelProto > GraphProto > NodeProto / TensorProto / AttributeProto, only the fields read here
    (field numbers from onnx/onnx.proto)."""
    f = descriptor_pb2.FileDescriptorProto(name="appliance/internal/onnx_subset.proto",
                                           package="appliance.internal.onnx", syntax="proto2")

    def msg(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = f".appliance.internal.onnx.{type_name}"

    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    msg("Tensor", [("dims", 1, _F.TYPE_INT64, rep, ""), ("data_type", 2, _F.TYPE_INT32, opt, ""),
                   ("float_data", 4, _F.TYPE_FLOAT, rep, ""), ("name", 8, _F.TYPE_STRING, opt, ""),
                   ("raw_data", 9, _F.TYPE_BYTES, opt, "")])
    msg("Attribute", [("name", 1, _F.TYPE_STRING, opt, ""), ("f", 2, _F.TYPE_FLOAT, opt, ""),
                      ("i", 3, _F.TYPE_INT64, opt, "")])
    msg("Node", [("input", 1, _F.TYPE_STRING, rep, ""), ("output", 2, _F.TYPE_STRING, rep, ""),
                 ("name", 3, _F.TYPE_STRING, opt, ""), ("op_type", 4, _F.TYPE_STRING, opt, ""),
                 ("attribute", 5, _F.TYPE_MESSAGE, rep, "Attribute")])
    msg("Graph", [("node", 1, _F.TYPE_MESSAGE, rep, "Node"), ("initializer", 5, _F.TYPE_MESSAGE, rep, "Tensor")])
    msg("Model", [("graph", 7, _F.TYPE_MESSAGE, opt, "Graph")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("appliance.internal.onnx.Model"))


_Model = _onnx_subset()  # built once, at import


_FLOAT = 1  # TensorProto.DataType.FLOAT
_INV_SQRT2, _P = np.float32(1 / math.sqrt(2.0)), np.float32(0.3275911)
_A1, _A2, _A3, _A4, _A5 = (np.float32(c) for c in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


def _array(t) -> np.ndarray:  # noqa: ANN001 - a Tensor message
    if t.data_type != _FLOAT:
        raise ModelError(f"initializer {t.name}: data type {t.data_type}, float32 expected")
    a = np.frombuffer(t.raw_data, dtype="<f4") if t.raw_data else np.asarray(t.float_data, dtype=np.float32)
    shape = tuple(int(d) for d in t.dims)
    if a.size != math.prod(shape):
        raise ModelError(f"initializer {t.name}: {a.size} values for shape {shape}")
    return a.reshape(shape).astype(np.float32)  # a copy: the message's buffer is not kept


@dataclass(frozen=True)
class _Block:
    ln1: tuple[np.ndarray, np.ndarray]
    qkv: tuple[np.ndarray, np.ndarray]   # W [d, 3d] (x @ W), b [3d]
    proj: tuple[np.ndarray, np.ndarray]
    ln2: tuple[np.ndarray, np.ndarray]
    ff0: tuple[np.ndarray, np.ndarray]
    ff3: tuple[np.ndarray, np.ndarray]


class NumpySasrec:
    """`seqmodel.SASRec.forward` for one history at a time (`query`) or a left-padded batch (`batch`).
    `native=False`: `query` runs the numpy pass even where the C one is built (tests compare the two)."""

    def __init__(self, onnx_path: Path, max_len: int, heads: int, native: bool = True) -> None:
        try:
            model = _Model.FromString(Path(onnx_path).read_bytes())
        except OSError as exc:
            raise ModelError(f"{onnx_path}: cannot read the sequence model: {exc.strerror or exc}") from None
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: not an ONNX file
            raise ModelError(f"{onnx_path}: not an ONNX model") from None
        g = model.graph
        init = {t.name: t for t in g.initializer}
        matmul_w: dict[str, str] = {}  # layer ("blocks.0.qkv") -> initializer holding its [in, out] weight
        eps: set[float] = set()
        for n in g.node:
            if n.op_type == "MatMul" and n.name.endswith("/MatMul") and len(n.input) == 2 and n.input[1] in init:
                matmul_w[n.name[1:-len("/MatMul")].replace("/", ".").replace("ff.ff.", "ff.")] = n.input[1]
            elif n.op_type == "LayerNormalization":
                eps.update(a.f for a in n.attribute if a.name == "epsilon")
        if len(eps) != 1:
            raise ModelError(f"{onnx_path}: expected LayerNormalization nodes with one epsilon, got {sorted(eps)}")
        self.eps = float(eps.pop())

        def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
            t = init.get(name)
            if t is None:
                raise ModelError(f"{onnx_path}: the sequence graph has no {name!r} (not a seqmodel.SASRec export)")
            a = _array(t)
            if shape is not None and a.shape != shape:
                raise ModelError(f"{onnx_path}: {name} has shape {a.shape}, expected {shape}")
            return a

        def weight(layer: str, shape: tuple[int, int]) -> np.ndarray:
            if layer not in matmul_w:
                raise ModelError(f"{onnx_path}: the sequence graph has no MatMul for {layer!r}")
            return get(matmul_w[layer], shape)

        item = get("item.weight")
        if item.ndim != 2:
            raise ModelError(f"{onnx_path}: item.weight has shape {item.shape}")
        d = item.shape[1]
        if d % heads:
            raise ModelError(f"{onnx_path}: d = {d} is not a multiple of heads = {heads}")
        self.d, self.heads, self.max_len = d, heads, int(max_len)
        self.item = item
        self.pos = get("pos.weight", (self.max_len, d))
        self.blocks: list[_Block] = []
        b = 0
        while f"blocks.{b}.ln1.weight" in init:
            p = f"blocks.{b}"
            vec = (d,)
            self.blocks.append(_Block(
                ln1=(get(f"{p}.ln1.weight", vec), get(f"{p}.ln1.bias", vec)),
                qkv=(weight(f"{p}.qkv", (d, 3 * d)), get(f"{p}.qkv.bias", (3 * d,))),
                proj=(weight(f"{p}.proj", (d, d)), get(f"{p}.proj.bias", vec)),
                ln2=(get(f"{p}.ln2.weight", vec), get(f"{p}.ln2.bias", vec)),
                ff0=(weight(f"{p}.ff.0", (d, d)), get(f"{p}.ff.0.bias", vec)),
                ff3=(weight(f"{p}.ff.3", (d, d)), get(f"{p}.ff.3.bias", vec))))
            b += 1
        if not self.blocks:
            raise ModelError(f"{onnx_path}: the sequence graph has no transformer blocks")
        self.ln = (get("ln.weight", (d,)), get("ln.bias", (d,)))
        self.n_items = item.shape[0] - 1
        self._scale = np.float32(math.sqrt(d))
        self._att_scale = np.float32(1.0 / math.sqrt(d // heads))
        self._inv_d = np.float32(1.0 / d)
        self._eps = np.float32(self.eps)
        self._core = load_native("_seqcore") if native else None
        if self._core is not None:  # every block's parameters in one array, in _seqcore.c's order
            self._packed = np.concatenate([np.concatenate([a.ravel() for pair in (
                blk.ln1, blk.qkv, blk.proj, blk.ln2, blk.ff0, blk.ff3) for a in pair]) for blk in self.blocks])
            self._final_ln = np.concatenate(self.ln)

    @property
    def native(self) -> bool:
        """Whether `query` runs the C pass."""
        return self._core is not None

    # -- forward ---------------------------------------------------------------------------------------------
    def _layer_norm(self, x: np.ndarray, wb: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        c = x - np.add.reduce(x, axis=-1, keepdims=True) * self._inv_d  # (ndarray.mean: 3x the overhead)
        var = np.add.reduce(c * c, axis=-1, keepdims=True) * self._inv_d
        c *= (var + self._eps) ** np.float32(-0.5)
        c *= wb[0]
        c += wb[1]
        return c

    @staticmethod
    def _gelu(x: np.ndarray) -> np.ndarray:
        """x * Phi(x), erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, float32's resolution; numpy has
        no erf)."""
        a = np.abs(x) * _INV_SQRT2
        t = 1.0 / (1.0 + _P * a)
        poly = t * (_A1 + t * (_A2 + t * (_A3 + t * (_A4 + t * _A5))))
        half_erf = (0.5 - 0.5 * poly * np.exp(-a * a)) * np.sign(x)   # erf(x / sqrt 2) / 2
        return x * (half_erf + 0.5)

    def _attend(self, x: np.ndarray, blk: _Block, allowed: np.ndarray, rows: slice) -> np.ndarray:
        """x [b, n, d] -> x + attention(LN1(x)) for the query positions `rows` ([b, len(rows), d])."""
        bsz, n, d = x.shape
        h, dh = self.heads, d // self.heads
        qkv = self._layer_norm(x, blk.ln1) @ blk.qkv[0] + blk.qkv[1]                     # [b, n, 3d]
        q = qkv[:, rows, :d].reshape(bsz, -1, h, dh).transpose(0, 2, 1, 3)                # [b, h, m, dh]
        k = qkv[:, :, d:2 * d].reshape(bsz, n, h, dh).transpose(0, 2, 3, 1)              # [b, h, dh, n]
        v = qkv[:, :, 2 * d:].reshape(bsz, n, h, dh).transpose(0, 2, 1, 3)               # [b, h, n, dh]
        att = (q @ k) * self._att_scale                                                   # [b, h, m, n]
        att = np.where(allowed[:, None, rows, :], att, np.float32(-np.inf))
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(bsz, -1, d)                           # [b, m, d]
        return x[:, rows] + (y @ blk.proj[0] + blk.proj[1])

    def _forward(self, idx: np.ndarray) -> np.ndarray:
        """idx [b, n] (catalog row + 1, left-padded with 0, n <= max_len) -> the newest position's query [b, d]."""
        bsz, n = idx.shape
        keep = (idx > 0)[:, :, None].astype(np.float32)
        x = (self.item[idx] * self._scale + self.pos[self.max_len - n:]) * keep
        pos = np.arange(n)
        allowed = ((pos[None, :] <= pos[:, None])[None] & (idx > 0)[:, None, :]) | (pos[None, :] == pos[:, None])[None]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            rows = slice(n - 1, n) if i == last else slice(0, n)  # the last block: the newest position only
            x = self._attend(x, blk, allowed, rows)
            x = (x + (self._gelu(self._layer_norm(x, blk.ln2) @ blk.ff0[0] + blk.ff0[1]) @ blk.ff3[0]
                      + blk.ff3[1])) * keep[:, rows]
        return self._layer_norm(x[:, -1], self.ln).astype(np.float32)

    def query(self, rows: np.ndarray) -> np.ndarray:
        """The query [d] after a history of catalog rows (oldest first, at most max_len, all known)."""
        if self._core is not None:
            idx = np.asarray(rows, dtype=np.int64) + 1 if len(rows) else np.zeros(1, dtype=np.int64)
            out = np.empty(self.d, dtype=np.float32)
            self._core.query(self.item, self.pos, self._packed, self._final_ln, idx, out, self.heads, self.eps)
            return out
        if len(rows) == 0:  # everything padding: the final LayerNorm of zeros is its bias
            return self._forward(np.zeros((1, 1), dtype=np.int64))[0]
        return self._forward((np.asarray(rows, dtype=np.int64) + 1)[None, :])[0]

    def batch(self, x: np.ndarray) -> np.ndarray:
        """[b, max_len] left-padded (row + 1) -> [b, d], as the ONNX graph's input and output."""
        x = np.asarray(x, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.max_len:
            raise ValueError(f"expected [batch, {self.max_len}], got {x.shape}")
        if (x < 0).any() or (x > self.n_items).any():
            raise ValueError("item index outside 0..n_items")
        first = int(np.argmax((x > 0).any(axis=0))) if (x > 0).any() else self.max_len - 1
        return self._forward(x[:, first:]) if len(x) else np.zeros((0, self.d), np.float32)
