"""Training losses over float32 logits."""

import jax
import jax.numpy as jnp
import optax


def causal_lm_loss(logits, tokens, loss_mask):
  """Mean next-token cross-entropy over supervised targets (HF labels=-100 convention).

  logits: float [B, T, V]; tokens: int [B, T]; loss_mask: [B, T], 1 where token t is a
  supervised *target* (e.g. the attention mask for full-sequence loss). Returns
  (mean loss, number of supervised tokens).
  """
  # Targets move left instead of the logits moving right: slicing [B, T-1, V] off the
  # logits would copy the largest array of the step (and pad its gradient back).
  targets = jnp.roll(tokens, -1, axis=1)
  weights = jnp.roll(loss_mask.astype(jnp.float32), -1, axis=1).at[:, -1].set(0.0)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                              targets)
  count = jnp.sum(weights)
  return jnp.sum(per_token * weights) / jnp.maximum(count, 1.0), count
