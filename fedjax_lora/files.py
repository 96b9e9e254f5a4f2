"""Crash-safe file replacement: a reader (or a resume after kill -9) sees the old file or
the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int | None = None) -> None:
  """Writes `data` beside `path`, fsyncs it, then renames it over `path`."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    if mode is not None:
      os.chmod(tmp, mode)
    f.write(data.encode() if isinstance(data, str) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
