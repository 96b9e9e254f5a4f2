"""Fixed point for secure aggregation: floats as two's complement elements of the ring Z/2^64.

q(x) = round(x * 2^f) modulo 2^64. Values are range-checked so that a sum over num_clients of
them cannot wrap, and `quantization_bound` says how far the unmasked mean can be from the exact
one because of the rounding.
"""

from __future__ import annotations

import numpy as np

from fedjax_lora.privacy.secagg._errors import SecAggError

DEFAULT_FRAC_BITS = 24


def _first(mask: np.ndarray):
  """Index of the first True entry: an int for vectors, a tuple otherwise (for messages)."""
  idx = tuple(int(i) for i in np.argwhere(mask)[0])
  return idx[0] if len(idx) == 1 else idx


def _check_frac_bits(frac_bits: int) -> int:
  if isinstance(frac_bits, bool) or not isinstance(frac_bits, (int, np.integer)) \
      or not 0 <= frac_bits <= 62:
    raise SecAggError(f"frac_bits={frac_bits!r}: must be an integer in [0, 62]")
  return int(frac_bits)


def _check_count(num_clients: int) -> int:
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
      or num_clients < 1:
    raise SecAggError(f"num_clients={num_clients!r}: must be an integer >= 1")
  return int(num_clients)


def _max_abs_int(num_clients: int) -> float:
  """Largest |q| such that num_clients of them sum below 2^63; as a float that is never above."""
  exact = (2**63 - 1) // num_clients
  limit = float(exact)
  if int(limit) > exact:  # float rounding went up; step down one ulp
    limit = float(np.nextafter(limit, 0.0))
  return limit


def safe_range(frac_bits: int = DEFAULT_FRAC_BITS, num_clients: int = 1) -> float:
  """Largest |x| that `quantize` accepts, so a sum of num_clients values cannot wrap."""
  return _max_abs_int(_check_count(num_clients)) / 2.0**_check_frac_bits(frac_bits)


def quantize(x, frac_bits: int = DEFAULT_FRAC_BITS, num_clients: int = 1) -> np.ndarray:
  """round(x * 2^f) as two's complement uint64; rejects values a num_clients-sum could wrap."""
  frac_bits, num_clients = _check_frac_bits(frac_bits), _check_count(num_clients)
  arr = np.asarray(x, dtype=np.float64)
  bad = ~np.isfinite(arr)
  if bad.any():
    idx = _first(bad)
    raise SecAggError(f"cannot quantize non-finite value {float(arr[idx])!r} at index {idx}")
  with np.errstate(over="ignore"):
    scaled = np.rint(arr * 2.0**frac_bits)  # exact scaling by a power of two, then round
  over = np.abs(scaled) > _max_abs_int(num_clients)
  if over.any():
    idx = _first(over)
    raise SecAggError(
        f"value {float(arr[idx])!r} at index {idx} is outside the safe fixed-point range "
        f"|x| <= {safe_range(frac_bits, num_clients):.6g} for frac_bits={frac_bits} and "
        f"num_clients={num_clients} (a sum of that many values would wrap modulo 2^64); "
        "rescale the update or lower frac_bits")
  return scaled.astype(np.int64).view(np.uint64)


def dequantize(total, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
  """Reads a uint64 ring element (or sum) as a signed fixed-point float64."""
  frac_bits = _check_frac_bits(frac_bits)
  arr = np.asarray(total)
  if arr.dtype != np.uint64:
    raise SecAggError(f"dequantize expects uint64 ring elements, got dtype {arr.dtype}")
  return arr.view(np.int64).astype(np.float64) / 2.0**frac_bits


def quantization_bound(num_survivors: int, frac_bits: int, max_abs: float,
                       total_weight: float) -> float:
  """Worst-case |mean - exact mean| per coordinate from fixed-point rounding.

  Each of the m survivors rounds w_k x_k and w_k by at most e0 = 2^-(f+1), so the sums satisfy
  |S^ - S| <= e and |W^ - W| <= e with e = m e0. Then
    S^/W^ - S/W = ((S^ - S) W - S (W^ - W)) / (W^ W),
  whose magnitude is <= e (1 + |S|/W) / W^ <= e (1 + M) / W^, because |S|/W <= M = max |x_k|
  for weights >= 0. W^ is the (quantized) total weight the server reports. The term 2^-49 M
  covers float64 rounding (w x products, int64 -> float64, the final division).
  """
  e = num_survivors * 2.0 ** -(frac_bits + 1)
  return e * (1.0 + max_abs) / total_weight + 2.0**-49 * max_abs
