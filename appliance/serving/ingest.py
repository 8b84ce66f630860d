"""Event ingest: packed columnar batches, group commit, back-pressure and per-client rate limits.

    gRPC thread:  decode (numpy, no per-event objects) -> validate -> rate limit -> enqueue -> wait
    writer thread: take every queued batch (up to `ingest_group_events`) -> ONE SQLite transaction with
                   one row per batch, committed with fsync -> apply the batches to the in-memory state
                   (appliance.fusion.batch, numpy) -> release every waiting call
    gRPC thread:  ack (durable_seq) -- the events are durable AND visible to the next Rank

One fsync serves every batch that arrived while the previous one ran, so throughput grows with load
while each ack still means "on disk". The queue is bounded in events; a call that finds it full is
answered RESOURCE_EXHAUSTED at once with trailing metadata `retry-after-ms` (how long the queue takes to
drain at the recent rate), never queued without bound. Clients (metadata `x-client-id`, else the
session) have token buckets: `serving.client_events_per_s` with `serving.client_burst_events`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.unknown_fields import UnknownFieldSet

from appliance.errors import NotFoundError, StoreError, ValidationError
from appliance.fusion.batch import apply_batch
from appliance.serving.errors import CallEnded, Overloaded, log_bug
from appliance.serving.rankpath import decode_packed_int64
from appliance.store import EventBatch
from appliance.v1 import events_pb2

if TYPE_CHECKING:
    from appliance.serving.core import ApplianceCore

log = logging.getLogger("appliance.ranker.ingest")

MAX_EVENT_TYPE = max(events_pb2.EventType.values())
SMALL_BATCH_BYTES = 4096  # below this (~200 events) decode with the protobuf parser (measured crossover)

# -- decoding ---------------------------------------------------------------------------------------------
_F = descriptor_pb2.FieldDescriptorProto
_file = descriptor_pb2.FileDescriptorProto(name="appliance/internal/events_wire.proto",
                                           package="appliance.internal", syntax="proto3")
_msg = _file.message_type.add(name="EventBatchWire")
_msg.field.add(name="session_id", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
for _num, _name in ((2, "types"), (3, "item_ids"), (4, "client_time_ms"), (5, "values")):
    _msg.field.add(name=_name, number=_num, type=_F.TYPE_BYTES, label=_F.LABEL_REPEATED)  # packed chunks
_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file)
EventBatchWire = message_factory.GetMessageClass(_pool.FindMessageTypeByName("appliance.internal.EventBatchWire"))


@dataclass
class Columns:
    """One session's events as columns (validated by `validate`)."""

    session_id: str
    types: np.ndarray      # int64 until validated, then uint8
    item_ids: np.ndarray   # int64
    client_time_ms: np.ndarray  # int64
    values: np.ndarray     # float32 (empty = all zero)

    def __len__(self) -> int:
        return len(self.types)


def _join(chunks) -> bytes:  # noqa: ANN001 - a repeated bytes field
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _varints(buf: bytes, max_count: int, what: str) -> np.ndarray:
    if len(buf) > 10 * max_count:  # more bytes than max_count varints can take: too many, whatever they are
        raise ValidationError(f"batch: at most {max_count} events per call")
    try:
        return decode_packed_int64(buf)
    except ValueError:
        raise ValidationError(f"batch: {what}: malformed packed varints") from None


def parse_event_batch(data: bytes, max_events: int) -> Columns:
    """Decode a serialized appliance.v1.EventBatch into columns without a Python object per event."""
    if len(data) < SMALL_BATCH_BYTES:  # a few events: the message parser beats ~30 numpy calls
        return _parse_slow(data, max_events)
    try:
        wire = EventBatchWire.FromString(data)
        slow = len(UnknownFieldSet(wire)) > 0  # a column sent unpacked (parsers must accept that too)
    except Exception:  # noqa: BLE001 - the client's malformed bytes
        raise ValidationError("request is not a valid appliance.v1.EventBatch") from None
    if slow:
        return _parse_slow(data, max_events)
    tb = _join(wire.types)
    if len(tb) <= max_events and (not tb or max(tb) < 0x80):
        types = np.frombuffer(tb, dtype=np.uint8).astype(np.int64)  # every type fits one byte (the usual case)
    else:
        types = _varints(tb, max_events, "types")
    vb = _join(wire.values)
    if len(vb) % 4:
        raise ValidationError("batch: values: malformed packed floats")
    return Columns(wire.session_id, types, _varints(_join(wire.item_ids), max_events, "item_ids"),
                   _varints(_join(wire.client_time_ms), max_events, "client_time_ms"),
                   np.frombuffer(vb, dtype="<f4"))


