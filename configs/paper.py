"""The paper's fine-tuning setting (method.md; the released code's HF Trainer defaults) on
the real five-site plan, at Llama-3.2-1B or Llama-3.1-8B shapes.

  python -m launch.federate --config=configs/paper.py:llama3_2_1b --workdir=DIR \
      --config.model.path=/path/to/Llama-3.2-1B-Instruct
  python -m launch.evaluate --config=configs/paper.py:llama3_8b --workdir=DIR \
      --config.model.path=/path/to/Llama-3.1-8B-Instruct

LoRA r=16, alpha=64 on all seven projections; AdamW lr 2e-4 with 5% linear warmup and
cosine decay; batch 4 of at most 800 tokens; 2 local epochs; 3 rounds; a 4-bit NF4 base
(QLoRA, block 64, no double quantization) computing in bf16, with float32 adapters and
optimizer state. Without `config.model.path` the base is random
weights with the chosen layer shapes but the data tokenizer's vocabulary (LLaMA-2's
32000, not Llama-3's 128256) and default RoPE, untied: for memory and throughput checks
of the layers only. With it, the checkpoint's own config.json decides everything.
"""

import ml_collections

from configs import data_five_sites, federate

SHAPES = {
    "llama3_2_1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8),
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8),
}


def get_config(shape: str = "llama3_2_1b") -> ml_collections.ConfigDict:
  if shape not in SHAPES:
    raise ValueError(f"unknown paper shape {shape!r}; expected one of {sorted(SHAPES)}")
  c = federate.get_config("tiny")
  c.data = data_five_sites.get_config()          # max_length 800, full-sequence loss
  c.data.sites.e3c.role = "new_site"             # as in configs/evaluate_five_sites.py
  c.model.update(dtype="bfloat16", remat="save_qkv", quantize="nf4", quant_block_size=64,
                 quant_double_quant=False, **SHAPES[shape])
  c.lora.update(rank=16, alpha=64.0, targets="q,k,v,o,gate,up,down", layers=())
  c.client.update(learning_rate=2e-4, warmup_fraction=0.05, schedule="cosine",
                  weight_decay=0.0, grad_clip=1.0)
  c.run.update(rounds=3, epochs=2, batch_size=4, accumulation=1, val_examples_per_site=50,
               val_chunk=8)
  c.eval.update(max_examples_per_task=0, max_new_tokens=512)  # whole test splits
  return c
