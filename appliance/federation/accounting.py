"""User-level privacy accounting for federated rounds, with Google's dp-accounting (RDP, PLD).

Three participation schemes, each accounted for what it is:

- ``fixed_size``: Flower samples a fixed-size cohort of m out of N boxes without replacement. The RDP
  bound for that scheme (Wang, Balle, Kasiviswanathan 2019) holds for *replace-one* neighbours, where
  swapping one box's clipped update (norm <= C) for another moves the sum by up to 2C. Flower's central
  DP adds noise of standard deviation z*C to the sum, so the accountant sees a noise multiplier of z/2.
- ``poisson``: every box joins a round independently with probability q (add/remove-one neighbours,
  sensitivity C, multiplier z), the scheme DP-FedAvg was analysed with.
- ``full``: every box of the fleet is asked every round (m = N, no sampling, so no amplification and
  none claimed). The server releases (sum of the clipped updates + N(0, (z C)^2)) / m with m the
  planned cohort, a public constant fixed in the run config before any data is seen, never the
  count of what arrived (DP-FedAvg's fixed-denominator estimator, McMahan et al. 2018). Adding or
  removing one box (add/remove adjacency), or zeroing its update (zero-out adjacency, Kairouz et
  al. 2021), moves the sum by at most C (its update is clipped to C) and leaves m unchanged, so
  each round is the Gaussian mechanism with sensitivity C and noise z C, i.e. multiplier z, not
  z/2 as for replace-one. R rounds are that mechanism composed R times, accounted with the PLD
  accountant (tight; its pessimistic discretisation keeps it an upper bound): z = 8.9 for epsilon 2
  at delta 1e-5 over 20 rounds, where the replace-one bound of ``fixed_size`` needs z = 19.2.

Which boxes answered is not what is protected: the aggregator sees who is online in any deployment;
what a box watched is only in its update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant as pld
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from appliance.errors import ApplianceError

Sampling = Literal["fixed_size", "poisson", "full"]
ORDERS = [1.5, 1.75] + list(range(2, 64)) + [80, 128, 256, 512]  # RDP orders; fractional ones below 1.5 do not converge for small sigma


class BudgetExhausted(ApplianceError):
    """The next round would spend more privacy than the run is allowed."""


def participation(population: int, cohort: int) -> Sampling:
    """The scheme a Flower run with this cohort is: `full` when every box is asked every round."""
    return "full" if cohort == population else "fixed_size"


def _round_event(z: float, sampling: Sampling, population: int, cohort: int) -> tuple[dp_event.DpEvent, object]:
    if not 0 < cohort <= population:
        raise ValueError(f"cohort must be within 1..population ({population}), got {cohort}")
    if sampling == "full":
        if cohort != population:
            raise ValueError(f"full participation needs cohort == population, got {cohort} of {population}")
        return dp_event.GaussianDpEvent(z), pld.NeighborRel.ADD_OR_REMOVE_ONE
    if sampling == "fixed_size":
        event = dp_event.SampledWithoutReplacementDpEvent(population, cohort, dp_event.GaussianDpEvent(z / 2.0))
        return event, rdp.NeighborRel.REPLACE_ONE
    q = cohort / population
    return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rdp.NeighborRel.ADD_OR_REMOVE_ONE


def epsilon(noise_multiplier: float, rounds: int, delta: float, sampling: Sampling, population: int,
            cohort: int) -> float:
    """User-level epsilon at `delta` after `rounds` rounds with Flower-style noise multiplier z."""
    if rounds == 0:
        return 0.0
    event, relation = _round_event(noise_multiplier, sampling, population, cohort)
    if sampling == "full":
        acc = pld.PLDAccountant(neighboring_relation=relation)
        acc.compose(event, rounds)
        return float(acc.get_epsilon(delta))
    acc = rdp.RdpAccountant(ORDERS, neighboring_relation=relation)
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, rounds: int, sampling: Sampling, population: int,
                    cohort: int, tol: float = 1e-3) -> float:
    """Smallest noise multiplier z whose whole-run epsilon is <= target (bisection on the real accountant)."""
    lo, hi = 0.05, 1.0
    while epsilon(hi, rounds, delta, sampling, population, cohort) > target_epsilon:
        hi *= 2
        if hi > 1e4:
            raise ValueError("no noise multiplier reaches that epsilon")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if epsilon(mid, rounds, delta, sampling, population, cohort) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class PrivacyLedger:
    """Spends a run's budget round by round; refuses the round that would overspend it."""

    noise_multiplier: float
    delta: float
    epsilon_budget: float
    sampling: Sampling
    population: int
    cohort: int
    rounds_done: int = 0
    per_round: list[float] = field(default_factory=list)  # cumulative epsilon after each round

    def spent(self) -> float:
        return epsilon(self.noise_multiplier, self.rounds_done, self.delta, self.sampling, self.population,
                       self.cohort)

    def can_run_round(self) -> bool:
        nxt = epsilon(self.noise_multiplier, self.rounds_done + 1, self.delta, self.sampling, self.population,
                      self.cohort)
        return nxt <= self.epsilon_budget

    def record_round(self) -> float:
        """Account one finished round; raise BudgetExhausted if it should not have run."""
        if not self.can_run_round():
            raise BudgetExhausted(f"round {self.rounds_done + 1} would exceed epsilon {self.epsilon_budget} "
                                  f"at delta {self.delta}")
        self.rounds_done += 1
        eps = self.spent()
        self.per_round.append(eps)
        return eps
