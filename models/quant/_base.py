"""A whole base's projections quantized (or kept as GGUF stored them), and back."""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models.errors import QuantizationError
from models.quant._blocks import (GGUF_BLOCK, GGUF_LAYOUTS, quantize_int8, quantize_nf4,
                                   quantize_scales)
from models.quant._weight import QuantizedWeight, dense

MODES = ("none", "nf4", "int8", "keep")
DEFAULT_BLOCK_SIZE = 64  # weights per scale for nf4 / int8 (QLoRA's choice)
# The seven projections of every layer; embeddings, the head and the norms stay float
# (as peft + bitsandbytes leave them), except what a GGUF base stores quantized under keep.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How the frozen base is held in memory.

  mode: none (float, config.model.dtype), nf4 (QLoRA's NormalFloat-4), int8 (blockwise
    absmax), keep (a GGUF base's Q4_0/Q4_1/Q8_0 blocks as stored).
  block_size: weights per scale for nf4 and int8 (QLoRA: 64); GGUF blocks are always 32.
  double_quant: nf4 only: the scales in float8 with a float32 scale per 256 (QLoRA's
    double quantization: 0.127 instead of 0.5 bits per weight for the scales).
  """
  mode: str = "none"
  block_size: int = DEFAULT_BLOCK_SIZE
  double_quant: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise QuantizationError(f"quantize={self.mode!r}: expected one of {', '.join(MODES)}")
    if self.block_size < 2 or self.block_size % 2:
      raise QuantizationError(f"quant_block_size={self.block_size}: must be an even number "
                              "of at least 2 (QLoRA uses 64)")
    if self.block_size != DEFAULT_BLOCK_SIZE and not self.quantizes_floats:
      raise QuantizationError(f"quant_block_size={self.block_size} applies to quantize=nf4 or "
                              f"int8, not quantize={self.mode!r} (GGUF blocks are 32)")
    if self.double_quant and self.mode != "nf4":
      raise QuantizationError(f"quant_double_quant applies to quantize=nf4, not "
                              f"quantize={self.mode!r}")

  @classmethod
  def from_settings(cls, settings: Mapping | None) -> "QuantConfig":
    """From a config section with quantize / quant_block_size / quant_double_quant fields
    (config.model); missing fields take the defaults."""
    settings = settings or {}
    get = lambda k, d: settings[k] if k in settings else d
    return cls(mode=get("quantize", "none"),
               block_size=int(get("quant_block_size", DEFAULT_BLOCK_SIZE)),
               double_quant=bool(get("quant_double_quant", False)))

  @property
  def active(self) -> bool:
    return self.mode != "none"

  @property
  def quantizes_floats(self) -> bool:
    """nf4 / int8 quantize float weights (keep reads a GGUF file's own blocks)."""
    return self.mode in ("nf4", "int8")

  @property
  def reads_gguf(self) -> bool:
    """keep reads a named base's GGUF file itself (its blocks), not its HF conversion."""
    return self.mode == "keep"

  def describe(self) -> str:
    if self.mode in ("none", "keep"):
      return self.mode
    return f"{self.mode} (block {self.block_size}{', double quantized' if self.double_quant else ''})"


def quantize_matrix(w, qc: QuantConfig, name: str = "weight") -> QuantizedWeight:
  """A float weight in our [.., in, out] layout as a QuantizedWeight ([.., out, in])."""
  if not qc.quantizes_floats:
    raise QuantizationError(f"{name}: quantize={qc.mode!r} does not quantize float weights "
                            "(keep reads a GGUF file's own blocks)")
  fan_in = w.shape[-2]
  if fan_in % qc.block_size:
    raise QuantizationError(f"{name}: {fan_in} input features are not a multiple of "
                            f"quant_block_size={qc.block_size}; choose a block size that "
                            "divides every projection's input size")
  if w.ndim == 2:
    return _quantize_jit(jnp.asarray(w), qc)
  # One layer at a time: the float temporaries of one layer, not of the whole stack (an
  # 8B model's stacked down_proj is 1.9 GB in bf16, and its float32 blocks twice that).
  layers = [_quantize_jit(jnp.asarray(w[i]), qc) for i in range(w.shape[0])]
  return jax.tree.map(lambda *x: jnp.stack(x), *layers)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_jit(w, qc: QuantConfig) -> QuantizedWeight:
  torch_layout = jnp.swapaxes(w, -1, -2)
  if qc.mode == "int8":
    codes, scales = quantize_int8(torch_layout, qc.block_size)
    return QuantizedWeight(codes, scales, format="int8", block=qc.block_size)
  codes, scales = quantize_nf4(torch_layout, qc.block_size)
  if not qc.double_quant:
    return QuantizedWeight(codes, scales, format="nf4", block=qc.block_size)
  q, second, mean = quantize_scales(scales)
  return QuantizedWeight(codes, q, scale_scales=second, scale_mean=mean, format="nf4",
                         block=qc.block_size)


def quantize_layers(stacked: Mapping[str, object], qc: QuantConfig) -> dict:
  """Stacked layer weights {leaf: [L, ...]} (host or device) -> device arrays, with the
  projections quantized one layer at a time (one float layer on the device at once)."""
  out = {}
  for leaf, array in stacked.items():
    if isinstance(array, QuantizedWeight):  # kept GGUF blocks
      out[leaf] = array
    elif qc.quantizes_floats and leaf in PROJECTIONS:
      out[leaf] = quantize_matrix(array, qc, f"layers.{leaf}")
    else:
      out[leaf] = jnp.asarray(array)
  return out


def quantize_base(params: dict, qc: QuantConfig) -> dict:
  """A float base's params with its projections quantized (mode none: unchanged)."""
  if not qc.active:
    return params
  if qc.mode == "keep":
    raise QuantizationError("quantize='keep' holds a GGUF base's blocks as the file stores "
                            "them; this base was not loaded from a GGUF file")
  return {**params, "layers": quantize_layers(params["layers"], qc)}


def is_quantized(params: dict) -> bool:
  return any(isinstance(x, QuantizedWeight) for x in
             jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))


def formats(params: dict) -> dict[str, str]:
  """{param path: format} of the quantized weights in a base."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, QuantizedWeight)):
    if isinstance(x, QuantizedWeight):
      out[jax.tree_util.keystr(path, simple=True, separator=".")] = x.format
  return out


def dequantize_base(params: dict, dtype=jnp.float32) -> dict:
  """The float base the model computes with: every QuantizedWeight as a dense matrix in our
  layout (embedding [V, D]; head and projections [.., in, out]), in `dtype`."""

  def go(key, x):
    if not isinstance(x, QuantizedWeight):
      return x
    w = dense(x, dtype)  # [.., out, in]; an embedding's rows are its "out" axis
    return w if key == "embed" else jnp.swapaxes(w, -1, -2)

  out = {k: go(k, v) for k, v in params.items() if k != "layers"}
  out["layers"] = {k: go(k, v) for k, v in params["layers"].items()}
  return out


def to_float(params: dict, log=None, why: str = "exporting") -> dict:
  """A base ready to leave the run as float weights (a merge, an export): a quantized
  base is dequantized to float32 first, as peft's merge_and_unload does with a 4-bit
  base, and `log` says which weights were; a float base is returned as is."""
  if not is_quantized(params):
    return params
  if log:
    held = ", ".join(sorted(f"{k} {v}" for k, v in formats(params).items()))
    log(f"{why} a quantized base: its weights ({held}) are dequantized to float32 first (as "
        "peft's merge_and_unload does); the result is a float model")
  return dequantize_base(params)


def from_gguf(parts: Mapping[str, np.ndarray], type_name: str) -> QuantizedWeight:
  """Stacked `split_gguf_rows` arrays of one weight -> a QuantizedWeight on device."""
  fmt, _ = GGUF_LAYOUTS[type_name]
  arrays = {k: jnp.asarray(v) for k, v in parts.items()}
  return QuantizedWeight(format=fmt, block=GGUF_BLOCK, **arrays)


def base_bytes(params: dict) -> int:
  """Bytes of every array of a base, packed codes and scales included."""
  return int(sum(x.nbytes for x in jax.tree.leaves(params)))
