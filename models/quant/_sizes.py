"""Bytes a base holds in each mode, by arithmetic from its shapes (what `base_bytes`
measures on a loaded base; tests check the two agree)."""

from __future__ import annotations

import math

import numpy as np

from models.config import LlamaConfig
from models.quant._base import PROJECTIONS, QuantConfig
from models.quant._blocks import GGUF_BLOCK, GGUF_LAYOUTS, SCALE_BLOCK

# GGUF block bytes per 32 weights (scale [+ minimum] + codes).
GGUF_BLOCK_BYTES = {name: size for name, (_, size) in GGUF_LAYOUTS.items()}


def _matrix_bytes(rows: int, cols: int, qc: QuantConfig, float_bytes: int,
                  gguf_type: str | None) -> int:
  n = rows * cols
  if qc.mode == "keep" and gguf_type in GGUF_BLOCK_BYTES:
    return n // GGUF_BLOCK * GGUF_BLOCK_BYTES[gguf_type]
  if qc.mode in ("none", "keep"):
    return n * float_bytes
  scales = n // qc.block_size
  if qc.mode == "int8":
    return n + 4 * scales
  if qc.double_quant:  # float8 scales, a float32 per 256 of them, and their float32 mean
    return n // 2 + scales + 4 * math.ceil(scales / SCALE_BLOCK) + 4
  return n // 2 + 4 * scales


def estimate_bytes(config: LlamaConfig, qc: QuantConfig, float_dtype: str = "bfloat16",
                   gguf_types: dict[str, str] | None = None) -> int:
  """Resident bytes of a base of `config`'s shape held as `qc` says, its float parts
  (and a float base) in `float_dtype`. For keep, `gguf_types` gives the file's types:
  {"projections": "Q4_1", "embed": "Q8_0"} (the head, if untied, as the embedding)."""
  from models.lora import projection_shape

  fb = np.dtype(float_dtype).itemsize if float_dtype != "bfloat16" else 2
  gguf_types = gguf_types or {}
  d, v, layers = config.hidden_size, config.vocab_size, config.num_layers
  embed = (_matrix_bytes(v, d, qc, fb, gguf_types.get("embed")) if qc.mode == "keep"
           else v * d * fb)  # nf4 / int8 quantize the projections only
  total = embed if config.tie_word_embeddings else 2 * embed
  total += (2 * layers + 1) * d * fb  # norms
  for target in PROJECTIONS:
    fan_in, fan_out = projection_shape(config, target)
    total += layers * _matrix_bytes(fan_out, fan_in, qc, fb, gguf_types.get("projections"))
  return total
