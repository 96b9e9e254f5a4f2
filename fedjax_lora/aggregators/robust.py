"""Byzantine-robust server rules: coordinate-wise median, trimmed mean, norm clipping.

Median and trimmed mean are unweighted (token-count weights would let one large site
outvote the rest, defeating the point) and look only at present clients. They work on
deltas y_k − x, which gives the same order statistics as the raw values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lora.aggregators.base import (Aggregator, add_to, client_deltas, expand, global_norm,
                                          masked_weights, per_client_norm, skip_if_empty,
                                          weighted_sum)
from fedjax_lora.aggregators.fedopt import check_range


def _stateless(name, update_fn, combine) -> Aggregator:
  def init(global_params):
    return {}

  def apply(global_params, client_params, weights, present, state, extras):
    update, metrics = update_fn(global_params, client_params, weights, present)
    metrics = {"delta_norm": global_norm(update), **metrics}
    return add_to(global_params, update), state, metrics

  return Aggregator(name, init, skip_if_empty(apply), combine=combine)


def median() -> Aggregator:
  """Coordinate-wise median over present clients (absent ones become NaN and are skipped)."""
  def update(global_params, client_params, weights, present):
    deltas = client_deltas(global_params, client_params, present)
    return jax.tree.map(
        lambda d: jnp.nanmedian(jnp.where(expand(present, d), d, jnp.nan), axis=0), deltas), {}
  return _stateless("median", update, "unweighted")


def trimmed_mean(trim: float = 0.1) -> Aggregator:
  """Per coordinate: drop the ⌊trim·m⌋ largest and smallest present values, average the rest."""
  trim = check_range("trim", trim, 0.0, 0.5)

  def update(global_params, client_params, weights, present):
    m = jnp.sum(present.astype(jnp.int32))
    cut = jnp.floor(trim * m.astype(jnp.float32)).astype(jnp.int32)
    keep_count = jnp.maximum(m - 2 * cut, 1).astype(jnp.float32)

    def one(d):
      # Absent clients sort to the end (+inf), so ranks [cut, m - cut) are the kept present ones.
      s = jnp.sort(jnp.where(expand(present, d), d, jnp.inf), axis=0)
      rank = jnp.arange(d.shape[0])
      keep = (rank >= cut) & (rank < m - cut)
      return jnp.sum(jnp.where(expand(keep, s), s, 0.0), axis=0) / keep_count
    return jax.tree.map(one, client_deltas(global_params, client_params, present)), {}
  return _stateless("trimmed_mean", update, "unweighted")


def norm_clip(max_norm: float = 1.0) -> Aggregator:
  """Scale each delta to global L2 norm ≤ max_norm, then take the weighted mean."""
  bound = check_range("max_norm", max_norm, 0.0, low_open=True)
  if math.isinf(bound):
    raise ValueError(f"option max_norm={max_norm!r}: must be finite")

  def update(global_params, client_params, weights, present):
    deltas = client_deltas(global_params, client_params, present)
    norms = per_client_norm(deltas)
    factor = jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-30))
    p = masked_weights(weights, present)
    clipped = jnp.sum(jnp.where(present & (norms > bound), 1.0, 0.0))
    metrics = {"clipped": clipped,
               "max_client_delta_norm": jnp.max(jnp.where(present, norms, 0.0))}
    return weighted_sum(deltas, p * factor), metrics
  return _stateless("norm_clip", update, "individual")
