"""Throughput benchmark shapes (`python -m launch.benchmark --config=configs/benchmark.py:SHAPE`).

SHAPE is one of:
  tiny          smoke test (CI): seconds, one repetition;
  small         default: 8 layers, width 512, 32k vocabulary; a few minutes on 2 CPU cores;
  llama3_2_1b   Llama-3.2-1B shapes (random weights), bf16, the paper's 800-token batches;
  llama3_8b     Llama-3.1-8B shapes (random weights), bf16; needs a large accelerator.
Every field can be overridden: `--config.repeats=5 --config.clients=1,2`.
"""

import ml_collections

_MODELS = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2,
                 num_heads=4, num_kv_heads=2, rope_theta=10000.0),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
                num_heads=8, num_kv_heads=4, rope_theta=10000.0),
    "llama3_2_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_layers=16, num_heads=32, num_kv_heads=8, rope_theta=500000.0),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0),
}


def get_config(shape: str = "small") -> ml_collections.ConfigDict:
  if shape not in _MODELS:
    raise ValueError(f"unknown benchmark shape {shape!r}; expected one of {sorted(_MODELS)}")
  cpu_sized = shape in ("tiny", "small")
  c = ml_collections.ConfigDict()
  c.shape = shape
  c.model = ml_collections.ConfigDict(dict(**_MODELS[shape], remat="none", attention_impl=""))
  # Base weights and compute. Adapters and optimizer state are always float32.
  c.dtype = "float32" if cpu_sized else "bfloat16"
  # The paper's adapter: r=16, alpha=64 on all seven projections.
  c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=64.0,
                                          targets="q,k,v,o,gate,up,down"))
  c.batch_size = 4 if shape != "tiny" else 2
  c.seq_len = {"tiny": 64, "small": 256}.get(shape, 800)     # the paper trains on 800 tokens
  c.steps = 2 if shape != "small" else 3        # local steps per client per call / round
  c.clients = (1, 2) if shape in ("tiny", "llama3_8b") else (1, 2, 4, 8)  # K per round
  c.modes = ("vmap", "sequential")            # JAX client execution modes timed per round
  c.frameworks = ("jax", "torch_eager", "torch_compile")
  c.repeats = 1 if shape == "tiny" else 3     # timed repetitions after the first (compile)
  c.generate = ml_collections.ConfigDict(dict(
      batch_size=16 if shape != "tiny" else 4,
      prompt_len={"tiny": 16, "small": 128}.get(shape, 512),
      new_tokens={"tiny": 8, "small": 64}.get(shape, 128)))
  c.peak_matmul_size = {"tiny": 256, "small": 2048}.get(shape, 8192)  # n of the n x n matmul
  # "" = random weights of `model`; an HF directory, .gguf file or named base (e.g.
  # smollm2-135m-instruct) = its real weights and shape (`model` keeps remat/attention only).
  c.checkpoint = ""
  c.seed = 0
  c.device = "auto"           # "auto": cuda when torch sees a GPU, else cpu
  return c
