"""Request checks. A rejected request raises before any state is touched (invariant 4)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from appliance.errors import ValidationError
from appliance.v1 import common_pb2, events_pb2

PROFILE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SESSION_ID = re.compile(r"[0-9a-f]{32}")
DEVICE_TYPES = frozenset(common_pb2.DeviceType.values())
MATURITIES = frozenset(common_pb2.Maturity.values())
EVENT_TYPES = frozenset(v for v in events_pb2.EventType.values() if v != events_pb2.EVENT_TYPE_UNSPECIFIED)
MAX_ABS_UTC_OFFSET_MIN = 18 * 60


def profile_id(value: str) -> str:
    if not PROFILE_ID.fullmatch(value):
        raise ValidationError("profile_id must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def session_id(value: str) -> str:
    if not SESSION_ID.fullmatch(value):
        raise ValidationError("session_id must be the 32 hex characters Sessions.Start returned")
    return value


def context(ctx: common_pb2.Context) -> common_pb2.Context:
    if ctx.device not in DEVICE_TYPES:
        raise ValidationError(f"context.device: unknown DeviceType {ctx.device}")
    if ctx.max_maturity not in MATURITIES:
        raise ValidationError(f"context.max_maturity: unknown Maturity {ctx.max_maturity}")
    if ctx.local_time_unix_ms < 0:
        raise ValidationError("context.local_time_unix_ms must be >= 0")
    if abs(ctx.utc_offset_minutes) > MAX_ABS_UTC_OFFSET_MIN:
        raise ValidationError("context.utc_offset_minutes must be within +-18 hours")
    return ctx


def k(value: int, max_k: int) -> int:
    if not 1 <= value <= max_k:
        raise ValidationError(f"k must be between 1 and {max_k}, got {value}")
    return value


def candidate_array(ids: np.ndarray | None, max_candidates: int) -> np.ndarray | None:
    """The candidate column as int64 (None when empty = the whole catalog); ids are positive."""
    if ids is None or len(ids) == 0:
        return None
    if len(ids) > max_candidates:
        raise ValidationError(f"candidate_ids: at most {max_candidates} per call, got {len(ids)}")
    if int(ids.min()) <= 0:
        raise ValidationError(f"candidate_ids: ids are positive, got {int(ids[ids <= 0][0])}")
    return ids


def candidate_ids(ids: Sequence[int], max_candidates: int) -> np.ndarray | None:
    """Like candidate_array, from a repeated field."""
    if len(ids) > max_candidates:
        raise ValidationError(f"candidate_ids: at most {max_candidates} per call, got {len(ids)}")
    return candidate_array(np.fromiter(ids, dtype=np.int64, count=len(ids)), max_candidates)


def event_columns(types: Sequence[int], item_ids: Sequence[int], times: Sequence[int],
                  values: Sequence[float], max_events: int) -> list[tuple[int, int, int, float]]:
    """Check a columnar batch and return rows (type, item_id, client_time_ms, value)."""
    n = len(types)
    if n == 0:
        raise ValidationError("batch is empty")
    if n > max_events:
        raise ValidationError(f"batch: at most {max_events} events per call, got {n}")
    if len(item_ids) != n or len(times) != n or (len(values) not in (0, n)):
        raise ValidationError("batch columns must have the same length (values may be empty)")
    vals = values if len(values) else [0.0] * n
    rows = []
    for idx in range(n):
        rows.append(event_row(types[idx], item_ids[idx], times[idx], vals[idx], where=f"row {idx}"))
    return rows


def event_row(etype: int, item_id: int, client_time_ms: int, value: float,
              where: str = "event") -> tuple[int, int, int, float]:
    if etype not in EVENT_TYPES:
        raise ValidationError(f"{where}: unknown EventType {etype}")
    if item_id <= 0:
        raise ValidationError(f"{where}: item_id must be positive")
    if client_time_ms < 0:
        raise ValidationError(f"{where}: client_time_ms must be >= 0")
    if not math.isfinite(value):
        raise ValidationError(f"{where}: value must be finite")
    return (int(etype), int(item_id), int(client_time_ms), float(value))
