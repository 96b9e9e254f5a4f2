"""Local training of one client as a pure function: one `lax.scan` over its steps.

(global adapter, batches, step mask, rng) -> (client adapter, metrics). Gradients are taken
only with respect to the trainable adapter factors; the frozen base is an argument that
`vmap` broadcasts, so all clients of a round share it. Clients with fewer steps carry
masked (no-op) steps, so every client has the same shapes and nothing recompiles.

The optimizer follows the paper's released code (HF Trainer defaults): AdamW, lr 2e-4,
linear warmup over 5% of the round's steps then cosine decay to 0, grad-norm clip 1.0,
a fresh optimizer state every round unless the caller passes one in.

A step's gradient comes from the estimator `gradient_estimator` picks from the config before
the scan (`fedjax_lora/gradients.py`): the token mean, the example mean, or example-level
DP-SGD when `dp_clip > 0` (`fedjax_lora/privacy/dp_sgd.py`), so the step body does not
branch on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lora import gradients
from fedjax_lora.gradients import GradientEstimator
from fedjax_lora.losses import causal_lm_loss
from fedjax_lora.privacy import dp_sgd
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
    dp_sgd.check_options(self.dp_clip, self.dp_noise_multiplier, self.loss_weighting)

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


def gradient_estimator(cfg: ClientConfig, graphdef, base: dict, specs: dict[str, LoraSpec],
                       names: list[str], masks: dict, rng) -> GradientEstimator:
  """The estimator of a step's gradient for `cfg`, chosen once per program, before the scan.

  DP-SGD (`cfg.dp`) clips and noises per-example gradients; otherwise the gradient of the
  token mean (`loss_weighting="tokens"`) or of the example mean ("examples"). `names`
  orders the adapters of the trainable dict; `masks` are its factor masks (DP-SGD clips and
  noises the trained factors only); `rng` keys DP-SGD's noise.
  """
  def adapters(params):
    return [LoraAdapter(params[n], specs[n]) for n in names]

  def row_losses(params, micro):
    return _row_losses(graphdef, base, adapters(params), micro)

  if cfg.dp:
    return dp_sgd.estimator(row_losses, masks, cfg, rng)
  if cfg.loss_weighting == "examples":
    return gradients.example_weighted(row_losses)
  return gradients.token_weighted(
      lambda params, micro: _sequence_loss(graphdef, base, adapters(params), micro))


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
  estimator = gradient_estimator(cfg, graphdef, base, specs, names, masks, rng)
  tx = optimizer(cfg)
  opt_state = tx.init(trainable) if opt_state is None else opt_state
  total = jnp.sum(step_mask.astype(jnp.int32))

  def one_step(carry, xs):
    params, state, i, lr_sum, stats = carry
    batch, active, step_input = xs

    grads, (loss_sum, count), step_stats = estimator.grad(params, batch, step_input)
    stats = jax.tree.map(lambda acc, s: acc + jnp.where(active, s, 0.0), stats, step_stats)
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
    return (params, state, i, lr_sum, stats), (jnp.where(active, loss_sum, 0.0),
                                               jnp.where(active, count, 0.0))

  init = (trainable, opt_state, jnp.int32(0), jnp.float32(0), estimator.stats)
  xs = (batches, step_mask, estimator.step_inputs(step_mask.shape[0]))
  (trained, opt_state, steps, lr_sum, stats), (losses, counts) = jax.lax.scan(one_step, init, xs)
  tokens = jnp.sum(counts)
  metrics = {"train_loss": jnp.sum(losses) / jnp.maximum(tokens, 1.0), "train_tokens": tokens,
             "steps": steps, "lr_sum": lr_sum}
  metrics.update(estimator.metrics(stats))
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
