"""LoRA adapters as a pytree kept apart from the frozen base.

An adapter's arrays are stacked over the layers it adapts, so one adapter is a small
dict of `[n_layers, in, r]` / `[n_layers, r, out]` arrays; a leading client axis can be
added on top and `jax.vmap`ped while the base stays shared. The static description
(rank, alpha, targets, layers) rides along as pytree metadata.

Forward contribution of a target projection W: y = x W + (alpha / r) * dropout(x) A B,
with A initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B = 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from models.config import LlamaConfig

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
_SHORT_NAMES = {t.split("_")[0]: t for t in ALL_TARGETS}


def normalize_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
  """Accepts 'q' or 'q_proj', a list or a comma-separated string; keeps canonical order."""
  if isinstance(targets, str):
    targets = [t for t in targets.split(",") if t.strip()]
  out = set()
  for t in targets:
    t = t.strip()
    t = _SHORT_NAMES.get(t, t)
    if t not in ALL_TARGETS:
      raise ValueError(f"unknown LoRA target {t!r}; expected a subset of {ALL_TARGETS}")
    out.add(t)
  if not out:
    raise ValueError("LoRA targets must not be empty")
  return tuple(t for t in ALL_TARGETS if t in out)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Static description of an adapter (hashable, so it can be jit-static)."""
  rank: int = 16
  alpha: float = 64.0
  targets: tuple[str, ...] = ALL_TARGETS
  layers: tuple[int, ...] | None = None  # None = every layer
  dropout: float = 0.0
  use_rslora: bool = False

  def __post_init__(self):
    object.__setattr__(self, "targets", normalize_targets(self.targets))
    if self.layers is not None:
      layers = tuple(sorted(set(int(l) for l in self.layers)))
      if not layers:
        raise ValueError("LoRA layers must be None (all) or a non-empty list")
      object.__setattr__(self, "layers", layers)
    if self.rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def layer_indices(self, num_layers: int) -> tuple[int, ...]:
    if self.layers is None:
      return tuple(range(num_layers))
    if self.layers[-1] >= num_layers or self.layers[0] < 0:
      raise ValueError(f"LoRA layers {self.layers} out of range for a {num_layers}-layer model")
    return self.layers


@flax.struct.dataclass
class LoraAdapter:
  """params: {target: {'a': [n, in, r], 'b': [n, r, out]}} over the spec's layers."""
  params: dict
  spec: LoraSpec = flax.struct.field(pytree_node=False)


def projection_shape(config: LlamaConfig, target: str) -> tuple[int, int]:
  """(in, out) of a projection kernel in our [in, out] layout."""
  d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
  return {
      "q_proj": (d, config.num_heads * h),
      "k_proj": (d, config.num_kv_heads * h),
      "v_proj": (d, config.num_kv_heads * h),
      "o_proj": (config.num_heads * h, d),
      "gate_proj": (d, f),
      "up_proj": (d, f),
      "down_proj": (f, d),
  }[target]


def num_params(config: LlamaConfig, spec: "LoraSpec") -> int:
  """Adapter parameters: r (in + out) per adapted projection and layer (method.md §8)."""
  layers = len(spec.layer_indices(config.num_layers))
  return layers * sum(spec.rank * sum(projection_shape(config, t)) for t in spec.targets)


def init_adapter(config: LlamaConfig, spec: LoraSpec, rng: jax.Array,
                 dtype=jnp.float32) -> LoraAdapter:
  """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B = 0."""
  n = len(spec.layer_indices(config.num_layers))
  params = {}
  for target, key in zip(spec.targets, jax.random.split(rng, len(spec.targets))):
    fan_in, fan_out = projection_shape(config, target)
    bound = 1.0 / math.sqrt(fan_in)
    params[target] = {
        "a": jax.random.uniform(key, (n, fan_in, spec.rank), dtype, -bound, bound),
        "b": jnp.zeros((n, spec.rank, fan_out), dtype),
    }
  return LoraAdapter(params=params, spec=spec)


def check_adapter(config: LlamaConfig, adapter: LoraAdapter, source: str = "adapter") -> None:
  """Raises ValueError naming the first tensor whose shape does not fit the base model."""
  spec = adapter.spec
  n = len(spec.layer_indices(config.num_layers))
  if set(adapter.params) != set(spec.targets):
    raise ValueError(f"{source}: tensors for {sorted(adapter.params)} but spec targets {spec.targets}")
  for target in spec.targets:
    fan_in, fan_out = projection_shape(config, target)
    want = {"a": (n, fan_in, spec.rank), "b": (n, spec.rank, fan_out)}
    for name, shape in want.items():
      got = tuple(adapter.params[target][name].shape[-3:])
      if got != shape:
        raise ValueError(f"{source}: {target}.{name} has shape {got}, base model needs {shape} "
                         f"(rank {spec.rank}, {n} layers)")


def per_layer_view(adapter: LoraAdapter, num_layers: int):
  """Expands an adapter to all layers for a scan: (params [L, ...], scale [L]).

  Layers outside the spec read slot 0 with scale 0, so their gradient is exactly zero.
  """
  spec = adapter.spec
  layers = spec.layer_indices(num_layers)
  if len(layers) == num_layers:
    return adapter.params, jnp.full((num_layers,), spec.scale, jnp.float32)
  slot = {l: i for i, l in enumerate(layers)}
  gather = jnp.array([slot.get(l, 0) for l in range(num_layers)], jnp.int32)
  scale = jnp.array([spec.scale if l in slot else 0.0 for l in range(num_layers)], jnp.float32)
  return jax.tree.map(lambda x: jnp.take(x, gather, axis=0), adapter.params), scale


def merge_into_base(base_params: dict, adapter: LoraAdapter, log=None) -> dict:
  """W' = W + s * A B for every adapted projection; returns new base params (pure dict).

  A quantized base (models.quant) is dequantized to float32 first, as peft's
  merge_and_unload does with a 4-bit base: the merged weights are the values the adapter
  was trained against plus its update, and the result is a float model (`log` says so).
  """
  from models import quant

  base_params = quant.to_float(base_params, log, "merging into")
  layers_dict = dict(base_params["layers"])
  spec = adapter.spec
  num_layers = next(iter(layers_dict.values())).shape[0]
  idx = jnp.array(spec.layer_indices(num_layers))
  for target, ab in adapter.params.items():
    w = layers_dict[target]
    delta = spec.scale * jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                                    ab["b"].astype(jnp.float32),
                                    precision=jax.lax.Precision.HIGHEST)
    layers_dict[target] = w.at[idx].set((w[idx].astype(jnp.float32) + delta).astype(w.dtype))
  return {**base_params, "layers": layers_dict}


def as_adapter_list(adapters) -> Sequence[LoraAdapter]:
  if adapters is None:
    return ()
  if isinstance(adapters, LoraAdapter):
    return (adapters,)
  return tuple(adapters)
