"""FedAvg on LoRA factors (Fed-MedLoRA, method.md §1) and validation-loss weights (§2).

Each tensor is averaged on its own (A with A, B with B). The update is written as
x + sum_k p_k (y_k - x), which equals sum_k p_k y_k when sum p_k = 1 but keeps identical
clients bit-exact and untouched factors exactly at the global value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lora.aggregators.base import (Aggregator, add_to, client_deltas, factor_error,
                                          global_norm, masked_weights, skip_if_empty,
                                          weighted_sum)

FACTORS = ("a", "b")


def check_parts(parts) -> tuple[str, ...]:
  parts = (parts,) if isinstance(parts, str) else tuple(parts)
  if not parts or any(p not in FACTORS for p in parts):
    raise ValueError(f"option parts={parts!r}: must be a non-empty subset of {FACTORS}")
  return tuple(f for f in FACTORS if f in parts)


def _select(tree, parts):
  """Zeroes the update of factors outside `parts` (non-LoRA leaves are always averaged)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k in FACTORS and k not in parts:
      out[k] = jax.tree.map(jnp.zeros_like, v)
    else:
      out[k] = _select(v, parts)
  return out


def fedavg(parts=FACTORS, name: str = "fedavg") -> Aggregator:
  """Weighted mean of each tensor; factors not in `parts` stay at the global value."""
  parts = check_parts(parts)

  def init(global_params):
    return {}

  def apply(global_params, client_params, weights, present, state, extras):
    p = masked_weights(weights, present)
    update = _select(weighted_sum(client_deltas(global_params, client_params, present), p), parts)
    metrics = {"delta_norm": global_norm(update),
               "factor_error": factor_error(client_params, weights, present)}
    return add_to(global_params, update), state, metrics

  return Aggregator(name, init, skip_if_empty(apply), sends=parts, combine="mean")


def validation_weights(losses, token_counts, present, gamma: float = 0.0,
                       temperature: float = 1.0) -> jax.Array:
  """p_k ∝ n_k^gamma exp(-L_k / T) over present clients, via log-sum-exp (method.md §2).

  gamma=0, T=1 is softmax(-L), the released code. A client with a non-finite loss (a diverged
  adapter) gets weight 0; if no present client has a finite loss, all weights are 0.
  """
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"option temperature={temperature!r}: must be > 0")
  losses = jnp.asarray(losses, jnp.float32)
  n = jnp.asarray(token_counts, jnp.float32)
  gamma = jnp.asarray(gamma, jnp.float32)
  size_term = jnp.where(gamma == 0, 0.0, gamma * jnp.log(jnp.maximum(n, 0.0)))
  logits = size_term - losses / jnp.asarray(temperature, jnp.float32)
  ok = present & jnp.isfinite(logits)
  logits = jnp.where(ok, logits, -jnp.inf)
  top = jnp.max(jnp.where(ok, logits, -jnp.finfo(jnp.float32).max))
  e = jnp.where(ok, jnp.exp(logits - top), 0.0)
  total = jnp.sum(e)
  return jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), 0.0)
