"""DP accounting on the real RDP accountant: calibration meets the budget; the ledger stops the run."""

from __future__ import annotations

import pytest

from appliance.federation.accounting import BudgetExhausted, PrivacyLedger, calibrate_noise, epsilon


def test_everyone_every_round_matches_the_gaussian_mechanism():
    # q = 1: plain Gaussian composed R times; z ~ 9.6 for eps 2 over 20 rounds (add/remove), twice that
    # for replace-one neighbours (sensitivity 2C).
    z_add = calibrate_noise(2.0, 1e-5, 20, "poisson", 610, 610)
    z_rep = calibrate_noise(2.0, 1e-5, 20, "fixed_size", 610, 610)
    assert 9.0 < z_add < 10.5
    assert z_rep == pytest.approx(2 * z_add, rel=0.01)
    assert epsilon(z_add, 20, 1e-5, "poisson", 610, 610) <= 2.0


def test_sampling_amplifies_and_more_rounds_cost_more():
    z = 3.0
    full = epsilon(z, 20, 1e-5, "fixed_size", 610, 610)
    sampled = epsilon(z, 20, 1e-5, "fixed_size", 610, 100)
    assert sampled < full
    assert epsilon(z, 40, 1e-5, "fixed_size", 610, 100) > sampled
    assert epsilon(z, 20, 1e-6, "fixed_size", 610, 100) > sampled  # smaller delta, larger epsilon


def test_ledger_stops_when_the_budget_is_spent():
    z = calibrate_noise(2.0, 1e-5, 5, "fixed_size", 610, 100)
    ledger = PrivacyLedger(z, 1e-5, 2.0, "fixed_size", 610, 100)
    for _ in range(5):
        ledger.record_round()
    assert ledger.per_round == sorted(ledger.per_round) and ledger.per_round[-1] <= 2.0
    assert not ledger.can_run_round()
    with pytest.raises(BudgetExhausted):
        ledger.record_round()
    assert ledger.rounds_done == 5
