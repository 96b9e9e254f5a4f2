"""Block formats: float weights to packed codes and scales, and back.

Every format stores a matrix in torch's [out, in] layout ([..., rows, cols]) with its
blocks running along `cols`, the input features: a row's weights are contiguous, as in
bitsandbytes (which blocks the flattened [out, in] tensor) and in GGUF (whose rows are the
fastest dimension). Leading axes (layers) are carried through unchanged.

  nf4   uint8 codes [.., R, C/2], two per byte, even column in the high nibble (as
        bitsandbytes packs them); float32 absmax per block (or float8 with double
        quantization); w = NF4[code] * absmax.
  int8  int8 codes [.., R, C]; float32 scale = absmax / 127 per block; w = code * scale.
  q8_0  GGUF Q8_0 as stored: int8 codes, float16 scale per 32; w = code * scale.
  q4_0  GGUF Q4_0 as stored: uint8 codes [.., R, C/2], in each block of 32 the low nibbles
        are columns 0-15 and the high nibbles 16-31; float16 scale; w = (code - 8) * scale.
  q4_1  GGUF Q4_1: as q4_0 plus a float16 minimum per block; w = code * scale + minimum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.quant._codebook import FLOAT8_MAX, NF4, NF4_MIDPOINTS

FOUR_BIT = ("nf4", "q4_0", "q4_1")
FORMATS = ("nf4", "int8", "q8_0", "q4_0", "q4_1")
GGUF_BLOCK = 32
# The second level of double quantization (QLoRA section 3): the first-level scales, less
# their mean, in float8 with one float32 scale per 256 of them.
SCALE_BLOCK = 256


def _blocks(w, block):
  *lead, rows, cols = w.shape
  return w.reshape(*lead, rows, cols // block, block)


def _absmax(blocks):
  return jnp.max(jnp.abs(blocks), axis=-1)


def quantize_nf4(w, block: int):
  """(codes uint8 [.., R, C/2], absmax float32 [.., R, C/block]) of float w [.., R, C]."""
  blocks = _blocks(w.astype(jnp.float32), block)
  absmax = _absmax(blocks)
  # An all-zero block keeps absmax 0 (its codes decode to 0 whatever they are).
  normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
  # The code's index is the number of midpoints strictly below the value: 15 compares,
  # fused into one pass (a searchsorted's gathers were constant-folded for seconds).
  codes = sum((normed > m).astype(jnp.uint8) for m in NF4_MIDPOINTS.tolist())
  return pack_pairs(codes.reshape(w.shape)), absmax


def quantize_int8(w, block: int):
  """(codes int8 [.., R, C], scale float32 [.., R, C/block]): symmetric absmax, 127 levels."""
  blocks = _blocks(w.astype(jnp.float32), block)
  scale = _absmax(blocks) / 127.0
  codes = jnp.round(blocks / jnp.where(scale == 0, 1.0, scale)[..., None])
  return jnp.clip(codes, -127, 127).astype(jnp.int8).reshape(w.shape), scale


def quantize_scales(scales):
  """Double quantization of float32 scales [.., R, N]: (float8 [.., R, N], float32 second-level
  scale [.., ceil(R N / 256)], float32 mean [..]) so that `dequantize_scales` inverts it."""
  *lead, rows, n = scales.shape
  mean = jnp.mean(scales, axis=(-2, -1))
  flat = _padded((scales - mean[..., None, None]).reshape(*lead, rows * n))
  second = jnp.max(jnp.abs(flat), axis=-1) / FLOAT8_MAX
  q = flat / jnp.where(second == 0, 1.0, second)[..., None]
  q = q.reshape(*lead, -1)[..., :rows * n].astype(jnp.float8_e4m3fn)
  return q.reshape(scales.shape), second, mean


def _padded(flat):
  """[.., M] -> [.., ceil(M / 256), 256], zero-padded."""
  pad = -flat.shape[-1] % SCALE_BLOCK
  flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
  return flat.reshape(*flat.shape[:-1], -1, SCALE_BLOCK)


def dequantize_scales(q, second, mean):
  *lead, rows, n = q.shape
  flat = _padded(q.astype(jnp.float32).reshape(*lead, rows * n)) * second[..., None]
  return flat.reshape(*lead, -1)[..., :rows * n].reshape(q.shape) + mean[..., None, None]


def pack_pairs(codes):
  """uint8 codes < 16 [.., C] -> [.., C/2]: column 2j in the high nibble, 2j+1 in the low."""
  pairs = codes.reshape(*codes.shape[:-1], -1, 2)
  return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_pairs(packed):
  """The inverse of `pack_pairs`."""
  both = jnp.stack([packed >> 4, packed & 15], axis=-1)
  return both.reshape(*packed.shape[:-1], -1)


def unpack_ggml(packed):
  """GGUF Q4 codes [.., C/2] -> [.., C]: per block of 32, low nibbles first, then high."""
  blocks = packed.reshape(*packed.shape[:-1], -1, GGUF_BLOCK // 2)
  both = jnp.concatenate([blocks & 15, blocks >> 4], axis=-1)
  return both.reshape(*packed.shape[:-1], -1)


def values(fmt: str, block: int, codes, scales, offsets=None):
  """float32 weights [.., R, C] of a format's codes and (first-level, float) scales."""
  if fmt == "nf4":
    levels = jnp.take(jnp.asarray(NF4), unpack_pairs(codes).astype(jnp.int32), axis=0)
  elif fmt in ("int8", "q8_0"):
    levels = codes.astype(jnp.float32)
  elif fmt == "q4_0":
    levels = unpack_ggml(codes).astype(jnp.float32) - 8.0
  elif fmt == "q4_1":
    levels = unpack_ggml(codes).astype(jnp.float32)
  else:
    raise ValueError(f"unknown quantized format {fmt!r}; expected one of {FORMATS}")
  out = _blocks(levels, block) * scales.astype(jnp.float32)[..., None]
  if offsets is not None:
    out = out + offsets.astype(jnp.float32)[..., None]
  return out.reshape(levels.shape)


# ---- GGUF blocks as stored -------------------------------------------------------------

# Bytes of one block of 32 weights: (scale f16, [minimum f16], codes).
GGUF_LAYOUTS = {"Q8_0": ("q8_0", 34), "Q4_0": ("q4_0", 18), "Q4_1": ("q4_1", 20)}


def split_gguf_rows(raw: np.ndarray, type_name: str) -> dict[str, np.ndarray]:
  """A GGUF tensor's bytes [rows, row_bytes] -> {codes, scales[, offsets]} numpy arrays
  holding the same bits: scales (and Q4_1's minimums) float16 [rows, C/32], codes int8
  [rows, C] (Q8_0) or uint8 [rows, C/2] (Q4_0, Q4_1, nibble order untouched)."""
  fmt, size = GGUF_LAYOUTS[type_name]
  rows = raw.shape[0]
  blocks = np.ascontiguousarray(raw).reshape(rows, -1, size)
  out = {"scales": blocks[..., 0:2].copy().view(np.float16)[..., 0]}
  start = 2
  if fmt == "q4_1":
    out["offsets"] = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    start = 4
  codes = blocks[..., start:].reshape(rows, -1)
  out["codes"] = codes.view(np.int8) if fmt == "q8_0" else codes.copy()
  return out


