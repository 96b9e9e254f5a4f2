"""The benchmark's shared inputs: a model checkpoint on disk and seeded random batches.
Every worker process rebuilds them from the config, so each framework reads the same
weights and the same tokens without passing arrays between processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.config import LlamaConfig
from models.lora import LoraSpec


def model_config(c) -> LlamaConfig:
  """The benchmark's LLaMA: `config.checkpoint`'s (real weights) when set, else the shape in
  `config.model` (random weights)."""
  m = c.model
  if c.get("checkpoint"):
    from models import checkpoints
    return checkpoints.load_config(checkpoints.resolve(c.checkpoint), param_dtype=c.dtype,
                                   dtype=c.dtype, remat=m.remat,
                                   attention_impl=m.attention_impl or None)
  return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                     intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                     num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                     head_dim=m.hidden_size // m.num_heads, rope_theta=m.rope_theta,
                     max_position_embeddings=max(4096, c.seq_len, c.generate.prompt_len
                                                 + c.generate.new_tokens),
                     bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     tie_word_embeddings=bool(m.get("tie_word_embeddings", False)),
                     param_dtype=c.dtype, dtype=c.dtype, remat=m.remat,
                     attention_impl=m.attention_impl or None)


def lora_spec(c) -> LoraSpec:
  return LoraSpec(rank=c.lora.rank, alpha=c.lora.alpha, targets=c.lora.targets)


def client_batches(c, vocab_size: int, seed: int) -> tuple[dict, np.ndarray]:
  """One client's round: [S, 1, B, L] full-length random sequences, loss on every token."""
  rng = np.random.default_rng([c.seed, seed])
  shape = (c.steps, 1, c.batch_size, c.seq_len)
  tokens = rng.integers(3, vocab_size, shape, dtype=np.int32)
  tokens[..., 0] = 1  # BOS
  return ({"tokens": tokens, "attention_mask": np.ones(shape, bool),
           "loss_mask": np.ones(shape, np.float32)}, np.ones(c.steps, bool))


def round_batches(c, vocab_size: int, num_clients: int) -> list[tuple[dict, np.ndarray]]:
  return [client_batches(c, vocab_size, 1000 + k) for k in range(num_clients)]


def prompts(c, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Generation prompts [batch, prompt_len], all real tokens (no padding to skew either side)."""
  g = c.generate
  rng = np.random.default_rng([c.seed, 7])
  tokens = rng.integers(3, vocab_size, (g.batch_size, g.prompt_len), dtype=np.int32)
  tokens[:, 0] = 1
  return tokens, np.ones_like(tokens, dtype=bool)


def client_round_tokens(c) -> int:
  """Tokens one client processes in a round (every position is a real token)."""
  return c.steps * c.batch_size * c.seq_len


def checkpoint_dir(workdir: Path) -> Path:
  return Path(workdir) / "model"
