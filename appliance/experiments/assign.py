"""Arms per profile (cached), the ranker each arm uses, and the buffered exposure log."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from appliance.config.schema import ExperimentConfig
from appliance.experiments.report import DAY_MS
from appliance.ops.bucketing import bucket
from appliance.ranking import Ranker
from appliance.store import ExposureRow, Store

log = logging.getLogger("appliance.experiments")

RANKER_KNOBS = ("affect_weight", "diversity")


def unit_id(exp: ExperimentConfig, box_id: str, profile_id: str) -> str:
    """What is hashed: the box id alone (unit 'box') or with the profile id (unit 'profile')."""
    return box_id if exp.unit == "box" else f"{box_id}/{profile_id}"


def arm_of(exp: ExperimentConfig, unit: str) -> str | None:
    """The arm a unit is in, or None when it is outside the experiment's traffic. Deterministic: a point in
    [0, 1) from the salted hash; below `traffic` it falls into the arms in proportion to their weights."""
    x = bucket(exp.salt, unit)
    if x >= exp.traffic:
        return None
    x /= exp.traffic
    total = sum(a.weight for a in exp.arms)
    edge = 0.0
    for arm in exp.arms:
        edge += arm.weight / total
        if x < edge:
            return arm.name
    return exp.arms[-1].name  # rounding at the top edge


@dataclass(frozen=True)
class Assignment:
    """A profile's arms ((experiment, arm) pairs, enrolled experiments only) and the ranker they make."""

    arms: tuple[tuple[str, str], ...]
    ranker: Ranker


class ExperimentArms:
    """The box's experiments at run time: arms per profile, ranker variants, exposures.

    Thread-safe. `on_rank` is the only call on the Rank path: a dict lookup, and for an enrolled profile
    one counter update under a short lock."""

    def __init__(self, experiments: Sequence[ExperimentConfig], base: Ranker, box_id: str, store: Store,
                 flush_period_s: float = 5.0) -> None:
        self.experiments = list(experiments)
        self.base, self.box_id, self.store = base, box_id, store
        self.flush_period_s = flush_period_s
        self._assign: dict[str, Assignment] = {}
        self._variants: dict[tuple[tuple[str, float], ...], Ranker] = {(): base}
        self._buf: dict[tuple[str, int], list[int]] = {}  # (profile, day) -> [first_ms, last_ms, ranks]
        self._buf_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time; Forget waits for a flush in progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushes = 0
        self.flush_errors = 0

    # -- assignment ---------------------------------------------------------------------------------
    def assignment(self, profile_id: str) -> Assignment:
        a = self._assign.get(profile_id)
        if a is None:
            a = self._assign[profile_id] = self._compute(profile_id)  # same value if two threads race
        return a

    def _compute(self, profile_id: str) -> Assignment:
        arms, knobs = [], {}
        for exp in self.experiments:
            name = arm_of(exp, unit_id(exp, self.box_id, profile_id))
            if name is None:
                continue
            arms.append((exp.name, name))
            knobs.update(next(a for a in exp.arms if a.name == name).ranking.overrides())
        return Assignment(tuple(arms), self._variant(knobs))

    def _variant(self, knobs: dict[str, float]) -> Ranker:
        key = tuple(sorted((k, float(v)) for k, v in knobs.items()
                           if float(v) != float(getattr(self.base, k))))
        ranker = self._variants.get(key)
        if ranker is None:
            ranker = copy.copy(self.base)  # shares the read-only matrices; only the two numbers differ
            for k, v in key:
                if k not in RANKER_KNOBS:
                    raise ValueError(f"an arm cannot change ranker.{k}")
                setattr(ranker, k, v)
            ranker = self._variants.setdefault(key, ranker)
        return ranker

    def ranker_for(self, profile_id: str) -> Ranker:
        """The ranker of this profile's arms, without logging an exposure (Explain)."""
        return self.assignment(profile_id).ranker

    # -- the Rank path ------------------------------------------------------------------------------
    def on_rank(self, profile_id: str, now_ms: int | None = None) -> Ranker:
        """A ranking is being served to this profile: count the exposure; the ranker to use."""
        a = self._assign.get(profile_id) or self.assignment(profile_id)
        if a.arms:
            now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
            key = (profile_id, now // DAY_MS)
            with self._buf_lock:
                slot = self._buf.get(key)
                if slot is None:
                    self._buf[key] = [now, now, 1]
                else:
                    slot[1] = now
                    slot[2] += 1
        return a.ranker

    def pending(self) -> int:
        with self._buf_lock:
            return len(self._buf)

    # -- writing ------------------------------------------------------------------------------------
    def flush(self) -> int:
        """Write what is buffered in one transaction; rows written. On a store error the exposures go back
        into the buffer (merged with what came meanwhile) and the error propagates."""
        with self._flush_lock:
            with self._buf_lock:
                taken, self._buf = self._buf, {}
            if not taken:
                return 0
            rows = [ExposureRow(exp, pid, arm, day, first, last, n)
                    for (pid, day), (first, last, n) in taken.items()
                    for exp, arm in self.assignment(pid).arms]
            try:
                self.store.record_exposures(rows)
            except Exception:
                with self._buf_lock:
                    for key, (first, last, n) in taken.items():
                        slot = self._buf.get(key)
                        if slot is None:
                            self._buf[key] = [first, last, n]
                        else:
                            slot[0], slot[1], slot[2] = min(slot[0], first), max(slot[1], last), slot[2] + n
                raise
            self.flushes += 1
            return len(rows)

    @contextmanager
    def forgetting(self, profile_id: str) -> Iterator[None]:
        """Around the store's erase of a profile: no flush runs meanwhile, its buffered exposures and cached
        arm are dropped (rows a Rank still in flight buffers later are refused by the store: no profile)."""
        with self._flush_lock:
            with self._buf_lock:
                for key in [k for k in self._buf if k[0] == profile_id]:
                    del self._buf[key]
            self._assign.pop(profile_id, None)
            yield

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="exposure-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_period_s):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - kept in memory, tried again next period
                self.flush_errors += 1
                log.warning("exposures not written, kept for the next try: %s", exc)

    def stop(self) -> None:
        """Stop the flusher and write what is left (best effort: the store may be unwritable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001
            log.warning("exposures lost at stop: %s", exc)
