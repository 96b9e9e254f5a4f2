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
