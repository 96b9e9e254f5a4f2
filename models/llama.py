"""LLaMA-family decoder in Flax NNX, trained as pure pytrees.

Layer weights are stacked on a leading axis and run under `jax.lax.scan`, so compile
time stays flat in depth. Weights use Hugging Face's layout up to a transpose
([in, out] kernels, rotate-half RoPE), so checkpoint conversion needs no permutation.

The pure entry point is `forward(graphdef, base_params, adapters, tokens, ...)`: base
params are a plain dict (from `split_model`), adapters a sequence of `LoraAdapter`s
whose contributions are summed (e.g. a global and a local adapter).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models import lora as lora_lib
from models import quant
from models.config import LlamaConfig, rope_inverse_frequencies

_cp = jax.checkpoint_policies
# Named remat policies for the per-layer scan body. Names refer to `checkpoint_name` tags.
REMAT_POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,
    "save_qkv": _cp.save_only_these_names("query", "key", "value"),
    "save_attn_out": _cp.save_only_these_names("query", "key", "value", "attn_out"),
    "save_dots_except_mlp": _cp.save_only_these_names(
        "query", "key", "value", "attn_out", "attn_proj"),
}

LAYER_WEIGHTS = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj",
                 "mlp_norm", "gate_proj", "up_proj", "down_proj")


def _normal(rng, shape, dtype, std=0.02):
  return (std * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)


class DecoderStack(nnx.Module):
  """All decoder layers, each weight stacked over a leading layer axis."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    L, dt = config.num_layers, config.jnp_param_dtype
    self.attn_norm = nnx.Param(jnp.ones((L, config.hidden_size), dt))
    self.mlp_norm = nnx.Param(jnp.ones((L, config.hidden_size), dt))
    for target in lora_lib.ALL_TARGETS:
      fan_in, fan_out = lora_lib.projection_shape(config, target)
      setattr(self, target, nnx.Param(_normal(rngs.params(), (L, fan_in, fan_out), dt)))


class Llama(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt = config.jnp_param_dtype
    self.embed = nnx.Param(_normal(rngs.params(), (config.vocab_size, config.hidden_size), dt))
    self.layers = DecoderStack(config, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dt))
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Param(_normal(rngs.params(), (config.hidden_size, config.vocab_size), dt))

  def __call__(self, tokens, *, positions=None, attention_mask=None, adapters=(),
               cache=None, dropout_rng=None, return_hidden=False, fresh_cache=False):
    """Returns (float32 logits [B, T, V], updated cache or None).

    tokens: int [B, T]. attention_mask: [B, T], 1 for real tokens (default all ones).
    positions: int [B, T] RoPE positions (default: count of real tokens before each one).
    cache: from `init_cache`; the T new tokens are written at `cache['index']`.
    fresh_cache: the caller promises the cache holds nothing yet (index 0: a prefill), so
      attention runs among the new tokens only, as without a cache, instead of over every
      (empty) slot. Earlier slots of a used cache would be ignored.
    dropout_rng: enables LoRA dropout (training); None = deterministic. Under `vmap` over
      clients pass one key per client (vmapped), or every client draws the same mask.
    return_hidden: return the final-norm hidden states instead of logits (see `lm_head`).
    """
    cfg = self.config
    B, T = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((B, T), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = default_positions(attention_mask, cache)
    embed = self.embed.get_value()
    if isinstance(embed, quant.QuantizedWeight):  # a GGUF base's quantized rows (keep)
      h = quant.take_rows(embed, tokens, cfg.jnp_dtype)
    else:
      h = jnp.take(embed, tokens, axis=0).astype(cfg.jnp_dtype)

    masks, new_valid = _attention_masks(attention_mask, cache, T, fresh_cache)
    cos, sin = _rope_tables(cfg, positions)
    # A quantized projection is a QuantizedWeight whose arrays the scan slices per layer
    # like a float weight's: each layer dequantizes only its own (see `_project`).
    stacked = {name: getattr(self.layers, name).get_value() for name in LAYER_WEIGHTS}
    lora_views = tuple(lora_lib.per_layer_view(a, cfg.num_layers)
                       for a in lora_lib.as_adapter_list(adapters))
    lora_meta = tuple(a.spec for a in lora_lib.as_adapter_list(adapters))
    # Each layer reads its own slice of the cache and returns only its new tokens' keys and
    # values, which are written into the stacked cache once, after the layers; the new
    # tokens attend to each other directly. A prefill (fresh_cache) therefore runs the
    # blocked causal attention over the prompt alone, not over every empty slot. Decoding
    # steps cost the same as with the writes inside the layer loop (0.51 s per step at the
    # 30-layer SmolLM2-135M shape, batch 16, 640 slots, 2 CPU cores: XLA updated in place).
    old = None if cache is None or fresh_cache else {"k": cache["k"], "v": cache["v"]}
    xs = {"w": stacked, "lora": lora_views, "layer": jnp.arange(cfg.num_layers), "cache": old}

    def layer(h, x):
      return _decoder_layer(cfg, h, x, lora_meta, masks, cos, sin, dropout_rng,
                            keep_kv=cache is not None)

    policy_name = cfg.remat
    if policy_name != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[policy_name], prevent_cse=False)

    if cfg.scan_layers:
      h, new_kv = jax.lax.scan(layer, h, xs)
    else:
      outs = []
      for i in range(cfg.num_layers):
        x = jax.tree.map(lambda a: a[i], xs)
        x["layer"] = i  # static (unless remat traces it): the dropout key is a plain fold
        h, kv = layer(h, x)
        outs.append(kv)
      new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

    h = rms_norm(h, self.final_norm[...], cfg.rms_norm_eps)
    logits = h if return_hidden else self.logits(h)
    new_cache = None
    if cache is not None:
      at = cache["index"]
      new_cache = {
          "k": jax.lax.dynamic_update_slice(cache["k"], new_kv["k"].astype(cache["k"].dtype),
                                            (0, 0, 0, 0, at)),
          "v": jax.lax.dynamic_update_slice(cache["v"], new_kv["v"].astype(cache["v"].dtype),
                                            (0, 0, 0, at, 0)),
          "valid": new_valid, "index": at + T}
    return logits, new_cache

  def logits(self, hidden):
    """float32 logits of final-norm hidden states [..., D] (e.g. only a row's last token)."""
    cfg = self.config
    head = (self.embed if cfg.tie_word_embeddings else self.lm_head).get_value()
    if isinstance(head, quant.QuantizedWeight):  # [V, D] as a GGUF file stores it (keep)
      return quant.matmul(hidden.astype(cfg.jnp_dtype), head, cfg.jnp_dtype, jnp.float32)
    head = head.T if cfg.tie_word_embeddings else head
    return jnp.einsum("...d,dv->...v", hidden, head.astype(cfg.jnp_dtype),
                      preferred_element_type=jnp.float32)


