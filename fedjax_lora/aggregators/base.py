"""The aggregator record and the pytree helpers every server rule shares.

An aggregator is a pair of pure functions (fedjax style): `init(global) -> state` and
`apply(global, clients, weights, present, state, extras) -> (global, state, metrics)`.
Clients of a round are stacked on a leading axis K; absent clients stay in the stack (so
shapes never change and nothing recompiles) and are masked out here with `jnp.where`, so
even NaN values in an absent slot cannot leak into the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = Any
State = Any
HIGHEST = jax.lax.Precision.HIGHEST


# How an aggregator combines the uploads, which decides what can be built around it:
#   "mean"            x + sum_k p_k (y_k - x) on the sent factors: secure aggregation can
#                     serve it and an audit can replay it from the uploads and the p_k;
#   "mean_then_step"  a server optimizer step on that weighted mean: secure aggregation only;
#   "unweighted"      the token weights p_k play no part (order statistics, plain means,
#                     DP-FedAvg's fixed 1 / expected clients);
#   "individual"      needs each update on its own (norms, products, stacking).
COMBINES = ("mean", "mean_then_step", "unweighted", "individual")


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """init(global) -> state; apply(...) -> (global, state, metrics); sends: uplinked factors;
  combine: one of COMBINES."""
  name: str
  init: Callable[[Params], State]
  apply: Callable[..., tuple[Params, State, dict]]
  sends: tuple[str, ...] = ("a", "b")
  combine: str = "individual"

  def __post_init__(self):
    if self.combine not in COMBINES:
      raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")


def expand(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-client vector [K] so it broadcasts against a stacked tensor [K, ...]."""
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def masked_weights(weights: jax.Array, present: jax.Array) -> jax.Array:
  """Weights of present clients renormalised to sum 1 (all zeros when nobody is present)."""
  w = jnp.where(present, weights.astype(jnp.float32), 0.0)
  total = jnp.sum(w)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def client_deltas(global_params: Params, client_params: Params, present: jax.Array) -> Params:
  """y_k - x in float32, zero for absent clients."""
  def one(x, y):
    d = y.astype(jnp.float32) - x.astype(jnp.float32)[None]
    return jnp.where(expand(present, d), d, 0.0)
  return jax.tree.map(one, global_params, client_params)


def weighted_sum(stacked: Params, weights: jax.Array) -> Params:
  """sum_k w_k t_k over the leading client axis, float32 at full precision."""
  return jax.tree.map(
      lambda t: jnp.tensordot(weights.astype(jnp.float32), t.astype(jnp.float32), axes=1,
                              precision=HIGHEST), stacked)


def add_to(global_params: Params, update: Params, scale: float | jax.Array = 1.0) -> Params:
  """x + scale * update, cast back to each leaf's dtype."""
  return jax.tree.map(lambda x, u: (x.astype(jnp.float32) + scale * u).astype(x.dtype),
                      global_params, update)


def global_norm(tree: Params) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.float32(0.0)
  return jnp.sqrt(sum(jnp.sum(jnp.square(l.astype(jnp.float32))) for l in leaves))


def per_client_norm(stacked: Params) -> jax.Array:
  """Global L2 norm over all tensors, one value per client: [K]."""
  leaves = jax.tree.leaves(stacked)
  sq = sum(jnp.sum(jnp.square(l.astype(jnp.float32)).reshape(l.shape[0], -1), axis=1)
           for l in leaves)
  return jnp.sqrt(sq)


def lora_pairs(params: Params) -> dict:
  """The {target: {'a', 'b'}} entries of an adapter pytree (other leaves are ignored)."""
  if not isinstance(params, dict):
    return {}
  return {t: ab for t, ab in params.items() if isinstance(ab, dict) and "a" in ab and "b" in ab}


def stack_ranks(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[K, n, in, r], [K, n, r, out] -> [n, in, K r], [n, K r, out]: Σ_k a_k b_k as one product."""
  k, n, din, r = a.shape
  return (jnp.transpose(a, (1, 2, 0, 3)).reshape(n, din, k * r),
          jnp.transpose(b, (1, 0, 2, 3)).reshape(n, k * r, b.shape[-1]))


def stacked_product_sqnorm(a: jax.Array, b: jax.Array) -> jax.Array:
  """||Σ_k a_k b_k||_F^2 per layer without forming [in, out]: a [K,n,in,r], b [K,n,r,out] -> [n].

  With A, B stacked on the rank axis, ||A B||^2 = sum((A^T A) * (B B^T)), and both Gram
  matrices are only [K r, K r].
  """
  sa, sb = stack_ranks(a, b)
  ga = jnp.matmul(jnp.swapaxes(sa, 1, 2), sa, precision=HIGHEST)
  gb = jnp.matmul(sb, jnp.swapaxes(sb, 1, 2), precision=HIGHEST)
  return jnp.maximum(jnp.sum(ga * gb, axis=(1, 2)), 0.0)


def factor_error(client_params: Params, weights: jax.Array, present: jax.Array) -> jax.Array:
  """sum over targets/layers of ||sum_k p_k A_k B_k - A_bar B_bar||_F (method.md §11.6).

  Uses the covariance form sum_k p_k (A_k - A_bar)(B_k - B_bar), which needs sum p_k = 1.
  """
  p = masked_weights(weights, present)
  total = jnp.float32(0.0)
  for ab in lora_pairs(client_params).values():
    a = jnp.where(expand(present, ab["a"]), ab["a"].astype(jnp.float32), 0.0)
    b = jnp.where(expand(present, ab["b"]), ab["b"].astype(jnp.float32), 0.0)
    a_bar = jnp.tensordot(p, a, axes=1, precision=HIGHEST)
    b_bar = jnp.tensordot(p, b, axes=1, precision=HIGHEST)
    da = jnp.where(expand(present, a), (a - a_bar[None]) * expand(p, a), 0.0)
    db = jnp.where(expand(present, b), b - b_bar[None], 0.0)
    total = total + jnp.sum(jnp.sqrt(stacked_product_sqnorm(da, db)))
  return total


def skip_if_empty(apply: Callable) -> Callable:
  """Wraps apply so that a round with no present client leaves global and state untouched."""
  def wrapped(global_params, client_params, weights, present, state, extras=None):
    new_global, new_state, metrics = apply(global_params, client_params, weights, present, state,
                                           {} if extras is None else extras)
    any_present = jnp.any(present)
    keep = lambda new, old: jnp.where(any_present, new, old)
    new_global = jax.tree.map(keep, new_global, global_params)
    if jax.tree.structure(new_state) == jax.tree.structure(state):
      new_state = jax.tree.map(keep, new_state, state)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    metrics["present_clients"] = jnp.sum(present.astype(jnp.float32))
    return new_global, new_state, metrics
  return wrapped
