"""The one exception of secure aggregation, shared by its encoding, sharing and protocol."""

from fedjax_lora.errors import SecAggError

__all__ = ["SecAggError"]
