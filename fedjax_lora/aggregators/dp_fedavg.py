"""DP-FedAvg (McMahan et al. ICLR 2018, arXiv 1710.06963): client-level differential privacy.

Per round, each present client's delta Δ_k = y_k − x is clipped to global L2 norm ≤ S,
Δ = (1/qN) Σ_k Δ̃_k + N(0, (z S / qN)² I), and x ← x + η Δ (method.md §11.8). One client's
whole update then moves Δ by at most S / qN, which the Gaussian noise covers; the ε this
buys is computed by `fedjax_lora.privacy.accounting.client_level_epsilon`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lora.aggregators.base import (Aggregator, add_to, client_deltas, expand, global_norm,
                                          per_client_norm, skip_if_empty)
from fedjax_lora.aggregators.fedopt import check_range


def dp_fedavg(clip: float = 1.0, noise_multiplier: float = 0.0, expected_clients: float = 0.0,
              server_lr: float = 1.0) -> Aggregator:
  """Client-level DP-FedAvg with clip S = clip, noise z = noise_multiplier, η = server_lr.

  Weights are ignored: every client counts 1/qN (uniform), because the sensitivity bound
  S / qN holds only if no client can weigh more than the others; token-count weights would
  leak the size of a site and break it.

  expected_clients is qN, the expected number of clients per round. It must be a public
  constant fixed in advance (DP needs a data-independent denominator). With 0, the number of
  present clients of the round is used instead: convenient, but that count is itself
  data-dependent, so the guarantee is then only approximate.

  The noise key is extras["noise_key"] (a typed `jax.random.key`, fresh every round); with
  noise_multiplier > 0 and no key, apply raises at trace time.
  """
  clip = check_range("clip", clip, 0.0, low_open=True)
  if math.isinf(clip):
    raise ValueError(f"option clip={clip!r}: must be finite")
  z = check_range("noise_multiplier", noise_multiplier, 0.0)
  if math.isinf(z):
    raise ValueError(f"option noise_multiplier={noise_multiplier!r}: must be finite")
  q_n = check_range("expected_clients", expected_clients, 0.0)
  if math.isinf(q_n):
    raise ValueError(f"option expected_clients={expected_clients!r}: must be finite")
  eta = check_range("server_lr", server_lr, 0.0, low_open=True)
  if math.isinf(eta):
    raise ValueError(f"option server_lr={server_lr!r}: must be finite")

  def init(global_params):
    return {}

  def apply(global_params, client_params, weights, present, state, extras):
    del weights  # uniform by design: see the docstring
    if z > 0 and extras.get("noise_key") is None:
      raise ValueError("dp_fedavg with noise_multiplier > 0 needs extras['noise_key'] "
                       "(a fresh jax.random.key per round)")
    deltas = client_deltas(global_params, client_params, present)
    norms = per_client_norm(deltas)
    scale = jnp.where(present, jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30)), 0.0)
    denom = (jnp.float32(q_n) if q_n > 0
             else jnp.maximum(jnp.sum(present.astype(jnp.float32)), 1.0))
    # jnp.where, not a product, so that NaN in an absent slot cannot reach the sum.
    mean = jax.tree.map(
        lambda d: jnp.sum(jnp.where(expand(present, d), d * expand(scale, d), 0.0), axis=0)
        / denom, deltas)
    noise_std = z * clip / denom
    if z > 0:
      leaves, treedef = jax.tree.flatten(mean)
      keys = jax.random.split(extras["noise_key"], len(leaves))
      mean = jax.tree.unflatten(treedef, [
          l + noise_std * jax.random.normal(k, l.shape, jnp.float32)
          for k, l in zip(keys, leaves)])
    metrics = {"delta_norm": global_norm(mean),
               "clipped": jnp.sum(jnp.where(present & (norms > clip), 1.0, 0.0)),
               "max_client_delta_norm": jnp.max(jnp.where(present, norms, 0.0)),
               "noise_std": noise_std}
    return add_to(global_params, mean, eta), state, metrics

  return Aggregator("dp_fedavg", init, skip_if_empty(apply), combine="unweighted")
