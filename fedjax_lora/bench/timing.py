"""Timing helpers: the first call (compilation, warm-up) is kept apart from the repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def first_and_repeats(fn: Callable[[], object], repeats: int) -> dict:
  """Runs fn once (reported as first_s) and then `repeats` times; median and all times,
  unrounded (a fast matmul takes well under a millisecond)."""
  first = timed(fn)
  times = [timed(fn) for _ in range(max(1, repeats))]
  return {"first_s": first, "median_s": statistics.median(times), "times_s": times}


def prefill_and_decode(c, prefill_call: Callable[[], object], full_s: float) -> dict:
  """Prefill seconds (median of one-new-token calls after a first) and the decoding steps'
  own new tokens/s: (new_tokens - 1) tokens per row over the full call's time less prefill."""
  prefill = first_and_repeats(prefill_call, c.repeats)["median_s"]
  g = c.generate
  steps_s = full_s - prefill
  return {"prefill_s": prefill,
          "decode_tokens_per_s": (g.batch_size * (g.new_tokens - 1) / steps_s
                                  if steps_s > 0 and g.new_tokens > 1 else None)}
