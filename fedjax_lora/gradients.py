"""Gradient estimators: how one local step turns its micro-batches into one gradient.

`fedjax_lora.client.gradient_estimator` picks one from the `ClientConfig` before the step
`lax.scan` is traced, so the scanned step body is the same for all of them: it calls
`grad`, adds the step's `stats` up over the active steps, and reports `metrics(stats)` at
the end. The plain estimators (here) have no per-step input and no stats (None and ()), so
their scan carries and scans exactly what it would without the estimator machinery;
DP-SGD's is in `fedjax_lora.privacy.dp_sgd`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


def _no_step_input(num_steps: int):
  return None


def _no_metrics(stats) -> dict:
  return {}


class GradientEstimator(NamedTuple):
  """One step's gradient and what the round accumulates alongside it.

  grad(params, batch, step_input) -> (grads, (token loss sum, tokens), stats): batch leaves
    are [A, B, ...] (A accumulated micro-batches); grads are before the factor masks.
  stats: zeros shaped like the per-step stats (a pytree; () for none).
  step_inputs(num_steps) -> the per-step scanned input handed to `grad` (None for none).
  metrics(summed stats) -> extra round metrics.
  """
  grad: Callable
  stats: Any = ()
  step_inputs: Callable[[int], Any] = _no_step_input
  metrics: Callable[[Any], dict] = _no_metrics


def token_weighted(sequence_loss) -> GradientEstimator:
  """The token mean over all of a step's micro-batches (HF's loss over the whole batch).

  sequence_loss(params, micro) -> (token loss sum, supervised tokens) of one micro-batch.
  """
  def grad(params, batch, _):
    def micro_step(acc, micro):
      (loss_sum, count), grads = jax.value_and_grad(sequence_loss, has_aux=True)(params, micro)
      return jax.tree.map(jnp.add, acc, (loss_sum, count, grads)), None

    zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, count, grads), _ = jax.lax.scan(micro_step, zeros, batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    return grads, (loss_sum, count), ()

  return GradientEstimator(grad)


def example_weighted(row_losses) -> GradientEstimator:
  """The mean over a step's real rows of each row's token mean (every example weighs 1).

  row_losses(params, micro) -> (mean token loss, supervised tokens), each [B]; rows with no
  supervised token have mean 0 and are not counted.
  """
  def objective(params, micro):
    """Sum of row mean losses (the objective), with (token loss sum, tokens, real rows)."""
    mean, count = row_losses(params, micro)
    return jnp.sum(mean), (jnp.sum(mean * count), jnp.sum(count),
                           jnp.sum((count > 0).astype(jnp.float32)))

  def grad(params, batch, _):
    def micro_step(acc, micro):
      (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, micro)
      return jax.tree.map(jnp.add, acc, (aux, grads)), None

    zeros = ((jnp.float32(0),) * 3, jax.tree.map(jnp.zeros_like, params))
    ((loss_sum, count, real), grads), _ = jax.lax.scan(micro_step, zeros, batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(real, 1.0), grads)
    return grads, (loss_sum, count), ()

  return GradientEstimator(grad)
