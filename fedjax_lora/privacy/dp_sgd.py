"""Example-level DP-SGD for the client's local steps (Abadi et al. 2016, method.md §11.8).

On when `ClientConfig.dp_clip > 0`: each step's gradient becomes the sum of per-example
gradients clipped to L2 norm `dp_clip`, plus Gaussian noise N(0, (σ C)^2), divided by the
fixed (public) batch size A·B. The optimizer and `grad_clip` then act on that privatised
gradient (post-processing). `fedjax_lora.client` chooses `estimator` for DP configs before
its step scan; the epsilon these steps spend is `fedjax_lora.privacy.accounting`'s.

This module reads the client's config by attribute (`dp_clip`, `dp_noise_multiplier`) and
does not import `fedjax_lora.client`, which imports it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lora.gradients import GradientEstimator


def check_options(dp_clip, dp_noise_multiplier, loss_weighting: str) -> None:
  """Raises ValueError unless the DP-SGD options of a ClientConfig are consistent."""
  clip, sigma = float(dp_clip), float(dp_noise_multiplier)
  if not clip >= 0:  # also rejects NaN
    raise ValueError(f"option dp_clip={dp_clip!r}: must be >= 0 (0 = off, inf = no clip)")
  if not (sigma >= 0 and math.isfinite(sigma)):
    raise ValueError(f"option dp_noise_multiplier={dp_noise_multiplier!r}: must be a "
                     f"finite number >= 0")
  if sigma > 0 and not (clip > 0 and math.isfinite(clip)):
    raise ValueError(f"option dp_noise_multiplier={sigma!r} needs a finite dp_clip > 0 "
                     f"(the noise is calibrated to the clip), got dp_clip={dp_clip!r}")
  if clip > 0 and loss_weighting != "examples":
    # DP-SGD bounds each example's contribution, so examples weigh equally by construction;
    # asking for token weighting as well would silently not happen.
    raise ValueError(f"option dp_clip={dp_clip!r} (DP-SGD) weights every example equally; "
                     f"set loss_weighting='examples' (got {loss_weighting!r})")


def clip_per_example(grads, clip):
  """Scales each per-example gradient (leading axis [B]) to global L2 norm <= clip.

  The norm is over every leaf together, so callers pass gradients already multiplied by
  their factor masks: only factors that are actually trained count. Returns
  (clipped grads, norms [B]); `clip` may be inf (no clipping).
  """
  leaves = jax.tree.leaves(grads)
  sq = sum(jnp.sum(jnp.square(l.astype(jnp.float32)).reshape(l.shape[0], -1), axis=1)
           for l in leaves)
  norms = jnp.sqrt(sq)
  scale = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30))
  clipped = jax.tree.map(lambda g: (g * scale.reshape((-1,) + (1,) * (g.ndim - 1))
                                    ).astype(g.dtype), grads)
  return clipped, norms


def gaussian_noise(key, tree, std, masks=None):
  """N(0, std^2) in every coordinate of `tree`'s leaves, zero where `masks` is 0."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [(std * jax.random.normal(k, l.shape, jnp.float32)).astype(l.dtype)
           for k, l in zip(keys, leaves)]
  noise = jax.tree.unflatten(treedef, noise)
  return noise if masks is None else jax.tree.map(jnp.multiply, noise, masks)


def dp_gradient(per_example_loss, params, batch, masks, cfg, key):
  """One DP-SGD step gradient over a step's micro-batches ([A, B, ...] leaves).

  per_example_loss(params, row) -> (mean token loss, supervised tokens) for one row (leaves
  without the B axis). Each per-example gradient is masked, clipped to cfg.dp_clip, summed
  over all A·B rows, noised with N(0, (sigma C)^2) on the trained coordinates only, and
  divided by A·B, the fixed batch size (public, unlike the number of real rows). Rows with
  no supervised token have loss 0, hence zero gradient. Returns (grad, aux) with aux =
  (token loss sum, tokens, real examples, clipped real examples).
  """
  grad_row = jax.vmap(jax.value_and_grad(per_example_loss, has_aux=True), in_axes=(None, 0))
  a, b = jax.tree.leaves(batch)[0].shape[:2]

  def micro_step(acc, micro):
    (mean, count), grads = grad_row(params, micro)
    grads = jax.tree.map(lambda g, m: g * m, grads, masks)
    grads, norms = clip_per_example(grads, cfg.dp_clip)
    real = count > 0
    stats = (jnp.sum(mean * count), jnp.sum(count), jnp.sum(real.astype(jnp.float32)),
             jnp.sum((real & (norms > cfg.dp_clip)).astype(jnp.float32)))
    summed = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
    return jax.tree.map(jnp.add, acc, (summed, stats)), None

  zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.float32(0),) * 4)
  (total, stats), _ = jax.lax.scan(micro_step, zeros, batch)
  if cfg.dp_noise_multiplier > 0:
    noise = gaussian_noise(key, total, cfg.dp_noise_multiplier * cfg.dp_clip, masks)
    total = jax.tree.map(jnp.add, total, noise)
  return jax.tree.map(lambda g: g / (a * b), total), stats


def _step_indices(num_steps: int):
  return jnp.arange(num_steps, dtype=jnp.int32)


def _clipped_fraction(stats) -> dict:
  return {"dp_clipped_fraction": stats[0] / jnp.maximum(stats[1], 1.0)}


def estimator(row_losses, masks, cfg, rng) -> GradientEstimator:
  """The DP-SGD step gradient as a `GradientEstimator`.

  row_losses(params, micro) -> (mean token loss, supervised tokens), each [B]. masks: the
  factor masks (trained factors 1), so that only trained coordinates count in the clip norm
  and get noise. rng: the client's key; step i's noise uses fold_in(rng, i), so the step
  index is the scanned per-step input. The stats are (clipped real rows, real rows), summed
  over active steps into the round's `dp_clipped_fraction`.
  """
  if cfg.dp_noise_multiplier > 0 and rng is None:
    raise ValueError("client_update: dp_noise_multiplier > 0 needs an rng key for the noise")

  def per_example_loss(params, row):
    mean, count = row_losses(params, jax.tree.map(lambda x: x[None], row))
    return mean[0], count[0]

  def grad(params, batch, index):
    key = jax.random.fold_in(rng, index)
    grads, (loss_sum, count, real, clipped) = dp_gradient(per_example_loss, params, batch,
                                                          masks, cfg, key)
    return grads, (loss_sum, count), jnp.stack([clipped, real])

  return GradientEstimator(grad, stats=jnp.zeros((2,), jnp.float32),
                           step_inputs=_step_indices, metrics=_clipped_fraction)
