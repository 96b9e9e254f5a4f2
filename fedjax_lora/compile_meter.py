"""Seconds this process spends compiling JAX programs, from JAX's own monitoring events.

JAX reports each compilation's tracing, lowering and XLA backend durations through
`jax.monitoring`; one process-wide listener adds them up, and `CompileMeter` reads the
total over a window of work:

  meter = CompileMeter()
  ...                                        # anything that may compile
  meter.seconds                              # compile time since the meter was made

With a persistent compilation cache (JAX_COMPILATION_CACHE_DIR), a program loaded from it
still reports a backend "compile" event: it counts as a compilation here, and the time
counted is the load's.
"""

from __future__ import annotations

import threading

from jax import monitoring

EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
          "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "/jax/core/compile/backend_compile_duration")

_lock = threading.Lock()
_total = {"seconds": 0.0, "compilations": 0}
_registered = False


def _listen(event: str, duration: float, **kwargs) -> None:
  if event in EVENTS:
    with _lock:
      _total["seconds"] += duration
      _total["compilations"] += event == EVENTS[-1]


def _register() -> None:
  global _registered
  with _lock:
    if not _registered:
      monitoring.register_event_duration_secs_listener(_listen)
      _registered = True


class CompileMeter:
  """Compile seconds and XLA compilations since construction (process-wide, all threads)."""

  def __init__(self):
    _register()
    with _lock:
      self._start = dict(_total)

  @property
  def seconds(self) -> float:
    with _lock:
      return _total["seconds"] - self._start["seconds"]

  @property
  def compilations(self) -> int:
    with _lock:
      return _total["compilations"] - self._start["compilations"]
