"""SASRec-style sequence model: the PyTorch definition (training only) and its ONNX export.

Never imported on the box: the box runs `sequence.onnx` with ONNX Runtime (appliance/ranking/sequence.py).

Architecture (Kang & McAuley 2018, with the full-softmax cross-entropy loss of Klenitskiy & Vasilev 2023
"Turning dross into gold loss: is BERT4Rec really better than SASRec?"):
- input: the last `max_len` item indices of a history, LEFT-padded with 0 (index = catalog row + 1);
- x = E[item] * sqrt(d) + P[position]; dropout;
- `blocks` pre-LayerNorm blocks: causal multi-head self-attention (a query sees itself and earlier
  non-padding items) + a position-wise feed-forward (d -> d, GELU), both residual;
- final LayerNorm; the output at each position is the "next item" query h_t;
- logits = h_t @ E[1:]^T (item embeddings tied between input and output).

Attention is written out (not nn.MultiheadAttention) so the ONNX graph is plain MatMul/Softmax ops that
any ONNX Runtime build runs, and masks use a large negative number rather than -inf (no NaN paths).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

NEG = -1e9


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.reshape(b, n, h, d // h).transpose(1, 2)
        k = k.reshape(b, n, h, d // h).transpose(1, 2)
        v = v.reshape(b, n, h, d // h).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d // h)) + bias  # bias: [b, 1, n, n]
        att = self.drop(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, n_items: int, d: int = 64, max_len: int = 50, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.n_items, self.d, self.max_len = n_items, d, max_len
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d, heads, dropout) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.item.weight, std=1.0 / math.sqrt(d))
        with torch.no_grad():
            self.item.weight[0].zero_()
        nn.init.normal_(self.pos.weight, std=0.02)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """[b, n] int64 (left-padded, n <= max_len) -> [b, n, d]."""
        b, n = seq.shape
        keep = (seq > 0).unsqueeze(-1).to(self.item.weight.dtype)
        pos = torch.arange(self.max_len - n, self.max_len, device=seq.device)
        x = self.item(seq) * math.sqrt(self.d) + self.pos(pos).unsqueeze(0)
        x = self.drop(x) * keep
        idx = torch.arange(n, device=seq.device)
        causal = idx.unsqueeze(0) <= idx.unsqueeze(1)                       # [n(q), n(k)]
        allowed = causal.unsqueeze(0) & (seq > 0).unsqueeze(1)             # [b, q, k]
        allowed = allowed | (idx.unsqueeze(0) == idx.unsqueeze(1)).unsqueeze(0)  # always itself: no empty row
        bias = torch.where(allowed, 0.0, NEG).unsqueeze(1).to(x.dtype)     # [b, 1, q, k]
        for blk in self.blocks:
            x = blk(x, bias) * keep
        return self.ln(x)

    def item_table(self) -> torch.Tensor:
        """[n_items, d]: the output embedding of catalog rows 0..n-1 (tied to the input embedding)."""
        return self.item.weight[1:]

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """What the box runs: [b, max_len] left-padded -> [b, d], the query after the newest item."""
        return self.encode(seq)[:, -1, :]


def left_pad(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """Last `max_len` items of each history as catalog-row + 1, left-padded with 0."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for j, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-max_len:]
        if len(h):
            out[j, max_len - len(h):] = h + 1
    return out


def export_onnx(model: SASRec, path: Path, atol: float = 1e-4, n_check: int = 64,
                seed: int = 0) -> dict[str, float]:
    """Export `forward` (opset 17, dynamic batch) and check ONNX Runtime against torch.

    Parity: on `n_check` random left-padded sequences (lengths 0..max_len, the empty one included) the
    max absolute difference of the outputs must be <= atol (outputs are O(1) after the final LayerNorm).
    Returns the measured differences; raises if parity fails.
    """
    import onnxruntime as ort

    model = model.eval()
    dummy = torch.zeros((1, model.max_len), dtype=torch.int64)
    dummy[0, -3:] = torch.tensor([1, 2, 3])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (dummy,), str(path), input_names=["items"], output_names=["query"],
                      dynamic_axes={"items": {0: "batch"}, "query": {0: "batch"}}, opset_version=17,
                      dynamo=False, do_constant_folding=True)
    rng = np.random.default_rng(seed)
    lens = np.r_[0, 1, model.max_len, rng.integers(0, model.max_len + 1, n_check - 3)]
    hist = [rng.integers(0, model.n_items, int(n)) for n in lens]
    x = left_pad(hist, model.max_len)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"items": x[i:i + 1]})[0] for i in range(len(x))])
    diff = float(np.abs(got - want).max())
    if not diff <= atol:
        raise RuntimeError(f"ONNX parity failed: max |onnx - torch| = {diff:.3g} > {atol}")
    return {"max_abs_diff": diff, "atol": atol, "sequences": int(len(x))}