def _parse_slow(data: bytes, max_events: int) -> Columns:
    try:
        b = events_pb2.EventBatch.FromString(data)
    except Exception:  # noqa: BLE001
        raise ValidationError("request is not a valid appliance.v1.EventBatch") from None
    if max(len(b.types), len(b.item_ids), len(b.client_time_ms), len(b.values)) > max_events:
        raise ValidationError(f"batch: at most {max_events} events per call")
    return Columns(b.session_id, np.array(b.types, dtype=np.int64), np.array(b.item_ids, dtype=np.int64),
                   np.array(b.client_time_ms, dtype=np.int64), np.array(b.values, dtype=np.float32))


def columns_from_rows(session_id: str, rows: list[tuple[int, int, int, float]]) -> Columns:
    t, i, c, v = (list(x) for x in zip(*rows)) if rows else ([], [], [], [])
    return Columns(session_id, np.array(t, dtype=np.int64), np.array(i, dtype=np.int64),
                   np.array(c, dtype=np.int64), np.array(v, dtype=np.float32))


def validate(cols: Columns, max_events: int) -> Columns:
    """The checks of validation.event_row, on whole columns. Returns the columns, types as uint8."""
    n = len(cols.types)
    if n == 0:
        raise ValidationError("batch is empty")
    if n > max_events:
        raise ValidationError(f"batch: at most {max_events} events per call, got {n}")
    if len(cols.item_ids) != n or len(cols.client_time_ms) != n or len(cols.values) not in (0, n):
        raise ValidationError("batch columns must have the same length (values may be empty)")
    bad = np.flatnonzero((cols.types < 1) | (cols.types > MAX_EVENT_TYPE))
    if bad.size:
        raise ValidationError(f"row {bad[0]}: unknown EventType {int(cols.types[bad[0]])}")
    bad = np.flatnonzero(cols.item_ids <= 0)
    if bad.size:
        raise ValidationError(f"row {bad[0]}: item_id must be positive")
    bad = np.flatnonzero(cols.client_time_ms < 0)
    if bad.size:
        raise ValidationError(f"row {bad[0]}: client_time_ms must be >= 0")
    values = cols.values if len(cols.values) else np.zeros(n, dtype=np.float32)
    if not bool(np.isfinite(values).all()):
        raise ValidationError(f"row {int(np.flatnonzero(~np.isfinite(values))[0])}: value must be finite")
    return Columns(cols.session_id, cols.types.astype(np.uint8), cols.item_ids, cols.client_time_ms, values)


