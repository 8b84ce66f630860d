"""A/B experiments on the box (issue 9, "seed 002").

- **Bucketing**: a unit (a profile, or the whole box) lands in an arm by a salted one-way hash
  (`appliance.ops.bucketing.bucket`), so the same unit always sees the same arm, buckets of different
  experiments are independent, and a bucket says nothing about the id. Profile units are hashed together
  with the box's random id: profile names repeat across homes ("default"), households must not.
- **The arm changes Rank**: an arm may set the ranker's `diversity` and/or `affect_weight`; each
  combination gets a shallow copy of the box's Ranker with those two numbers changed (the matrices are
  shared, read-only). A profile's arm and ranker are computed once and cached: no hashing per request.
- **Exposure logging**: which arm a profile saw and when is counted in memory on the Rank path (one dict
  update under a lock) and written to SQLite in one transaction every `store.exposure_flush_s`
  (`experiment_exposures`, schema 3), never on the Rank path. Profile.Forget erases them.
- **Reports** (`appliance.experiments.report`): per-arm counts leave the box only with calibrated,
  distributed discrete-Laplace noise; never an event, a profile id or a title.
"""

from appliance.experiments.assign import (
    DAY_MS,
    Assignment,
    ExperimentArms,
    arm_of,
    unit_id,
)
from appliance.experiments.report import BudgetExhausted, make_report

__all__ = ["DAY_MS", "Assignment", "BudgetExhausted", "ExperimentArms", "arm_of", "make_report", "unit_id"]
