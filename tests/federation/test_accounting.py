"""DP accounting on the real accountants (RDP, PLD): calibration meets the budget; the ledger stops the run."""

from __future__ import annotations

import math

import pytest

from appliance.federation.accounting import (
    BudgetExhausted,
    PrivacyLedger,
    calibrate_noise,
    epsilon,
    participation,
)


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


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism (sensitivity 1, noise sigma) at `delta`, by bisection on
    Balle & Wang 2018, Thm. 8: delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_full_participation_is_the_gaussian_mechanism_composed_over_the_rounds():
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant as pld
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    z, rounds, delta = 9.0, 20, 1e-5
    ours = epsilon(z, rounds, delta, "full", 610, 610)
    plain = pld.PLDAccountant()                       # add/remove, sensitivity 1, multiplier z, no sampling
    plain.compose(dp_event.GaussianDpEvent(z), rounds)
    assert ours == pytest.approx(plain.get_epsilon(delta), rel=1e-9)
    gauss_rdp = rdp.RdpAccountant()
    gauss_rdp.compose(dp_event.GaussianDpEvent(z), rounds)
    assert ours <= gauss_rdp.get_epsilon(delta)       # RDP's conversion is looser, never tighter

    # hand check: R Gaussians of multiplier z are one Gaussian of multiplier z / sqrt(R); its exact epsilon
    # (analytic Gaussian) is the floor any sound accountant stays at or above, and PLD is tight to it
    exact = _analytic_gaussian_epsilon(z / math.sqrt(rounds), delta)
    assert 1.9 < exact < 2.0
    assert exact <= ours <= exact * 1.01


def test_full_participation_needs_a_third_less_noise_than_replace_one_and_no_sampling():
    z_full = calibrate_noise(2.0, 1e-5, 20, "full", 610, 610)
    z_rep = calibrate_noise(2.0, 1e-5, 20, "fixed_size", 610, 610)
    assert 8.7 < z_full < 9.1 and z_rep > 19.0
    assert epsilon(z_full, 20, 1e-5, "full", 610, 610) <= 2.0
    with pytest.raises(ValueError, match="cohort == population"):
        epsilon(z_full, 20, 1e-5, "full", 610, 600)       # a sampled cohort is not full participation
    assert participation(610, 610) == "full" and participation(610, 600) == "fixed_size"
    ledger = PrivacyLedger(z_full, 1e-5, 2.0, "full", 610, 610)
    for _ in range(20):
        ledger.record_round()
    assert ledger.per_round[-1] <= 2.0 and not ledger.can_run_round()
