"""A tiny randomly initialised LLaMA that runs anywhere in seconds (demo and smoke tests)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=320,          # >= the 259-token byte tokenizer, padded to a multiple of 64
      hidden_size=128,
      intermediate_size=384,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      max_position_embeddings=2048,
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
  ))
  return c