def rms_norm(x, weight, eps):
  """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def _rope_tables(cfg: LlamaConfig, positions):
  inv_freq = jnp.asarray(rope_inverse_frequencies(cfg))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, head_dim]
  return jnp.cos(emb).astype(cfg.jnp_dtype), jnp.sin(emb).astype(cfg.jnp_dtype)


def _apply_rope(x, cos, sin):
  """Rotate-half RoPE on x [B, T, heads, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def default_positions(attention_mask, cache=None):
  """Position = number of real tokens before this one (left padding gets correct RoPE)."""
  offset = 0 if cache is None else jnp.sum(cache["valid"], axis=-1, keepdims=True)
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0) + offset


def _attention_masks(attention_mask, cache, T, fresh_cache=False):
  """({"new": [B, 1, T, T], "old": [B, 1, 1, S] or None}, the cache's new validity or None).

  "new": causal among the T new tokens over the real ones, plus each query's own token (so
  padding queries never see an all-masked row and no NaN appears). "old": the cache slots
  written before this call that hold real tokens (all earlier slots, so causal).
  """
  q_slot = jnp.arange(T)
  new = ((q_slot[None, :] <= q_slot[:, None])[None] & attention_mask[:, None, :]) | \
      (q_slot[None, :] == q_slot[:, None])[None]
  masks = {"new": new[:, None], "old": None}
  if cache is None:
    return masks, None
  valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask, (0, cache["index"]))
  if not fresh_cache:
    S = cache["valid"].shape[1]
    before = jnp.arange(S) < cache["index"]
    masks["old"] = (cache["valid"] & before[None])[:, None, None, :]
  return masks, valid


@jax.custom_vjp
def lora_up(low, b):
  """low [B, T, r] @ b [r, out], whose backward pass materialises the incoming gradient.

  The gradient dB = lowᵀ dy contracts dy over tokens. Left alone, XLA:CPU fuses the
  elementwise producer of dy (e.g. SiLU's backward) into a transposing copy with strided
  reads, which cost more than the MLP's matmuls; the barrier makes it a plain transpose.
  Measured on the CPU benchmark shape: the LoRA-MLP backward went from 75 to 42 ms.
  Reverse mode only (a custom VJP): `jax.jvp` through it is not supported.
  """
  return jnp.einsum("btr,rf->btf", low, b)


