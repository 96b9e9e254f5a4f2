"""Peak memory of a benchmark worker: accelerator allocator peaks where there is one, else
the process's peak resident set (each worker runs one task in its own process)."""

from __future__ import annotations

import resource


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def host_memory(rss_before_task_mb: float) -> dict:
  return {"kind": "host peak RSS of the worker process",
          "peak_mb": round(peak_rss_mb(), 1),
          "before_task_mb": round(rss_before_task_mb, 1)}
