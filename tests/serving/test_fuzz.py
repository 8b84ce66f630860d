"""Hostile input (a few thousand cases here; `python -m bench fuzz --n 100000` for the full run): only
documented statuses, nothing changed by a rejected call, the server up and no internal error after."""

from __future__ import annotations

import pytest

from appliance.serving.process import RankerProcess
from bench.fuzz import Fuzzer


@pytest.fixture
def fuzz_ranker(cfg):
    proc = RankerProcess(cfg.with_overrides(serving={"client_events_per_s": 0}))
    yield proc
    proc.stop()


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_every_method(fuzz_ranker, seed):
    fz = Fuzzer(fuzz_ranker, seed)
    try:
        calls = fz.run(1500)
        frames = fz.frames(100)
        assert fz.alive()
        assert not fz.failures, fz.failures[:5]
        assert not fz.errors.records, fz.errors.records[:5]
    finally:
        fz.close()
    assert frames["sent"] > 50
    assert set(calls["statuses"]) >= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}
    assert len(calls["by_method"]) >= 12  # every method was called
