"""Local training of one client as a pure function: one `lax.scan` over its steps.

(global adapter, batches, step mask, rng) -> (client adapter, metrics). Gradients are taken
only with respect to the trainable adapter factors; the frozen base is an argument that
`vmap` broadcasts, so all clients of a round share it. Clients with fewer steps carry
masked (no-op) steps, so every client has the same shapes and nothing recompiles.

The optimizer follows the paper's released code (HF Trainer defaults): AdamW, lr 2e-4,
linear warmup over 5% of the round's steps then cosine decay to 0, grad-norm clip 1.0,
a fresh optimizer state every round unless the caller passes one in.

Example-level DP-SGD (Abadi et al. 2016, method.md §11.8) is on when `dp_clip > 0`: each
step's gradient becomes the sum of per-example gradients clipped to L2 norm `dp_clip`, plus
Gaussian noise N(0, (σ C)^2), divided by the fixed (public) batch size A·B. The optimizer
and `grad_clip` then act on that privatised gradient (post-processing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lora.losses import causal_lm_loss
from models import llama
from models.lora import LoraAdapter, LoraSpec


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Static (hashable) local-training settings."""
  learning_rate: float = 2e-4
  warmup_fraction: float = 0.05
  schedule: str = "cosine"           # "cosine" (warmup + cosine to 0) or "constant"
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0             # global-norm clip; 0 disables
  train_factors: tuple[str, ...] = ("a", "b")  # ffa_lora trains only ("b",)
  prox_mu: float = 0.0               # FedProx proximal term
  scaffold: bool = False             # add (c - c_k) to every (Adam) update direction
  loss_weighting: str = "tokens"     # "tokens": token mean; "examples": mean of row means
  dp_clip: float = 0.0               # per-example L2 clip C; 0 = DP-SGD off, inf = no clip
  dp_noise_multiplier: float = 0.0   # sigma: noise std is sigma * dp_clip per coordinate

  def __post_init__(self):
    if self.schedule not in ("cosine", "constant"):
      raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
    if not set(self.train_factors) <= {"a", "b"} or not self.train_factors:
      raise ValueError(f"train_factors must be a non-empty subset of ('a', 'b')")
    if self.loss_weighting not in ("tokens", "examples"):
      raise ValueError(f"option loss_weighting={self.loss_weighting!r}: must be 'tokens' or "
                       f"'examples'")
    clip, sigma = float(self.dp_clip), float(self.dp_noise_multiplier)
    if not clip >= 0:  # also rejects NaN
      raise ValueError(f"option dp_clip={self.dp_clip!r}: must be >= 0 (0 = off, inf = no clip)")
    if not (sigma >= 0 and math.isfinite(sigma)):
      raise ValueError(f"option dp_noise_multiplier={self.dp_noise_multiplier!r}: must be a "
                       f"finite number >= 0")
    if sigma > 0 and not (clip > 0 and math.isfinite(clip)):
      raise ValueError(f"option dp_noise_multiplier={sigma!r} needs a finite dp_clip > 0 "
                       f"(the noise is calibrated to the clip), got dp_clip={self.dp_clip!r}")
    if clip > 0 and self.loss_weighting != "examples":
      # DP-SGD bounds each example's contribution, so examples weigh equally by construction;
      # asking for token weighting as well would silently not happen.
      raise ValueError(f"option dp_clip={self.dp_clip!r} (DP-SGD) weights every example equally; "
                       f"set loss_weighting='examples' (got {self.loss_weighting!r})")

  @property
  def dp(self) -> bool:
    """Whether example-level DP-SGD is on."""
    return self.dp_clip > 0


def learning_rate(cfg: ClientConfig, step, total_steps):
  """HF-style schedule for a client with `total_steps` real steps (a traced value)."""
  if cfg.schedule == "constant":
    return jnp.float32(cfg.learning_rate)
  total = jnp.maximum(total_steps.astype(jnp.float32), 1.0)
  warmup = jnp.ceil(cfg.warmup_fraction * total)
  step = step.astype(jnp.float32)
  warm = step / jnp.maximum(warmup, 1.0)
  progress = (step - warmup) / jnp.maximum(total - warmup, 1.0)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
  return cfg.learning_rate * jnp.where(step < warmup, warm, cosine)