def _lora_up_fwd(low, b):
  return lora_up(low, b), (low, b)


def _lora_up_bwd(residuals, dy):
  low, b = residuals
  dy = jax.lax.optimization_barrier(dy)
  return (jnp.einsum("btf,rf->btr", dy, b).astype(low.dtype),
          jnp.einsum("btr,btf->rf", low, dy).astype(b.dtype))


lora_up.defvjp(_lora_up_fwd, _lora_up_bwd)


def _project(x, w, target, lora_views, lora_meta, layer_idx, dropout_rng, dtype):
  if isinstance(w, quant.QuantizedWeight):  # this layer's packed [out, in] weight
    y = quant.matmul(x, w, dtype)
  else:
    y = jnp.einsum("btd,df->btf", x, w.astype(dtype))
  for k, ((params, scale), spec) in enumerate(zip(lora_views, lora_meta)):
    if target not in params:
      continue
    ab = params[target]
    xin = x
    if dropout_rng is not None and spec.dropout > 0:
      key = jax.random.fold_in(jax.random.fold_in(dropout_rng, layer_idx),
                               k * 16 + lora_lib.ALL_TARGETS.index(target))
      keep = jax.random.bernoulli(key, 1.0 - spec.dropout, x.shape)
      xin = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
    # The scale multiplies the rank-r activation, not the [B, T, out] product: the
    # backward pass then feeds dy straight into both small matmuls (no scaled copy).
    low = jnp.einsum("btd,dr->btr", xin, ab["a"].astype(dtype)) * scale.astype(dtype)
    y = y + lora_up(low, ab["b"].astype(dtype))
  return y


def _decoder_layer(cfg: LlamaConfig, h, x, lora_meta, masks, cos, sin, dropout_rng, keep_kv):
  """One layer: (h, this call's keys [B, kv, hd, T] and values [B, kv, T, hd] for the
  cache, or None without one)."""
  w, layer_idx, dt = x["w"], x["layer"], cfg.jnp_dtype
  # Per-layer slices of each adapter: ((params, scale_scalar), ...).
  lora_views = tuple((params, scale) for params, scale in x["lora"])

  def proj(inp, target):
    return _project(inp, w[target], target, lora_views, lora_meta, layer_idx, dropout_rng, dt)

  B, T, _ = h.shape
  normed = rms_norm(h, w["attn_norm"], cfg.rms_norm_eps)
  q = checkpoint_name(proj(normed, "q_proj"), "query").reshape(B, T, cfg.num_heads, cfg.head_dim)
  k = checkpoint_name(proj(normed, "k_proj"), "key").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  v = checkpoint_name(proj(normed, "v_proj"), "value").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
  if x["cache"] is None:
    attn = causal_attention(q, k, v, masks["new"], cfg.attention_impl)
  else:
    attn = _cached_attention(q, x["cache"]["k"].astype(dt), x["cache"]["v"].astype(dt),
                             masks["old"], k, v, masks["new"])
  attn = checkpoint_name(attn.reshape(B, T, cfg.num_heads * cfg.head_dim), "attn_out")
  h = h + checkpoint_name(proj(attn, "o_proj"), "attn_proj")

  normed = rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps)
  gated = jax.nn.silu(proj(normed, "gate_proj")) * proj(normed, "up_proj")
  h = h + proj(gated, "down_proj")
  if not keep_kv:
    return h, None
  # Keys [B, kv, hd, T] and values [B, kv, T, hd]: the cache's layouts (see `init_cache`).
  return h, {"k": k.transpose(0, 2, 3, 1), "v": v.transpose(0, 2, 1, 3)}


CAUSAL_BLOCK = 128


def causal_attention(q, k, v, mask, implementation=None):
  """Attention of q [B, T, H, hd] over k, v [B, T, kv, hd] under a causal mask [B, 1, T, T]
  (no query sees a later key).

  With `implementation` unset and T of at least two CAUSAL_BLOCKs, the queries go in
  blocks of CAUSAL_BLOCK rows (the last may be shorter), each over the keys up to its own
  end only: the masked upper triangle is neither multiplied nor exponentiated (at 4
  blocks, 10 of 16 tiles). On 2 CPU cores at the SmolLM2-135M shape ([4, 512], 9/3 heads)
  one layer's forward+backward took 150 ms this way against 244 ms through
  `jax.nn.dot_product_attention` (torch's fused SDPA: 183 ms). Otherwise, and for a named
  `implementation` (e.g. cudnn), `jax.nn.dot_product_attention`.
  """
  B, T, H, hd = q.shape
  if implementation or T < 2 * CAUSAL_BLOCK:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  kv = k.shape[2]
  g = H // kv
  neg = -0.7 * jnp.finfo(jnp.float32).max
  outs = []
  for lo in range(0, T, CAUSAL_BLOCK):
    hi = min(T, lo + CAUSAL_BLOCK)
    qb = q[:, lo:hi].reshape(B, hi - lo, kv, g, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qb, k[:, :hi], preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None, lo:hi, :hi], logits * hd ** -0.5, neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("bkgts,bskd->btkgd", probs, v[:, :hi]).reshape(B, hi - lo, H, hd))
  return jnp.concatenate(outs, axis=1)


