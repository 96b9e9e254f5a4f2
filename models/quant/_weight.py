"""A quantized matrix as a pytree, and the products the model takes with it.

`QuantizedWeight` holds a format's packed arrays ([..., out, in] with leading layer axes);
its format and block size are static (treedef) metadata, so `jax.lax.scan` slices it per
layer and `jax.jit` specialises on the format. `matmul` dequantizes inside the caller's
trace, and its custom VJP rebuilds the dense matrix in the backward pass instead of saving
it: under the layer scan, saving it would stack every layer's dense weight as a residual,
which is the very copy of the base that quantization removes.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from models.quant._blocks import dequantize_scales, values


@flax.struct.dataclass
class QuantizedWeight:
  codes: jax.Array                   # uint8 [.., R, C/2] (4-bit) or int8 [.., R, C]
  scales: jax.Array                  # [.., R, C/block]: float32, float16 (GGUF) or float8
  offsets: jax.Array | None = None   # Q4_1's per-block minimum, float16 [.., R, C/block]
  scale_scales: jax.Array | None = None  # double quantization: float32 [.., ceil(R C/block/256)]
  scale_mean: jax.Array | None = None    # double quantization: float32 [..]
  format: str = flax.struct.field(pytree_node=False, default="nf4")
  block: int = flax.struct.field(pytree_node=False, default=64)

  @property
  def double_quantized(self) -> bool:
    return self.scale_scales is not None

  def first_level_scales(self):
    if self.double_quantized:
      return dequantize_scales(self.scales, self.scale_scales, self.scale_mean)
    return self.scales


def dense(w: QuantizedWeight, dtype=jnp.float32):
  """The [.., out, in] matrix in `dtype` (computed in float32, then cast)."""
  out = values(w.format, w.block, w.codes, w.first_level_scales(), w.offsets)
  return out.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x, w: QuantizedWeight, dtype, out_dtype=None):
  """x [.., in] @ dense(w).T -> [.., out] in `dtype` (or `out_dtype` accumulation)."""
  return jnp.einsum("...c,rc->...r", x, dense(w, dtype), preferred_element_type=out_dtype)


def _matmul_fwd(x, w, dtype, out_dtype):
  return matmul(x, w, dtype, out_dtype), (w, jnp.zeros((), x.dtype))


def _matmul_bwd(dtype, out_dtype, residuals, dy):
  w, like = residuals
  # With float32 accumulation (the logits of a kept head), contract in float32 as well.
  ct = out_dtype or dtype
  dx = jnp.einsum("...r,rc->...c", dy.astype(ct), dense(w, ct))
  return dx.astype(like.dtype), None  # the base is frozen: no cotangent for its codes


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def take_rows(w: QuantizedWeight, ids, dtype):
  """Rows `ids` [..] of the dense matrix ([.., in] in `dtype`), dequantizing only those rows
  (an embedding lookup)."""
  if w.double_quantized:  # the second level is laid out over the whole matrix: go dense
    return jnp.take(dense(w, dtype), ids, axis=-2)
  return dense(jax.tree.map(lambda a: jnp.take(a, ids, axis=-2), w), dtype)
