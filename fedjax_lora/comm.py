"""Communication accounting: bytes each client sends and receives per round, against full FT.

Only shapes and dtypes are read, so leaves may be arrays or `jax.ShapeDtypeStruct`s (an 8B model
can be costed without allocating it). Typed PRNG keys count as their uint32 key data; sub-byte
dtypes (int4) count packed bits, rounded up to whole bytes per leaf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _leaf_bytes(x: Any) -> tuple[str, int]:
  """(dtype name, bytes) of one leaf."""
  if not hasattr(x, "dtype"):
    x = np.asarray(x)  # Python scalars
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.eval_shape(jax.random.key_data, x)
  dtype = np.dtype(x.dtype)
  bits = math.prod(x.shape) * jax.dtypes.itemsize_bits(dtype)
  return dtype.name, (bits + 7) // 8


def tree_bytes(tree: Any) -> dict[str, int]:
  """Bytes per dtype name, e.g. {"float32": 1234, "bfloat16": 56}."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    name, n = _leaf_bytes(leaf)
    out[name] = out.get(name, 0) + n
  return out


def total_bytes(tree: Any) -> int:
  return sum(tree_bytes(tree).values())


def model_bytes(params: Any) -> int:
  """Size of the base model pytree: what full fine-tuning would send per client per direction.
  A quantized base counts as the float model it stands for (full fine-tuning would train and
  send float weights), in its float parts' dtype."""
  from models import quant

  if not quant.is_quantized(params):
    return total_bytes(params)
  dtype = params["final_norm"].dtype  # the float parts' dtype: the model's param dtype
  dense = jax.eval_shape(lambda p: quant.dequantize_base(p, dtype), params)
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(dense))


def _per_client(tree: Any, k: int, what: str) -> list[dict[str, int]]:
  """Bytes by dtype for each of k clients: a Python list holds one tree per client; any other
  pytree is stacked on a leading client axis of length k."""
  if isinstance(tree, list):
    if len(tree) != k:
      raise ValueError(f"{what}: got {len(tree)} per-client trees for {k} clients")
    return [tree_bytes(t) for t in tree]
  out: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape or shape[0] != k:
      raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path)} has shape {shape}; expected "
                       f"a leading client axis of length {k}")
    name, n = _leaf_bytes(jax.ShapeDtypeStruct(shape[1:], leaf.dtype))
    out[name] = out.get(name, 0) + n
  return [dict(out) for _ in range(k)]


def _sum(dicts: list[Mapping[str, int]]) -> dict[str, int]:
  out: dict[str, int] = {}
  for d in dicts:
    for name, n in d.items():
      out[name] = out.get(name, 0) + n
  return out


def total_bytes_of(by_dtype: Mapping[str, int]) -> int:
  """Total of a bytes-by-dtype dict."""
  return int(sum(by_dtype.values()))


def round_comm(uplink_per_client: Any, downlink: Any, present: Any, full_model_bytes: int,
               uplink_multiplier: int = 1) -> dict:
  """Traffic of one round (JSON-able).

  uplink_per_client: what each client uploads: a pytree stacked on a leading axis of K clients,
    or a Python list of K pytrees (e.g. heterogeneous ranks).
  downlink: what the server sends each client: one pytree (the same for all), or a list of K.
  present: bool [K]; absent clients send and receive nothing.
  full_model_bytes: `model_bytes(base)`; the full-fine-tuning equivalent is that many bytes per
    present client per direction (FedAvg on the full model).
  uplink_multiplier: SCAFFOLD uploads a control delta as large as the model delta: pass 2.

  Returns per-client `up_bytes`/`down_bytes` lists, totals, bytes by dtype, the full-model totals
  and `reduction` = 1 - adapter bytes / full-model bytes (both directions; also `up_reduction`,
  `down_reduction`); ratios are None when no client is present or full_model_bytes is 0.
  """
  present = np.asarray(present)
  if present.ndim != 1 or present.dtype != np.bool_:
    raise ValueError(f"present must be a 1-D bool array, got {present.dtype}{list(present.shape)}")
  if isinstance(uplink_multiplier, bool) or not isinstance(uplink_multiplier, (int, np.integer)) \
      or uplink_multiplier < 1:
    raise ValueError(f"uplink_multiplier must be a positive int, got {uplink_multiplier!r}")
  if isinstance(full_model_bytes, bool) or not isinstance(full_model_bytes, (int, np.integer)) \
      or full_model_bytes < 0:
    raise ValueError(f"full_model_bytes must be a non-negative int, got {full_model_bytes!r}")
  k = len(present)
  up = [{n: b * int(uplink_multiplier) for n, b in d.items()} if p else {}
        for d, p in zip(_per_client(uplink_per_client, k, "uplink_per_client"), present)]
  if isinstance(downlink, list):
    down_all = _per_client(downlink, k, "downlink")
  else:
    down_all = [tree_bytes(downlink)] * k
  down = [dict(d) if p else {} for d, p in zip(down_all, present)]
  n_present = int(present.sum())
  up_total, down_total = sum(map(total_bytes_of, up)), sum(map(total_bytes_of, down))
  full = int(full_model_bytes) * n_present

  def ratio(adapter: int, full_bytes: int) -> float | None:
    return 1.0 - adapter / full_bytes if full_bytes else None

  return {
      "clients": k,
      "present_clients": n_present,
      "up_bytes": [total_bytes_of(d) for d in up],
      "down_bytes": [total_bytes_of(d) for d in down],
      "total_up_bytes": up_total,
      "total_down_bytes": down_total,
      "total_bytes": up_total + down_total,
      "up_bytes_by_dtype": _sum(up),
      "down_bytes_by_dtype": _sum(down),
      "full_model_up_bytes": full,
      "full_model_down_bytes": full,
      "full_model_total_bytes": 2 * full,
      "up_reduction": ratio(up_total, full),
      "down_reduction": ratio(down_total, full),
      "reduction": ratio(up_total + down_total, 2 * full),
  }


def adapter_traffic(config, spec, bytes_per_param: int) -> dict:
  """What one site sends per round and direction under LoRA against full fine-tuning, by
  arithmetic from the shapes (method.md §8): parameters, bytes and the reduction."""
  from models import lora
  adapter, full = lora.num_params(config, spec), config.num_params()
  return {"adapter_params": adapter, "full_params": full, "bytes_per_param": bytes_per_param,
          "adapter_bytes": adapter * bytes_per_param, "full_bytes": full * bytes_per_param,
          "fraction": adapter / full, "reduction": 1.0 - adapter / full}
