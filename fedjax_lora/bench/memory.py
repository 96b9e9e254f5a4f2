"""Peak memory of a benchmark worker: accelerator allocator peaks where there is one, else
the process's resident set. On the host, the figure compared is the peak above the RSS
after the model is loaded: the two frameworks' runtimes and libraries differ in size
(and torch workers also import JAX), which says nothing about the task."""

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
  peak = peak_rss_mb()
  return {"kind": "host RSS: peak of the worker process above its RSS after loading the model",
          "peak_mb": round(peak - rss_before_task_mb, 1),
          "process_peak_mb": round(peak, 1),
          "before_task_mb": round(rss_before_task_mb, 1)}
