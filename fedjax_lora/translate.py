"""The one translation from an ml_collections run config to the library's typed settings.

Defaults live only in `configs/` (a config is `configs.federate.get_config()` or derives
from it); the library reads a run config's groups here, and builds its `LoraSpec`,
`RunConfig` and tiny `LlamaConfig` only here (the benchmark's own shape configs,
configs/benchmark.py, are translated in fedjax_lora/bench/workload.py). A group missing from a config is an error that
names it, not a silent default.
"""

from __future__ import annotations

import math

from fedjax_lora.errors import ConfigError
from fedjax_lora.simulator import RunConfig
from models.config import LlamaConfig
from models.lora import LoraSpec


def group(config, name: str) -> dict:
  """config.<name> as a plain dict; ConfigError naming the group when a config lacks it."""
  given = config.get(name)
  if given is None:
    raise ConfigError(f"config.{name} is missing: derive the config from "
                      "configs/federate.py:get_config(), which holds every group's defaults")
  return given.to_dict()


def lora_spec(lora_config, local: bool = False) -> LoraSpec:
  """config.lora as the global adapter's spec, or (local=True) dual_lora's local adapter's."""
  lc = lora_config
  layers = tuple(lc.layers) or None
  try:
    if local:
      return LoraSpec(rank=lc.local_rank, alpha=lc.local_alpha, targets=lc.targets,
                      layers=layers)
    return LoraSpec(rank=lc.rank, alpha=lc.alpha, targets=lc.targets, layers=layers)
  except ValueError as e:
    raise ConfigError(f"config.lora: {e}") from None


def run_config(config) -> RunConfig:
  """config.run as the simulator's RunConfig (every field from the config)."""
  try:
    return RunConfig(**group(config, "run"))
  except TypeError as e:
    raise ConfigError(f"config.run: {e}") from None


def tiny_model_config(model_config, vocab_size: int, tokenizer) -> LlamaConfig:
  """config.model's tiny random LLaMA shape for a tokenizer of `vocab_size` tokens (the
  vocabulary padded to a multiple of 64, as accelerators like)."""
  m = model_config
  return LlamaConfig(vocab_size=int(math.ceil(vocab_size / 64) * 64), hidden_size=m.hidden_size,
                     intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                     num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                     head_dim=m.hidden_size // m.num_heads, max_position_embeddings=4096,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id or 0, param_dtype=m.dtype,
                     dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl or None)
