"""Server optimizers on the pseudo-gradient Δ = Σ_k p_k (y_k − x) (method.md §11.4, §11.5).

FedAvgM: v ← β v + Δ, x ← x + η v. FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Alg. 2):
m ← β1 m + (1−β1) Δ, a second moment v per rule, x ← x + η m / (√v + τ), no bias correction,
v starting at τ² (the paper's v_{−1} ≥ τ²). Written by hand because optax's versions
bias-correct and treat the update as a gradient to descend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lora.aggregators.base import (Aggregator, add_to, client_deltas, factor_error,
                                          global_norm, masked_weights, skip_if_empty,
                                          weighted_sum)


def _f32_like(tree, value: float):
  return jax.tree.map(lambda x: jnp.full(x.shape, value, jnp.float32), tree)


def check_range(name: str, value: float, low: float, high: float | None = None,
                low_open: bool = False, high_open: bool = True) -> float:
  """Raises ValueError naming the option when value is outside [low, high)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"option {name}={value!r}: must be a number") from None
  bad = value < low or (low_open and value == low)
  if high is not None:
    bad = bad or value > high or (high_open and value == high)
  if bad or value != value:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(f"option {name}={value!r}: must lie in {lo}{low}, "
                     f"{'inf' if high is None else high}{hi}")
  return value


def _pseudo_gradient(global_params, client_params, weights, present):
  p = masked_weights(weights, present)
  return weighted_sum(client_deltas(global_params, client_params, present), p)


def fedavgm(server_lr: float = 1.0, momentum: float = 0.9) -> Aggregator:
  """Server momentum; momentum=0, server_lr=1 is FedAvg."""
  lr = check_range("server_lr", server_lr, 0.0)
  beta = check_range("momentum", momentum, 0.0, 1.0)

  def init(global_params):
    return {"momentum": _f32_like(global_params, 0.0)}

  def apply(global_params, client_params, weights, present, state, extras):
    delta = _pseudo_gradient(global_params, client_params, weights, present)
    v = jax.tree.map(lambda v, d: beta * v + d, state["momentum"], delta)
    metrics = {"delta_norm": global_norm(delta),
               "factor_error": factor_error(client_params, weights, present)}
    return add_to(global_params, v, lr), {"momentum": v}, metrics

  return Aggregator("fedavgm", init, skip_if_empty(apply), combine="mean_then_step")


def _adaptive(name: str, second_moment, server_lr: float, beta1: float, beta2: float,
              tau: float) -> Aggregator:
  lr = check_range("server_lr", server_lr, 0.0)
  b1 = check_range("beta1", beta1, 0.0, 1.0)
  b2 = check_range("beta2", beta2, 0.0, 1.0)
  tau = check_range("tau", tau, 0.0, low_open=True)

  def init(global_params):
    return {"m": _f32_like(global_params, 0.0), "v": _f32_like(global_params, tau * tau)}

  def apply(global_params, client_params, weights, present, state, extras):
    delta = _pseudo_gradient(global_params, client_params, weights, present)
    m = jax.tree.map(lambda m, d: b1 * m + (1.0 - b1) * d, state["m"], delta)
    v = jax.tree.map(lambda v, d: second_moment(v, jnp.square(d), b2), state["v"], delta)
    step = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    metrics = {"delta_norm": global_norm(delta),
               "factor_error": factor_error(client_params, weights, present)}
    return add_to(global_params, step, lr), {"m": m, "v": v}, metrics

  return Aggregator(name, init, skip_if_empty(apply), combine="mean_then_step")


def fedadam(server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
            tau: float = 1e-3) -> Aggregator:
  """v ← β2 v + (1 − β2) Δ²."""
  return _adaptive("fedadam", lambda v, d2, b2: b2 * v + (1.0 - b2) * d2,
                   server_lr, beta1, beta2, tau)


def fedyogi(server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
            tau: float = 1e-3) -> Aggregator:
  """v ← v − (1 − β2) Δ² sign(v − Δ²): v grows or shrinks additively towards Δ²."""
  return _adaptive("fedyogi", lambda v, d2, b2: v - (1.0 - b2) * d2 * jnp.sign(v - d2),
                   server_lr, beta1, beta2, tau)


def fedadagrad(server_lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3) -> Aggregator:
  """v ← v + Δ² (no β2)."""
  return _adaptive("fedadagrad", lambda v, d2, b2: v + d2, server_lr, beta1, 0.0, tau)
