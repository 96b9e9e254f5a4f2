"""The one exception of secure aggregation, shared by its encoding, sharing and protocol."""

from __future__ import annotations


class SecAggError(ValueError):
  """Secure aggregation cannot proceed safely or correctly."""
