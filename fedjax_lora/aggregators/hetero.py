"""Aggregators for heterogeneous client ranks: HetLoRA, FlexLoRA, FLoRA (method.md §11.7).

Clients are padded to a common r_max; extras["rank_mask"] [K, r_max] marks each client's
active rank components. The simulator already zeroes inactive ones; we zero them again
here (with `where`, so even NaN is dropped) so the rules never depend on padding values.
Layout: A [K, n, in, r], B [K, n, r, out], ΔW = A B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lora.aggregators.base import (HIGHEST, Aggregator, expand, global_norm, lora_pairs,
                                          masked_weights, skip_if_empty, stack_ranks)


def _check_pairs(params) -> dict:
  pairs = lora_pairs(params)
  if not pairs or len(pairs) != len(params):
    raise ValueError("heterogeneous-rank aggregators need params of the form "
                     "{target: {'a': [n, in, r], 'b': [n, r, out]}}")
  return pairs


def active_components(rank_mask, present, k: int, r: int) -> jax.Array:
  """Boolean [K, r]: rank component j of client k counts (client present and j < r_k)."""
  comp = jnp.ones((k, r), bool) if rank_mask is None else jnp.asarray(rank_mask).astype(bool)
  return comp & present[:, None]


def mask_components(client_params: dict, comp: jax.Array) -> dict:
  """Zeroes inactive rank columns of A and rows of B (float32)."""
  out = {}
  for t, ab in _check_pairs(client_params).items():
    a = ab["a"].astype(jnp.float32)
    b = ab["b"].astype(jnp.float32)
    out[t] = {"a": jnp.where(comp[:, None, None, :], a, 0.0),
              "b": jnp.where(comp[:, None, :, None], b, 0.0)}
  return out


def _masked(client_params, present, extras):
  pairs = _check_pairs(client_params)
  a0 = next(iter(pairs.values()))["a"]
  comp = active_components(extras.get("rank_mask"), present, a0.shape[0], a0.shape[-1])
  return mask_components(client_params, comp), comp


def flora_stack(client_params: dict, weights, present=None, rank_mask=None) -> dict:
  """FLoRA stacking: A_stack = [p_1 A_1 ... p_K A_K], B_stack = [B_1; ...; B_K] on the rank axis.

  A_stack @ B_stack = Σ_k p_k A_k B_k exactly. Returns {target: {'a': [n, in, K r],
  'b': [n, K r, out]}}; absent clients and inactive components contribute zero blocks.
  """
  pairs = _check_pairs(client_params)
  a0 = next(iter(pairs.values()))["a"]
  k, r = a0.shape[0], a0.shape[-1]
  present = jnp.ones((k,), bool) if present is None else jnp.asarray(present).astype(bool)
  weights = jnp.where(present, jnp.asarray(weights, jnp.float32), 0.0)
  masked = mask_components(client_params, active_components(rank_mask, present, k, r))
  out = {}
  for t, ab in masked.items():
    sa, sb = stack_ranks(ab["a"] * expand(weights, ab["a"]), ab["b"])
    out[t] = {"a": sa, "b": sb}
  return out


def hetlora() -> Aggregator:
  """Zero-padded weighted mean with weights ∝ p_k ‖A_k B_k‖_F (normalised over present clients).

  ‖A_k B_k‖_F is one number per client (all targets and layers). A rank component that
  no present client holds keeps its global value instead of collapsing to zero (both
  factors at zero would have zero gradient and never train again).
  """
  def init(global_params):
    _check_pairs(global_params)
    return {}

  def apply(global_params, client_params, weights, present, state, extras):
    masked, comp = _masked(client_params, present, extras)
    p = masked_weights(weights, present)
    sq = 0.0
    for ab in masked.values():
      ga = jnp.einsum("knir,knis->knrs", ab["a"], ab["a"], precision=HIGHEST)
      gb = jnp.einsum("knro,knso->knrs", ab["b"], ab["b"], precision=HIGHEST)
      sq = sq + jnp.sum(ga * gb, axis=(1, 2, 3))
    score = p * jnp.sqrt(jnp.maximum(sq, 0.0))
    total = jnp.sum(score)
    w = jnp.where(total > 0, score / jnp.where(total > 0, total, 1.0), p)
    coverage = jnp.tensordot(w, comp.astype(jnp.float32), axes=1)  # [r]
    new = {}
    for t, ab in masked.items():
      g = global_params[t]
      a = jnp.tensordot(w, ab["a"], axes=1, precision=HIGHEST)
      b = jnp.tensordot(w, ab["b"], axes=1, precision=HIGHEST)
      new[t] = {"a": jnp.where(coverage[None, None, :] > 0, a, g["a"]).astype(g["a"].dtype),
                "b": jnp.where(coverage[None, :, None] > 0, b, g["b"]).astype(g["b"].dtype)}
    diff = jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32),
                        new, global_params)
    metrics = {"delta_norm": global_norm(diff), "max_norm_weight": jnp.max(w)}
    return new, state, metrics

  return Aggregator("hetlora", init, skip_if_empty(apply))


def flexlora() -> Aggregator:
  """ΔW = Σ p_k A_k B_k per target/layer, SVD, global A = U_r S_r and B = V_rᵀ (r = r_max).

  The SVD is taken of the small core of QR factorisations of the stacked factors
  (rank ≤ K r), never of the dense [in, out] matrix.
  """
  def init(global_params):
    _check_pairs(global_params)
    return {}

  def apply(global_params, client_params, weights, present, state, extras):
    p = masked_weights(weights, present)
    stacked = flora_stack(client_params, p, present, extras.get("rank_mask"))
    new, residual = {}, jnp.float32(0.0)
    for t, ab in stacked.items():
      g = global_params[t]
      r = g["a"].shape[-1]
      qa, ra = jnp.linalg.qr(ab["a"])
      qb, rb = jnp.linalg.qr(jnp.swapaxes(ab["b"], -1, -2))
      core = jnp.matmul(ra, jnp.swapaxes(rb, -1, -2), precision=HIGHEST)
      uc, s, vct = jnp.linalg.svd(core, full_matrices=False)
      u = jnp.matmul(qa, uc, precision=HIGHEST)
      vt = jnp.matmul(vct, jnp.swapaxes(qb, -1, -2), precision=HIGHEST)
      q = s.shape[-1]
      if q < r:  # fewer singular values than r_max (tiny shapes): pad with zero components
        u = jnp.pad(u, ((0, 0), (0, 0), (0, r - q)))
        vt = jnp.pad(vt, ((0, 0), (0, r - q), (0, 0)))
        s = jnp.pad(s, ((0, 0), (0, r - q)))
      residual = residual + jnp.sum(jnp.sqrt(jnp.sum(jnp.square(s[:, r:]), axis=-1)))
      new[t] = {"a": (u[..., :r] * s[:, None, :r]).astype(g["a"].dtype),
                "b": vt[:, :r, :].astype(g["b"].dtype)}
    diff = jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32),
                        new, global_params)
    metrics = {"delta_norm": global_norm(diff), "svd_residual": residual}
    return new, state, metrics

  return Aggregator("flexlora", init, skip_if_empty(apply))


def flora() -> Aggregator:
  """FLoRA: merge Σ p_k A_k B_k into a dense state["base_delta"], restart a fresh LoRA.

  The new global is {a: the initial A, b: 0}; the simulator adds s · base_delta
  (s = the LoRA scale) into the frozen base weights before the next round.
  """
  def init(global_params):
    pairs = _check_pairs(global_params)
    return {"init_a": {t: ab["a"].astype(jnp.float32) for t, ab in pairs.items()},
            "base_delta": {t: jnp.zeros(ab["a"].shape[:-1] + ab["b"].shape[-1:], jnp.float32)
                           for t, ab in pairs.items()}}

  def apply(global_params, client_params, weights, present, state, extras):
    p = masked_weights(weights, present)
    stacked = flora_stack(client_params, p, present, extras.get("rank_mask"))
    increment = {t: jnp.matmul(ab["a"], ab["b"], precision=HIGHEST) for t, ab in stacked.items()}
    base_delta = {t: state["base_delta"][t] + increment[t] for t in increment}
    new = {t: {"a": state["init_a"][t].astype(g["a"].dtype), "b": jnp.zeros_like(g["b"])}
           for t, g in global_params.items()}
    metrics = {"delta_norm": global_norm(increment), "base_delta_norm": global_norm(base_delta)}
    return new, {"init_a": state["init_a"], "base_delta": base_delta}, metrics

  return Aggregator("flora", init, skip_if_empty(apply))