def optimizer(cfg: ClientConfig) -> optax.GradientTransformation:
  """Adam moments (+ decoupled weight decay); the learning rate is applied by the caller."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  return optax.chain(*parts)


def _factor_mask(params, factors):
  return {t: {f: jnp.asarray(f in factors, jnp.float32) for f in ab} for t, ab in params.items()}


def rank_masked(params, rank_mask):
  """Zeroes rank components beyond a client's own rank (heterogeneous-rank aggregators)."""
  if rank_mask is None:
    return params
  return {t: {"a": ab["a"] * rank_mask[None, None, :], "b": ab["b"] * rank_mask[None, :, None]}
          for t, ab in params.items()}


def _sequence_loss(graphdef, base, adapters, batch):
  logits, _ = llama.forward(graphdef, base, adapters, batch["tokens"],
                            attention_mask=batch["attention_mask"])
  mean, count = causal_lm_loss(logits, batch["tokens"], batch["loss_mask"])
  return mean * count, count


def _row_losses(graphdef, base, adapters, batch):
  """Per-row (mean token loss, supervised tokens), each [B]; empty rows give mean 0."""
  logits, _ = llama.forward(graphdef, base, adapters, batch["tokens"],
                            attention_mask=batch["attention_mask"])
  one = lambda l, t, m: causal_lm_loss(l[None], t[None], m[None])
  return jax.vmap(one)(logits, batch["tokens"], batch["loss_mask"])


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


def dp_gradient(per_example_loss, params, batch, masks, cfg: ClientConfig, key):
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


