"""Interactions file -> the exact leave-last-out split of issue 6.

Protocol (every step is literal):
- every row of `userId,movieId,rating,timestamp` is an implicit interaction (the rating is ignored);
- per user, rows are sorted by timestamp with a STABLE sort: rows with equal timestamps keep their
  order in the file;
- users with fewer than 3 interactions are dropped;
- per user: the last interaction is the test item, the second to last the validation item, the rest
  is train;
- the item universe is every movieId that occurs in the file (also those only rated by dropped
  users), indexed 0..n_items-1 in increasing movieId order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.errors import ValidationError

MIN_INTERACTIONS = 3


@dataclass(frozen=True)
class RawInteractions:
    user: np.ndarray  # raw userId per row, file order
    item: np.ndarray  # raw movieId per row
    ts: np.ndarray    # timestamp per row (int64; fractional seconds are truncated)


def read_interactions(path: str | Path) -> RawInteractions:
    p = Path(path)
    try:
        fh = p.open("r", encoding="utf-8", newline="")
    except OSError as exc:
        raise ValidationError(f"{p}: cannot read interactions: {exc.strerror}") from None
    users: list[int] = []
    items: list[int] = []
    ts: list[int] = []
    with fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lstrip("\ufeff") for h in next(reader)]
        except StopIteration:
            raise ValidationError(f"{p}: line 1: empty file (no header)") from None
        for need in ("userId", "movieId", "timestamp"):
            if need not in header:
                raise ValidationError(f"{p}: line 1: header lacks column {need!r} (has {header})")
        iu, im, it = header.index("userId"), header.index("movieId"), header.index("timestamp")
        for rec in reader:
            if not rec or all(not c.strip() for c in rec):
                continue
            try:
                users.append(int(rec[iu]))
                items.append(int(rec[im]))
                ts.append(int(float(rec[it])))
            except (ValueError, IndexError):
                raise ValidationError(f"{p}: line {reader.line_num}: bad userId/movieId/timestamp") from None
    if not users:
        raise ValidationError(f"{p}: no interactions")
    return RawInteractions(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64),
                           np.asarray(ts, dtype=np.int64))


@dataclass
class Split:
    """Per-user, time-ordered sequences of item indices, and the split on top of them.

    `seqs[u]` is user u's whole sequence (oldest first); train = seqs[u][:-2], valid = seqs[u][-2],
    test = seqs[u][-1]. `user_ids[u]` / `item_ids[i]` map indices back to the file's ids.
    """
    user_ids: np.ndarray
    item_ids: np.ndarray
    seqs: list[np.ndarray]
    ts: list[np.ndarray]
    n_dropped_users: int

    @property
    def n_users(self) -> int:
        return len(self.seqs)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def histories(self, stage: str) -> list[np.ndarray]:
        """What a model is fitted on: 'valid' -> train part; 'test' -> train + validation."""
        cut = {"valid": 2, "test": 1}[stage]
        return [s[:-cut] for s in self.seqs]

    def history_ts(self, stage: str) -> list[np.ndarray]:
        cut = {"valid": 2, "test": 1}[stage]
        return [t[:-cut] for t in self.ts]

    def targets(self, stage: str) -> np.ndarray:
        pos = {"valid": -2, "test": -1}[stage]
        return np.fromiter((s[pos] for s in self.seqs), dtype=np.int64, count=len(self.seqs))


def leave_last_out(raw: RawInteractions) -> Split:
    item_ids, item_idx = np.unique(raw.item, return_inverse=True)
    order = np.arange(len(raw.user))
    # lexsort: last key is primary. user, then timestamp, then file order (= a stable sort by time).
    srt = np.lexsort((order, raw.ts, raw.user))
    u, i, t = raw.user[srt], item_idx[srt], raw.ts[srt]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    ends = np.r_[starts[1:], len(u)]
    keep = (ends - starts) >= MIN_INTERACTIONS
    seqs = [i[a:b].astype(np.int64) for a, b, k in zip(starts, ends, keep) if k]
    tss = [t[a:b].astype(np.int64) for a, b, k in zip(starts, ends, keep) if k]
    return Split(user_ids=u[starts[keep]], item_ids=item_ids.astype(np.int64), seqs=seqs, ts=tss,
                 n_dropped_users=int((~keep).sum()))