# -- rate limits ------------------------------------------------------------------------------------------
class RateLimiter:
    """Token bucket per client key: `rate` events/s, up to `burst` saved. rate <= 0 turns it off."""

    def __init__(self, rate: float, burst: float, max_clients: int = 4096) -> None:
        self.rate, self.burst, self.max_clients = float(rate), float(max(burst, 1.0)), max_clients
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()
        self.rejected = 0

    def take(self, key: str, n: int) -> None:
        """Spend n tokens or raise Overloaded with the wait until the bucket can pay."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = [self.burst, now]
                while len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
                b[1] = now
            need = min(float(n), self.burst)  # a batch larger than the burst needs a full bucket
            if b[0] < need:
                wait_ms = (need - b[0]) / self.rate * 1e3
                self.rejected += 1
                raise Overloaded(f"client rate limit: {self.rate:.0f} events/s; retry in {wait_ms:.0f} ms", wait_ms)
            b[0] -= n


# -- the group-commit writer ------------------------------------------------------------------------------

@dataclass(eq=False)
class _Pending:
    profile_id: str
    session_id: str
    prof: object              # the ProfileState the call saw (a Forget since replaces it: nothing is written)
    live: object              # the LiveSession the call saw
    cols: Columns
    rows: np.ndarray          # catalog rows of the item ids
    still_wanted: Callable[[], bool] | None = None  # False once the call has ended (cancelled, failed)
    done: threading.Event = field(default_factory=threading.Event)
    last_seq: int = 0
    error: Exception | None = None


class EventWriter:
    """One thread that group-commits queued batches and applies them to memory before acking."""

    def __init__(self, core: ApplianceCore, max_queue_events: int, max_group_events: int) -> None:
        self.core = core
        self.max_queue_events, self.max_group_events = max_queue_events, max_group_events
        self._q: deque[_Pending] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.queued_events = 0
        self.rejected = 0
        self.commits = 0
        self.events_committed = 0
        self.rate_eps = 0.0  # recent drain rate (events/s), for the retry hint
        self.last_commit_s = 0.0
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
        self._thread.start()

    def retry_after_ms(self, extra: int = 0) -> float:
        backlog = self.queued_events + extra
        if self.rate_eps <= 0:
            return 50.0
        return float(min(2000.0, max(1.0, backlog / self.rate_eps * 1e3)))

    def submit(self, items: list[_Pending]) -> None:
        n = sum(len(p.cols) for p in items)
        with self._cv:
            if self._stop:
                raise StoreError("store: the event writer is stopping; nothing was written")
            if self.queued_events and self.queued_events + n > self.max_queue_events:
                ms = self.retry_after_ms(n)
                self.rejected += 1
                raise Overloaded(f"ingest queue full ({self.queued_events} events waiting); retry in {ms:.0f} ms", ms)
            self._q.extend(items)
            self.queued_events += n
            self._cv.notify()

    def _take(self) -> list[_Pending] | None:
        with self._cv:
            while not self._q and not self._stop:
                self._cv.wait()
            if not self._q:
                return None
            group, n = [], 0
            while self._q and (not group or n + len(self._q[0].cols) <= self.max_group_events):
                p = self._q.popleft()
                group.append(p)
                n += len(p.cols)
            return group

    def _run(self) -> None:
        core = self.core
        while True:
            group = self._take()
            if group is None:
                return
            n = sum(len(p.cols) for p in group)
            t0 = time.perf_counter()
            try:
                with core._lock:  # Forget and End cannot fall between the check, the commit and the apply
                    alive = []
                    for p in group:
                        if core._profiles.get(p.profile_id) is not p.prof:  # forgotten since it was queued
                            p.error = NotFoundError(f"session {p.session_id} is unknown or has ended")
                        elif p.still_wanted is not None and not p.still_wanted():
                            # the call already ended with an error (a stream cut by an oversize message, a
                            # cancel, a deadline): nobody will get an ack, so nothing is written
                            p.error = CallEnded("the call ended before its events were written; nothing was written")
                        else:
                            alive.append(p)
                    if alive:
                        lasts = core.store.append_batches(
                            [EventBatch(p.profile_id, p.session_id, p.cols.types, p.cols.item_ids,
                                        p.cols.client_time_ms, p.cols.values) for p in alive], _now_ms())
                        share = core.catalog.genre_share
                        for p, last in zip(alive, lasts):
                            live = core._sessions.get(p.session_id)
                            apply_batch(p.prof, live.state if live is p.live else None, p.cols.types,
                                        p.cols.item_ids, p.cols.client_time_ms, p.cols.values, p.rows, share)
                            p.last_seq = last
                        core.counters.events_ingested += sum(len(p.cols) for p in alive)
            except Exception as exc:  # noqa: BLE001 - StoreError (disk full...) or a bug: fail this group only
                if not isinstance(exc, StoreError):
                    log_bug(log, "event writer: unexpected error", exc)
                for p in group:
                    if p.error is None:
                        p.error = exc
            self._prepare_rankings(group)
            dt = time.perf_counter() - t0
            with self._cv:
                self.queued_events -= n
                self.commits += 1
                self.events_committed += n
                self.last_commit_s = dt
                inst = n / max(dt, 1e-6)
                self.rate_eps = inst if self.rate_eps <= 0 else 0.8 * self.rate_eps + 0.2 * inst
            for p in group:
                p.done.set()

    def _prepare_rankings(self, group: list[_Pending]) -> None:
        """Before the acks: derive each touched session's ranking state (Ranker.prepare: the sequence
        encoder, taste and per-title terms), so the Rank that follows an event pays nothing for it."""
        done: set[int] = set()
        sessions, profiles = self.core._sessions, self.core._profiles
        for p in group:
            live = p.live
            if (p.error is not None or id(live) in done or sessions.get(p.session_id) is not live
                    or profiles.get(p.profile_id) is not p.prof):  # ended or forgotten meanwhile: nothing to keep
                continue
            done.add(id(live))
            try:
                self.core.ranker_for(p.profile_id).prepare(p.prof, live.state)  # the arm's ranker (A/B)
            except Exception as exc:  # noqa: BLE001 - the events are durable; the next Rank derives it again
                log_bug(log, "event writer: preparing the ranking failed", exc)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
