"""Experiments (A/B): deterministic arms, the arm changes Rank, exposures logged in batches on the box,
erased by Forget, and per-arm metrics that leave the box only as calibrated noised counts."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from appliance.client import ApplianceClient
from appliance.config import default_config
from appliance.config.schema import ExperimentConfig
from appliance.errors import ConfigError
from appliance.experiments import DAY_MS, BudgetExhausted, arm_of, make_report, unit_id
from appliance.experiments.report import METRICS, l1_sensitivity, local_counts, noised
from appliance.federation.segments import count_error_bound
from appliance.serving.process import RankerProcess
from appliance.store import EventBatch, ExposureRow, Store
from appliance.v1 import events_pb2

PLAY, LIKE, SKIP = events_pb2.EVENT_TYPE_PLAY, events_pb2.EVENT_TYPE_LIKE, events_pb2.EVENT_TYPE_SKIP

SEED_002 = {"name": "seed-002", "salt": "seed-002-test", "arms": [
    {"name": "control"},
    {"name": "diverse", "ranking": {"diversity": 1.0, "affect_weight": 0.3}}]}


def exp_cfg(**kw) -> ExperimentConfig:
    return ExperimentConfig.model_validate({**SEED_002, **kw})


# -- bucketing --------------------------------------------------------------------------------------
def test_arms_are_deterministic_weighted_and_salted():
    exp = exp_cfg(arms=[{"name": "a", "weight": 3}, {"name": "b", "weight": 1}])
    units = [unit_id(exp, "box0", f"p{i}") for i in range(8000)]
    arms = [arm_of(exp, u) for u in units]
    assert arms == [arm_of(exp, u) for u in units]                      # same unit, same arm, every time
    share_a = arms.count("a") / len(arms)
    assert abs(share_a - 0.75) < 0.03                                  # weights respected
    other = exp_cfg(salt="another-salt", arms=[{"name": "a", "weight": 3}, {"name": "b", "weight": 1}])
    moved = sum(a != arm_of(other, u) for a, u in zip(arms, units)) / len(units)
    assert 0.3 < moved < 0.45                                           # a new salt reshuffles (2*.75*.25)
    half = exp_cfg(traffic=0.5)
    out = [arm_of(half, u) for u in units]
    assert abs(out.count(None) / len(out) - 0.5) < 0.03                 # traffic: the rest are not enrolled


def test_profile_units_differ_across_boxes_box_units_do_not():
    exp = exp_cfg()
    across = {arm_of(exp, unit_id(exp, f"box{b}", "default")) for b in range(64)}
    assert across == {"control", "diverse"}        # "default" on many boxes: households spread over arms
    box = exp_cfg(unit="box")
    assert len({arm_of(box, unit_id(box, "box7", f"p{i}")) for i in range(50)}) == 1  # one arm per box


def test_experiment_config_is_validated_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"experiments\.0\.arms\.1\.ranking\.diversty"):
        default_config().with_overrides(experiments=[{**SEED_002, "arms": [
            {"name": "control"}, {"name": "x", "ranking": {"diversty": 0.5}}]}])
    with pytest.raises(ConfigError, match="arm names must be unique"):
        default_config().with_overrides(experiments=[{**SEED_002, "arms": [{"name": "a"}, {"name": "a"}]}])
    with pytest.raises(ConfigError, match="both change ranking.affect_weight"):
        default_config().with_overrides(experiments=[SEED_002, {**SEED_002, "name": "other"}])
    with pytest.raises(ConfigError, match=r"experiments\.0\.arms"):
        default_config().with_overrides(experiments=[{**SEED_002, "arms": [{"name": "only"}]}])


# -- on the box: Rank, exposures, Forget ------------------------------------------------------------
@pytest.fixture
def box(run_dir, tmp_path):
    cfg = default_config().with_overrides(run_dir=str(run_dir), data_dir=str(tmp_path / "data"),
                                          metrics={"ranker_port": 0}, store={"exposure_flush_s": 3600},
                                          experiments=[SEED_002])
    proc = RankerProcess(cfg)
    client = ApplianceClient(f"unix:{proc.servers.unix_socket}")
    client.wait_ready(10)
    yield proc, client
    client.close()
    proc.stop()


def profiles_by_arm(proc: RankerProcess) -> dict[str, str]:
    found: dict[str, str] = {}
    for i in range(200):
        arms = proc.core.experiments.assignment(f"p{i}").arms
        found.setdefault(dict(arms)["seed-002"], f"p{i}")
        if len(found) == 2:
            return found
    raise AssertionError("no profile in each arm")


def test_the_arm_changes_what_rank_returns(box):
    proc, client = box
    by_arm = profiles_by_arm(proc)
    ranked = {}
    for arm, pid in by_arm.items():
        sid = client.start_session(pid)
        ranked[arm] = [it.item_id for it in client.rank(sid, k=10).items]
    assert ranked["control"] != ranked["diverse"]                    # same (empty) state, different arm
    base = proc.core.ranker
    treated = proc.core.experiments.ranker_for(by_arm["diverse"])
    assert (treated.diversity, treated.affect_weight) == (1.0, 0.3)
    assert (base.diversity, base.affect_weight) == (0.2, 0.15)       # the box's defaults are untouched
    assert proc.core.experiments.ranker_for(by_arm["control"]) is base
    assert treated.F is base.F                                       # a variant shares the matrices


def test_events_prepare_the_state_with_the_arms_ranker(box):
    proc, client = box
    pid = profiles_by_arm(proc)["diverse"]
    sid = client.start_session(pid)
    client.send_events(sid, [(PLAY, 2571), (LIKE, 5952)])
    cached = proc.core._sessions[sid].state.ranker_cache             # derived on the event path, before the ack
    assert cached is not None and cached[0] is proc.core.experiments.ranker_for(pid)
    client.rank(sid, k=5)
    assert proc.core._sessions[sid].state.ranker_cache is cached     # the Rank reused it: nothing re-derived


def test_exposures_are_buffered_then_written_in_one_batch(box):
    proc, client = box
    by_arm = profiles_by_arm(proc)
    sids = {arm: client.start_session(pid) for arm, pid in by_arm.items()}
    for _ in range(3):
        client.rank(sids["control"], k=5)                            # 1 computed + 2 from the Rank cache
    client.rank(sids["diverse"], k=5)
    assert proc.store.exposures() == []                              # nothing written on the Rank path
    assert proc.core.experiments.pending() == 2
    assert proc.core.experiments.flush() == 2
    rows = {r.profile_id: r for r in proc.store.exposures(experiment="seed-002")}
    assert rows[by_arm["control"]].arm == "control" and rows[by_arm["control"]].ranks == 3
    assert rows[by_arm["diverse"]].arm == "diverse" and rows[by_arm["diverse"]].ranks == 1
    now = time.time_ns() // 1_000_000
    r = rows[by_arm["control"]]
    assert r.day == now // DAY_MS and now - 60_000 < r.first_ms <= r.last_ms <= now
    client.rank(sids["control"], k=7)
    proc.core.experiments.flush()                                    # the same day's row grows
    assert {x.profile_id: x.ranks for x in proc.store.exposures()}[by_arm["control"]] == 4


def test_the_flusher_writes_periodically(run_dir, tmp_path):
    cfg = default_config().with_overrides(run_dir=str(run_dir), data_dir=str(tmp_path / "data"),
                                          metrics={"ranker_port": 0}, store={"exposure_flush_s": 0.05},
                                          experiments=[SEED_002])
    proc = RankerProcess(cfg)
    try:
        sid = proc.core.start_session("alice", 1)
        from appliance.serving.core import rank_context

        proc.core.rank(sid, rank_context(1, 0, 0, 0, "adult"), None, 5)
        deadline = time.monotonic() + 5
        while not proc.store.exposures() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r.ranks for r in proc.store.exposures()] == [1]
    finally:
        proc.stop()


def test_forget_erases_the_profiles_exposures_written_and_buffered(box):
    proc, client = box
    by_arm = profiles_by_arm(proc)
    gone, kept = by_arm["control"], by_arm["diverse"]
    s_gone, s_kept = client.start_session(gone), client.start_session(kept)
    client.rank(s_gone, k=5)
    client.rank(s_kept, k=5)
    proc.core.experiments.flush()
    client.rank(s_gone, k=6)                                         # buffered, not yet written
    client.forget(gone)
    proc.core.experiments.flush()
    assert [r.profile_id for r in proc.store.exposures()] == [kept]
    db = proc.store._db.execute("SELECT COUNT(*) FROM experiment_exposures WHERE profile_id=?", (gone,))
    assert db.fetchone()[0] == 0
    # a row that a late Rank buffers for a forgotten profile is refused by the store, not re-created
    proc.store.record_exposures([ExposureRow("seed-002", gone, "control", 1, 1, 1, 1)])
    assert [r.profile_id for r in proc.store.exposures()] == [kept]


# -- reports ----------------------------------------------------------------------------------------
def seeded_store(tmp_path, exp: ExperimentConfig, day: int) -> tuple[Store, dict[str, str]]:
    """Two profiles in two arms, exposed yesterday, with outcome events after their exposure."""
    st = Store(tmp_path / "r.db")
    start = day * DAY_MS
    who = {"control": "profile-alice-7f3a", "diverse": "profile-bob-19c2"}
    for arm, pid in who.items():
        st.start_session(f"session-{pid}", pid, 1, start)
        st.record_exposures([ExposureRow(exp.name, pid, arm, day, start + 1000, start + 5000, 9)])
    st.append_batches([EventBatch(who["control"], f"session-{who['control']}",
                                  np.array([PLAY, PLAY, LIKE], np.uint8), np.array([4993, 5952, 7153]),
                                  np.zeros(3, np.int64), np.zeros(3, np.float32))], start + 2000)
    st.append_batches([EventBatch(who["diverse"], f"session-{who['diverse']}",
                                  np.array([SKIP] * 30, np.uint8), np.full(30, 2571), np.zeros(30, np.int64),
                                  np.zeros(30, np.float32))], start + 3000)
    st.append_batches([EventBatch(who["diverse"], f"session-{who['diverse']}",  # before the exposure: not counted
                                  np.array([PLAY], np.uint8), np.array([318]), np.zeros(1, np.int64),
                                  np.zeros(1, np.float32))], start + 500)
    return st, who


def test_local_counts_attribute_outcomes_to_arms_and_clip(tmp_path):
    exp = exp_cfg()
    day = 20_000
    st, _ = seeded_store(tmp_path, exp, day)
    c = local_counts(st, exp, None, day)
    m = {name: i for i, name in enumerate(METRICS)}
    assert c[0, m["profiles"]] == 1 and c[0, m["ranks"]] == 9 and c[0, m["plays"]] == 2 and c[0, m["likes"]] == 1
    assert c[1, m["plays"]] == 0                                     # the play came before the exposure
    assert c[1, m["skips"]] == exp.report.max_events                 # 30 skips, clipped to the cap (20)
    assert local_counts(st, exp, day, day).sum() == 0                # nothing after the window


def test_report_carries_only_noised_aggregates(tmp_path):
    exp = exp_cfg()
    day = 20_000
    st, who = seeded_store(tmp_path, exp, day)
    rep = make_report(st, exp, now_ms=(day + 1) * DAY_MS + 3_600_000)
    assert set(rep) == {"kind", "schema", "experiment", "through_day", "arms", "metrics", "counts", "epsilon",
                        "l1_sensitivity", "min_boxes", "noise", "error_bound_95"}
    assert rep["through_day"] == day and rep["arms"] == ["control", "diverse"] and rep["metrics"] == list(METRICS)
    assert np.array(rep["counts"]).shape == (2, len(METRICS))
    assert all(isinstance(x, int) for row in rep["counts"] for x in row)
    wire = json.dumps(rep)
    for secret in [*who.values(), *(f"session-{p}" for p in who.values()), exp.salt, "4993", "5952", "7153",
                   "2571", "318"]:
        assert secret not in wire                                    # no profile, session, salt or title id
    strings = {v for v in rep.values() if isinstance(v, str)} | set(rep["arms"]) | set(rep["metrics"])
    assert strings <= {"experiment_arm_counts", "seed-002", "control", "diverse", *METRICS, rep["noise"]}
    assert rep["l1_sensitivity"] == 2 * (4 + 50 + 5 * 20)            # caps x arms (profile units)
    assert rep["error_bound_95"] == count_error_bound(rep["epsilon"] / rep["l1_sensitivity"], 0.05)


def test_report_ledger_one_per_day_and_budget(tmp_path):
    exp = exp_cfg(report={"epsilon": 1.0, "epsilon_budget": 2.5})
    day = 20_000
    st, _ = seeded_store(tmp_path, exp, day)
    noon = lambda d: d * DAY_MS + 43_200_000  # noqa: E731
    assert make_report(st, exp, noon(day + 1)) is not None
    assert make_report(st, exp, noon(day + 1)) is None               # that day is reported already
    assert make_report(st, exp, noon(day + 2)) is not None
    with pytest.raises(BudgetExhausted):
        make_report(st, exp, noon(day + 3))                           # 3 x 1.0 > 2.5
    assert st.report_spent(exp.name) == 2.0


def test_noise_is_calibrated_to_the_sensitivity_in_the_cohort_sum():
    exp = exp_cfg(report={"epsilon": 1.0, "min_boxes": 40})
    l1 = l1_sensitivity(exp)
    rng = np.random.default_rng(3)
    exact = np.ones((2, len(METRICS)), dtype=np.int64)
    trials = 600
    sums = np.stack([sum(noised(exact, exp, rng) for _ in range(exp.report.min_boxes)) for _ in range(trials)])
    noise = (sums - exp.report.min_boxes * exact).ravel()
    a = math.exp(-exp.report.epsilon / l1)
    var = 2 * a / (1 - a) ** 2                                       # two-sided geometric, parameter a
    assert abs(noise.mean()) < 4 * math.sqrt(var / noise.size)
    assert abs(noise.var() / var - 1) < 0.12


def test_cli_report_prints_json_once_per_day(tmp_path):
    import subprocess
    import sys

    import yaml

    data = tmp_path / "data"
    cfg_file = tmp_path / "box.yaml"
    cfg_file.write_text(yaml.safe_dump({"data_dir": str(data), "experiments": [SEED_002]}))
    yesterday = time.time_ns() // 1_000_000 // DAY_MS - 1
    st = Store(data / "appliance.db")
    st.start_session("s1", "alice", 1, yesterday * DAY_MS)
    st.record_exposures([ExposureRow("seed-002", "alice", "diverse", yesterday, yesterday * DAY_MS,
                                     yesterday * DAY_MS + 10, 3)])
    st.close()
    cmd = [sys.executable, "-m", "appliance", "experiments", "report", "seed-002", "-c", str(cfg_file)]
    first = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    rep = json.loads(first.stdout)
    assert rep["experiment"] == "seed-002" and rep["through_day"] == yesterday and "alice" not in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode == 3 and "no new whole day" in again.stderr
