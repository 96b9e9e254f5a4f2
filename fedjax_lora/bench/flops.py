"""Model FLOPs of LoRA training and decoding, for utilisation figures.

Forward costs 2 FLOPs per weight per token. With the base frozen, the backward pass
needs activation gradients (another 2 per weight) but no weight gradients, so LoRA
training costs about 4N per token (full fine-tuning: 6N). Attention scores and values
add 2 · 2 · T · heads · head_dim per layer and token forward, halved for the causal
mask (MaxText's convention), and three times that in training. LoRA factors are
trained, so they cost 6 per parameter and token. Remat recomputation is not counted.
"""

from __future__ import annotations

from models import lora as lora_lib
from models.config import LlamaConfig
from models.lora import LoraSpec

TRAIN_FORMULA = ("train FLOPs/token = 4*N_matmul + 3*(2*L*T*H*hd) + 6*N_lora, where "
                 "N_matmul = projection and lm_head weights (no embedding lookup), "
                 "2*L*T*H*hd = causal attention forward (QK^T and AV at half), "
                 "T = sequence length")
DECODE_FORMULA = ("decode FLOPs/token = 2*N_matmul + 2*N_lora + 4*L*C*H*hd, where C = mean "
                  "context length while decoding (no causal halving: one query row)")


def matmul_params(cfg: LlamaConfig) -> int:
  """Weights that take part in matmuls: every projection of every layer, plus the head."""
  per_layer = sum(a * b for a, b in (lora_lib.projection_shape(cfg, t)
                                     for t in lora_lib.ALL_TARGETS))
  return cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size


def lora_params(cfg: LlamaConfig, spec: LoraSpec) -> int:
  return lora_lib.num_params(cfg, spec)


def attention_forward(cfg: LlamaConfig, seq_len: int) -> float:
  """Causal attention forward FLOPs per token (scores + values, at half for the mask)."""
  return 2.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def train_flops_per_token(cfg: LlamaConfig, spec: LoraSpec, seq_len: int) -> float:
  return (4.0 * matmul_params(cfg) + 3.0 * attention_forward(cfg, seq_len)
          + 6.0 * lora_params(cfg, spec))


def decode_flops_per_token(cfg: LlamaConfig, spec: LoraSpec, mean_context: float) -> float:
  return (2.0 * matmul_params(cfg) + 2.0 * lora_params(cfg, spec)
          + 4.0 * cfg.num_layers * mean_context * cfg.num_heads * cfg.head_dim)