def client_update(graphdef, base: dict, trainable: dict, specs: dict[str, LoraSpec],
                  batches: dict, step_mask, rng, cfg: ClientConfig, *,
                  anchor: dict | None = None, control: Any = None, rank_mask=None,
                  opt_state=None):
  """Trains `trainable` ({"global": params, ["local": params]}) over the masked steps.

  batches: {"tokens", "attention_mask", "loss_mask"} each [S, A, B, L] (S steps of A
  accumulated micro-batches). anchor: the round's global params (FedProx). control:
  (c, c_k) SCAFFOLD controls. Returns (trainable, opt_state, metrics).
  """
  # rng drives the DP-SGD noise (one fresh key per step); dropout is 0 in the paper's setting.
  names = sorted(trainable)
  # Heterogeneous ranks apply to the shared (global) adapter only.
  trainable = {n: rank_masked(trainable[n], rank_mask) if n == "global" else trainable[n]
               for n in names}
  masks = {n: _factor_mask(trainable[n], cfg.train_factors if n == "global" else ("a", "b"))
           for n in names}
  if cfg.dp and cfg.dp_noise_multiplier > 0 and rng is None:
    raise ValueError("client_update: dp_noise_multiplier > 0 needs an rng key for the noise")
  tx = optimizer(cfg)
  opt_state = tx.init(trainable) if opt_state is None else opt_state
  total = jnp.sum(step_mask.astype(jnp.int32))

  def loss_fn(params, micro):
    adapters = [LoraAdapter(params[n], specs[n]) for n in names]
    return _sequence_loss(graphdef, base, adapters, micro)

  def example_loss_fn(params, micro):
    """Sum of row mean losses (the objective), with (token loss sum, tokens, real rows)."""
    adapters = [LoraAdapter(params[n], specs[n]) for n in names]
    mean, count = _row_losses(graphdef, base, adapters, micro)
    return jnp.sum(mean), (jnp.sum(mean * count), jnp.sum(count),
                           jnp.sum((count > 0).astype(jnp.float32)))

  def row_loss_fn(params, row):
    adapters = [LoraAdapter(params[n], specs[n]) for n in names]
    mean, count = _row_losses(graphdef, base, adapters, jax.tree.map(lambda x: x[None], row))
    return mean[0], count[0]

  def one_step(carry, xs):
    params, state, i, lr_sum, clip_acc = carry
    batch, active, index = xs

    if cfg.dp:
      key = jax.random.fold_in(rng, index)
      grads, (loss_sum, count, real, clipped) = dp_gradient(row_loss_fn, params, batch, masks,
                                                            cfg, key)
      clip_acc = clip_acc + jnp.where(active, jnp.stack([clipped, real]), 0.0)
    elif cfg.loss_weighting == "examples":
      def micro_step(acc, micro):
        (_, aux), grads = jax.value_and_grad(example_loss_fn, has_aux=True)(params, micro)
        return jax.tree.map(jnp.add, acc, (aux, grads)), None

      zeros = ((jnp.float32(0),) * 3, jax.tree.map(jnp.zeros_like, params))
      ((loss_sum, count, real), grads), _ = jax.lax.scan(micro_step, zeros, batch)
      grads = jax.tree.map(lambda g: g / jnp.maximum(real, 1.0), grads)
    else:
      def micro_step(acc, micro):
        (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro)
        return jax.tree.map(jnp.add, acc, (loss_sum, count, grads)), None

      zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
      (loss_sum, count, grads), _ = jax.lax.scan(micro_step, zeros, batch)
      grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    if cfg.prox_mu and anchor is not None:
      grads["global"] = jax.tree.map(lambda g, w, w0: g + cfg.prox_mu * (w - w0),
                                     grads["global"], params["global"], anchor)
    grads = jax.tree.map(jnp.multiply, grads, masks)
    grads = {n: rank_masked(grads[n], rank_mask) if n == "global" else grads[n] for n in names}
    updates, new_state = tx.update(grads, state, params)
    if cfg.scaffold and control is not None:
      # The drift correction joins the Adam direction (not the raw gradient), so it is in
      # the same units as the controls: (x - y) / sum(lr) is a mean update direction.
      c, c_k = control
      updates["global"] = jax.tree.map(lambda u, cs, ck: u + cs - ck, updates["global"], c, c_k)
    lr = learning_rate(cfg, i, total)
    new_params = jax.tree.map(lambda p, u, m: p - lr * u * m, params, updates, masks)
    keep = lambda new, old: jnp.where(active, new, old)
    params = jax.tree.map(keep, new_params, params)
    state = jax.tree.map(keep, new_state, state)
    i = i + active.astype(jnp.int32)
    lr_sum = lr_sum + jnp.where(active, lr, 0.0)
    return (params, state, i, lr_sum, clip_acc), (jnp.where(active, loss_sum, 0.0),
                                                  jnp.where(active, count, 0.0))

  # The step index (noise keys) and the clip counters exist only with DP: the plain path
  # scans exactly what it did before.
  index = jnp.arange(step_mask.shape[0], dtype=jnp.int32) if cfg.dp else None
  clip_acc = jnp.zeros((2,), jnp.float32) if cfg.dp else ()
  init = (trainable, opt_state, jnp.int32(0), jnp.float32(0), clip_acc)
  (trained, opt_state, steps, lr_sum, clip_acc), (losses, counts) = jax.lax.scan(
      one_step, init, (batches, step_mask, index))
  tokens = jnp.sum(counts)
  metrics = {"train_loss": jnp.sum(losses) / jnp.maximum(tokens, 1.0), "train_tokens": tokens,
             "steps": steps, "lr_sum": lr_sum}
  if cfg.dp:
    metrics["dp_clipped_fraction"] = clip_acc[0] / jnp.maximum(clip_acc[1], 1.0)
  return trained, opt_state, metrics


def scaffold_control(c, c_k, global_params, client_params, lr_sum):
  """SCAFFOLD option II: c_k+ = c_k - c + (x - y_k) / (K * eta), with K*eta = sum of step lrs.

  With the correction applied to the update direction, this is the client's mean Adam
  direction over the round, the quantity the controls estimate.
  """
  scale = 1.0 / jnp.maximum(lr_sum, 1e-12)
  return jax.tree.map(lambda cs, ck, x, y: ck - cs + (x - y) * scale, c, c_k, global_params,
                      client_params)


def steps_per_round(num_examples: int, batch_size: int, accumulation: int, epochs: int) -> int:
  """Optimizer steps for one client round: ceil(examples / (batch * accumulation)) per epoch."""
  return epochs * max(1, math.ceil(num_examples / (batch_size * accumulation)))
