"""Static description of a LLaMA-family decoder.

The config is a frozen, hashable dataclass so it can live inside an NNX graphdef
and be used as a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from models.errors import ModelConfigError, UnsupportedConfigError

# Remat policies accepted by `LlamaConfig.remat`; see `models.llama.REMAT_POLICIES`.
REMAT_NAMES = ("none", "full", "save_qkv", "save_attn_out", "save_dots_except_mlp")
ATTENTION_IMPLS = (None, "xla", "cudnn")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # llama3 rope scaling as sorted (key, value) pairs (hashable); None = plain RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  # Numerics and execution.
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; logits and loss are always float32
  scan_layers: bool = True
  remat: str = "none"
  attention_impl: str | None = None

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_NAMES:
      raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_NAMES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # fail early on a bad dtype name

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.num_layers * per_layer + self.vocab_size * d + d + head

  # ---- Hugging Face config.json ------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides) -> "LlamaConfig":
    """Validates a Hugging Face LLaMA config and converts it; names the offending field."""

    def bad(field, value, why):
      raise UnsupportedConfigError(f"{source}: unsupported {field}={value!r}: {why}")

    model_type = hf.get("model_type")
    if model_type != "llama":
      bad("model_type", model_type, "only 'llama' (LlamaForCausalLM) checkpoints are supported")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if any(a != "LlamaForCausalLM" for a in archs):
      bad("architectures", archs, "only LlamaForCausalLM is supported")
    if hf.get("attention_bias"):
      bad("attention_bias", hf["attention_bias"], "attention projections with bias are not implemented")
    if hf.get("mlp_bias"):
      bad("mlp_bias", hf["mlp_bias"], "MLP projections with bias are not implemented")
    if hf.get("sliding_window") is not None:
      bad("sliding_window", hf["sliding_window"], "sliding-window attention is not implemented")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      bad("hidden_act", act, "only SwiGLU with silu is implemented")
    if hf.get("quantization_config"):
      bad("quantization_config", hf["quantization_config"].get("quant_method", "?"),
          "quantized checkpoints are not supported; load the unquantized weights")
    if hf.get("attention_dropout", 0.0):
      bad("attention_dropout", hf["attention_dropout"], "attention dropout is not implemented")

    # transformers<5 writes rope_theta + rope_scaling; transformers>=5 writes rope_parameters.
    params_field, scaling_field = hf.get("rope_parameters"), hf.get("rope_scaling")
    if params_field and scaling_field:
      type_of = lambda d: d.get("rope_type", d.get("type", "default"))
      if type_of(params_field) != type_of(scaling_field) or any(
          params_field.get(k) != v for k, v in scaling_field.items() if k not in ("type", "rope_type")):
        bad("rope_scaling", scaling_field, f"disagrees with rope_parameters={params_field!r}")
    field = "rope_parameters" if params_field else "rope_scaling"
    rope = dict(params_field or scaling_field or {})
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      bad(f"{field}.rope_type", rope_type, f"supported: {SUPPORTED_ROPE_TYPES}")
    rope_scaling = None
    known = ()
    if rope_type == "llama3":
      known = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
      missing = [k for k in known if k not in rope]
      if missing:
        bad(f"{field}", rope, f"llama3 rope scaling needs {missing}")
      rope_scaling = tuple(sorted((k, float(rope[k])) for k in known))
    leftover = sorted(k for k in rope if k not in known and rope[k] is not None)
    if leftover:
      bad(f"{field}.{leftover[0]}", rope[leftover[0]], f"not understood for rope_type={rope_type!r}")

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    absent = [k for k in required if hf.get(k) is None]
    if absent:
      raise ModelConfigError(f"{source}: missing required field(s) {absent}")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // num_heads
    kwargs = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except (ValueError, TypeError) as e:
      raise ModelConfigError(f"{source}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json that `transformers.LlamaConfig` (4.x and 5.x) reads back."""
    rope_params = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling:
      rope_params = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
      rope_params["original_max_position_embeddings"] = int(
          rope_params["original_max_position_embeddings"])
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": None if not self.rope_scaling else {
            k: v for k, v in rope_params.items() if k != "rope_theta"},
        "rope_parameters": rope_params,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
        "dtype": self.param_dtype,
    }

  @classmethod
  def from_json_file(cls, path, **overrides) -> "LlamaConfig":
    with open(path) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(hf, source=str(path), **overrides)


def rope_inverse_frequencies(config: LlamaConfig):
  """Inverse frequencies of rotate-half RoPE, with llama3 scaling when configured."""
  dim = config.head_dim
  # float32 throughout, as transformers computes it, for bit-level parity of the angles.
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)
  if not config.rope_scaling:
    return inv_freq
  s = {k: np.float32(v) for k, v in config.rope_scaling}
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)
