"""SCAFFOLD server step (Karimireddy et al. 2020, option II; method.md §11.3).

x ← x + η_g · (1/|S|) Σ_{k∈S} (y_k − x)   (plain mean over present clients, not p_k)
c ← c + (1/N) Σ_{k∈S} Δc_k                 (N = all clients of the federation)

The server control c lives in state["control"] (same structure as the params) so the
client side reads it from the server state; clients send Δc_k in extras["control_delta"].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lora.aggregators.base import (Aggregator, add_to, client_deltas, expand, global_norm,
                                          skip_if_empty, weighted_sum)
from fedjax_lora.aggregators.fedopt import check_range


def scaffold(server_lr: float = 1.0) -> Aggregator:
  lr = check_range("server_lr", server_lr, 0.0)

  def init(global_params):
    return {"control": jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), global_params)}

  def apply(global_params, client_params, weights, present, state, extras):
    if "control_delta" not in extras:
      raise ValueError("scaffold needs extras['control_delta'] (stacked Δc_k of the round)")
    k = present.shape[0]
    count = jnp.sum(present.astype(jnp.float32))
    uniform = jnp.where(present, 1.0 / jnp.maximum(count, 1.0), 0.0)
    delta = weighted_sum(client_deltas(global_params, client_params, present), uniform)
    num_clients = jnp.asarray(extras.get("num_clients", k), jnp.float32)

    def control_step(c, dc):
      dc = jnp.where(expand(present, dc), dc.astype(jnp.float32), 0.0)
      return c + jnp.sum(dc, axis=0) / num_clients
    control = jax.tree.map(control_step, state["control"], extras["control_delta"])
    metrics = {"delta_norm": global_norm(delta), "control_norm": global_norm(control)}
    return add_to(global_params, delta, lr), {"control": control}, metrics

  return Aggregator("scaffold", init, skip_if_empty(apply), combine="unweighted")
