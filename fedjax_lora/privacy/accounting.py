"""Privacy accounting (RDP, Google's `dp_accounting`) for DP-SGD and DP-FedAvg.

Every guarantee here is the subsampled-Gaussian bound: each step is
`PoissonSampledDpEvent(q, GaussianDpEvent(σ))`, self-composed over the steps, and the RDP
accountant (Mironov 2017; Mironov, Talwar, Zhang 2019) converts it to (ε, δ).

Caveat (method.md §11.8): our batches are shuffled fixed-size batches (each example appears
once per epoch), not Poisson samples with rate q = B / n. The Poisson bound is the standard
stand-in used in practice, but for our sampling it is an approximation, not a proof; report
it as such. The same holds for client-level DP when the clients of a round are a fixed-size
draw rather than a Poisson one.
"""

from __future__ import annotations

import contextlib
import math
from typing import Hashable, Mapping

import dp_accounting
from absl import logging
from dp_accounting import rdp

CALIBRATION_TOL = 1e-4  # calibrate_noise: σ is within this of the smallest σ meeting the target


def _check(noise_multiplier: float | None, sampling_rate: float, steps: int, delta: float):
  if noise_multiplier is not None and not (noise_multiplier >= 0 and
                                           math.isfinite(noise_multiplier)):
    raise ValueError(f"option noise_multiplier={noise_multiplier!r}: must be a finite number >= 0")
  if not 0.0 <= sampling_rate <= 1.0:
    raise ValueError(f"option sampling_rate={sampling_rate!r}: must lie in [0, 1]")
  if int(steps) != steps or steps < 0:
    raise ValueError(f"option steps={steps!r}: must be an integer >= 0")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"option delta={delta!r}: must lie in (0, 1)")


@contextlib.contextmanager
def _quiet():
  """dp_accounting warns once per RDP order it drops for not converging (common at large q);
  the orders it keeps still give a valid bound, so the warnings only bury the round log."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _event(noise_multiplier: float, sampling_rate: float, steps: int):
  step = dp_accounting.PoissonSampledDpEvent(
      sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.SelfComposedDpEvent(step, int(steps))


def dp_sgd_epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
                   delta: float) -> float:
  """ε after `steps` subsampled-Gaussian steps (rate q, noise σ) at δ, by RDP.

  Returns 0 when nothing was released (steps = 0 or q = 0) and inf for σ = 0 with steps > 0.
  """
  _check(noise_multiplier, sampling_rate, steps, delta)
  if steps == 0 or sampling_rate == 0.0:
    return 0.0
  if noise_multiplier == 0.0:
    return math.inf
  accountant = rdp.RdpAccountant()
  accountant.compose(_event(noise_multiplier, sampling_rate, steps))
  with _quiet():
    return float(accountant.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sampling_rate: float, steps: int,
                    delta: float) -> float:
  """Smallest σ (within CALIBRATION_TOL) whose `dp_sgd_epsilon` is ≤ target_epsilon.

  The result always meets the target (`dp_accounting.calibrate_dp_mechanism` returns a point
  on the feasible side); it may exceed the exact optimum by up to CALIBRATION_TOL. Returns 0
  when nothing is released (steps = 0 or q = 0).
  """
  _check(None, sampling_rate, steps, delta)
  if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
    raise ValueError(f"option target_epsilon={target_epsilon!r}: must be a finite number > 0")
  if steps == 0 or sampling_rate == 0.0:
    return 0.0
  eps = lambda sigma: dp_sgd_epsilon(sigma, sampling_rate, steps, delta)
  # Bracket [lo, hi] with eps(lo) > target >= eps(hi); ε falls as σ grows.
  hi = 1.0
  while eps(hi) > target_epsilon:
    hi *= 2.0
    if hi > 1e6:
      raise ValueError(f"option target_epsilon={target_epsilon!r}: unreachable with σ <= 1e6")
  lo = hi / 2.0
  while eps(lo) <= target_epsilon:
    if lo < 1e-3:
      return lo  # any σ this small already meets a very loose target
    hi, lo = lo, lo / 2.0
  with _quiet():
    return float(dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda sigma: _event(sigma, sampling_rate, steps),
        target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=CALIBRATION_TOL))


def site_epsilons(noise_multiplier: float, sampling_rates: Mapping[Hashable, float],
                  steps_so_far: Mapping[Hashable, int], delta: float) -> dict:
  """Per-site example-level ε of DP-SGD so far: q_k = B / n_k, steps = local steps × rounds.

  Pure: the caller keeps the step counts (a site's steps differ with its data size and the
  rounds it took part in). Sites missing from steps_so_far have taken no step.
  """
  unknown = sorted(map(str, set(steps_so_far) - set(sampling_rates)))
  if unknown:
    raise ValueError(f"option steps_so_far: sites {', '.join(unknown)} have no sampling rate")
  return {site: dp_sgd_epsilon(noise_multiplier, q, int(steps_so_far.get(site, 0)), delta)
          for site, q in sampling_rates.items()}


def client_level_epsilon(noise_multiplier: float, clients_per_round: float, num_clients: int,
                         rounds: int, delta: float) -> float:
  """Client-level ε of DP-FedAvg (McMahan et al. 2018): q = clients_per_round / num_clients.

  noise_multiplier is z of `dp_fedavg` (noise std z·S/(qN) on the mean of clipped deltas).
  With only a handful of sites q is large and this ε is weak, which is why method.md
  prefers per-site DP-SGD.
  """
  if not num_clients > 0:
    raise ValueError(f"option num_clients={num_clients!r}: must be > 0")
  if not 0 <= clients_per_round <= num_clients:
    raise ValueError(f"option clients_per_round={clients_per_round!r}: must lie in "
                     f"[0, num_clients={num_clients}]")
  return dp_sgd_epsilon(noise_multiplier, clients_per_round / num_clients, rounds, delta)


__all__ = ["CALIBRATION_TOL", "calibrate_noise", "client_level_epsilon", "dp_sgd_epsilon",
           "site_epsilons"]