def _cached_attention(q, k_slots, v_slots, old_mask, k_new, v_new, new_mask):
  """Attention of q [B, T, H, hd] over one layer's earlier cache slots (k [B, kv, hd, S],
  v [B, kv, S, hd], old_mask [B, 1, 1 or T, S]) and this call's own tokens (k_new, v_new
  [B, T, kv, hd], new_mask [B, 1, T, T]), under one softmax.

  The arithmetic of `jax.nn.dot_product_attention`'s XLA path (scale after the dot, float32
  softmax, the same large negative for masked keys), with each KV head's query heads
  stacked into one matrix so both products are plain batched matmuls over (row, KV head).
  At the small benchmark shape (batch 16, 256 slots) the two products of a decoding step
  took 2.6 ms per layer through `dot_product_attention` on [hd, S] value slots, 1.6 ms
  here. `attention_impl` does not apply here (decoding steps; a prefill runs
  `causal_attention`).
  """
  B, T, H, hd = q.shape
  kv, S = k_slots.shape[1], k_slots.shape[3]
  g = H // kv
  # Each KV head's query rows (its heads x tokens) as one matrix: plain batched matmuls.
  rows = jnp.transpose(q.reshape(B, T, kv, g, hd), (0, 2, 3, 1, 4)).reshape(B, kv, g * T, hd)
  neg = -0.7 * jnp.finfo(jnp.float32).max
  old = jnp.einsum("bkmd,bkds->bkms", rows, k_slots, preferred_element_type=jnp.float32)
  old = jnp.where(old_mask[:, :, None], old.reshape(B, kv, g, T, S) * hd ** -0.5, neg)
  new = jnp.einsum("bkgtd,bukd->bkgtu", rows.reshape(B, kv, g, T, hd), k_new,
                   preferred_element_type=jnp.float32)
  new = jnp.where(new_mask[:, :, None], new * hd ** -0.5, neg)
  probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v_slots.dtype)
  out = jnp.einsum("bkms,bksd->bkmd", probs[..., :S].reshape(B, kv, g * T, S), v_slots)
  out = out.reshape(B, kv, g, T, hd) + jnp.einsum("bkgtu,bukd->bkgtd", probs[..., S:], v_new)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H, hd)


# ---- pure functional API -------------------------------------------------------------


def init_model(config: LlamaConfig, seed: int = 0) -> tuple[nnx.GraphDef, dict]:
  """Random base weights (std 0.02 normal, norms 1) as (graphdef, params pure dict)."""
  return split_model(Llama(config, rngs=nnx.Rngs(seed)))


def abstract_model(config: LlamaConfig) -> tuple[nnx.GraphDef, dict]:
  """Graphdef and ShapeDtypeStruct params without allocating weights (for loaders)."""
  return split_model(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))


def split_model(model: Llama) -> tuple[nnx.GraphDef, dict]:
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def forward(graphdef: nnx.GraphDef, base_params: dict, adapters: Sequence[Any] | Any,
            tokens, **kwargs):
  """Pure forward: (logits float32 [B, T, V], cache). See `Llama.__call__` for kwargs."""
  model = nnx.merge(graphdef, base_params)
  return model(tokens, adapters=adapters, **kwargs)


def lm_head(graphdef: nnx.GraphDef, base_params: dict, hidden):
  """float32 logits from `forward(..., return_hidden=True)` states, e.g. of one position."""
  return nnx.merge(graphdef, base_params).logits(hidden)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Empty KV cache: k [L, B, kv_heads, head_dim, S], v [L, B, kv_heads, S, head_dim],
  per-slot validity and write index."""
  L, kv, hd = config.num_layers, config.num_kv_heads, config.head_dim
  dtype = dtype or config.jnp_dtype
  return {"k": jnp.zeros((L, batch, kv, hd, max_len), dtype),
          "v": jnp.zeros((L, batch, kv, max_len, hd), dtype),
          "valid": jnp.zeros((batch, max_len), jnp.bool_), "index": jnp.zeros((), jnp.int32)}
