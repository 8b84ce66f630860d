"""Per-arm metrics of an experiment, as the only thing about it that leaves the box: noised counts.

One report per experiment per UTC day at most, covering the whole days since the previous report (up to
yesterday: a day's exposures are long flushed by then, so a report made from another process sees them
all). Per arm it counts exposed profiles, rankings served, and the outcome events (plays, completions,
likes, dislikes, skips) stored after a profile's first exposure that day; each count is clipped to its
configured cap, so the L1 norm of one box's report is at most

    l1 = sum(caps) x (number of arms, for profile units; 1 for box units)

and each box adds its share of distributed discrete-Laplace noise (`federation.segments.noise_share`,
the mechanism of segment reports) for `min_boxes` boxes at epsilon / l1 per cell: the securely aggregated
sum of the cohort then carries two-sided geometric noise with parameter exp(-epsilon / l1) in every cell,
which makes one report epsilon-DP for the whole box (household-level, add/remove one box). The box keeps
a ledger of what each experiment's reports have spent (basic composition of pure DP: the sum) and refuses
a report past `epsilon_budget`, atomically with recording it.

Nothing else is in a report: no event, no profile id, no title or item id, no time finer than the day.
"""

from __future__ import annotations

import time

import numpy as np

from appliance.config.schema import ExperimentConfig
from appliance.errors import ApplianceError
from appliance.federation.segments import count_error_bound, noise_share, secure_rng
from appliance.store import Store
from appliance.v1 import events_pb2

DAY_MS = 86_400_000
_ET = events_pb2.EventType
OUTCOMES = {"plays": _ET.Value("EVENT_TYPE_PLAY"), "completes": _ET.Value("EVENT_TYPE_COMPLETE"),
            "likes": _ET.Value("EVENT_TYPE_LIKE"), "dislikes": _ET.Value("EVENT_TYPE_DISLIKE"),
            "skips": _ET.Value("EVENT_TYPE_SKIP")}
METRICS = ("profiles", "ranks", *OUTCOMES)
N_TYPES = max(_ET.values()) + 1
REPORT_KIND = "experiment_arm_counts"
NOISE = "distributed discrete Laplace: the sum of min_boxes reports has exp(-epsilon/l1_sensitivity) noise per cell"


class BudgetExhausted(ApplianceError):
    """This report would take the experiment past its privacy budget (nothing was sent or recorded)."""


def caps(exp: ExperimentConfig) -> np.ndarray:
    r = exp.report
    return np.array([r.max_profiles, r.max_ranks] + [r.max_events] * len(OUTCOMES), dtype=np.int64)


def l1_sensitivity(exp: ExperimentConfig) -> int:
    """Largest L1 norm of one box's clipped counts."""
    per_arm = int(caps(exp).sum())
    return per_arm * (len(exp.arms) if exp.unit == "profile" else 1)


def local_counts(store: Store, exp: ExperimentConfig, after_day: int | None, through_day: int) -> np.ndarray:
    """Exact per-arm counts of this box over days (after_day, through_day], clipped: int64[arms, metrics].
    They never leave the box as they are (see `make_report`)."""
    arms = [a.name for a in exp.arms]
    raw = np.zeros((len(arms), len(METRICS)), dtype=np.int64)
    profiles: list[set[str]] = [set() for _ in arms]
    outcome_cols = list(OUTCOMES.values())
    for row in store.exposures(experiment=exp.name, after_day=after_day, through_day=through_day):
        if row.arm not in arms:  # an arm since removed from the config
            continue
        i = arms.index(row.arm)
        profiles[i].add(row.profile_id)
        raw[i, 1] += row.ranks
        types = store.event_type_counts(row.profile_id, row.first_ms, (row.day + 1) * DAY_MS, N_TYPES)
        raw[i, 2:] += types[outcome_cols]
    raw[:, 0] = [len(p) for p in profiles]
    if exp.unit == "box" and np.count_nonzero(raw.any(axis=1)) > 1:
        # A box is in one arm; rows of another (a salt changed mid-window) are dropped so the bound holds.
        keep = int(np.argmax(raw[:, 1]))
        raw[np.arange(len(arms)) != keep] = 0
    return np.minimum(raw, caps(exp)[None, :])


def noised(counts: np.ndarray, exp: ExperimentConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """This box's counts plus its share of the cohort's noise, calibrated to epsilon / l1 per cell."""
    eps_cell = exp.report.epsilon / l1_sensitivity(exp)
    noise = noise_share(exp.report.min_boxes, eps_cell, counts.size, rng or secure_rng())
    return counts + noise.reshape(counts.shape)


def make_report(store: Store, exp: ExperimentConfig, now_ms: int | None = None,
                rng: np.random.Generator | None = None) -> dict | None:
    """The box's report for the whole days since its last one, or None when there is no new whole day.
    Its privacy spend is recorded (atomically, refusing past the budget: BudgetExhausted) before the
    noised counts are made, so a report that was built has been paid for whether or not it is sent."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    through_day = now // DAY_MS - 1
    after_day = store.last_report_day(exp.name)
    if after_day is not None and through_day <= after_day:
        return None
    exact = local_counts(store, exp, after_day, through_day)
    if not store.spend_report(exp.name, through_day, exp.report.epsilon, exp.report.epsilon_budget, now):
        raise BudgetExhausted(f"experiment {exp.name}: a report of epsilon {exp.report.epsilon} would exceed "
                              f"the budget {exp.report.epsilon_budget} (spent {store.report_spent(exp.name):g})")
    l1 = l1_sensitivity(exp)
    counts = noised(exact, exp, rng)
    return {
        "kind": REPORT_KIND,
        "schema": 1,
        "experiment": exp.name,
        "through_day": int(through_day),
        "arms": [a.name for a in exp.arms],
        "metrics": list(METRICS),
        "counts": counts.astype(int).tolist(),
        "epsilon": exp.report.epsilon,
        "l1_sensitivity": l1,
        "min_boxes": exp.report.min_boxes,
        "noise": NOISE,
        "error_bound_95": count_error_bound(exp.report.epsilon / l1, 0.05),
    }
