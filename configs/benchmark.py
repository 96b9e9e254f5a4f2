"""Throughput benchmark shapes (`python -m launch.benchmark --config=configs/benchmark.py:SHAPE`).

SHAPE is one of:
  tiny          smoke test (CI): seconds, one repetition;
  small         default: 8 layers, width 512, 32k vocabulary; a few minutes on 2 CPU cores;
  smollm2_135m  SmolLM2-135M-Instruct's shape (30 layers, width 576, 9/3 heads, 49k vocabulary,
                tied embeddings), random weights unless --config.checkpoint=smollm2-135m-instruct;
                batch 4 x 512 tokens (the five-site training data in the chat format has a
                median of 459 real tokens per example with this tokenizer); about an hour on
                2 CPU cores;
  llama3_2_1b   Llama-3.2-1B shapes (random weights), bf16, the paper's 800-token batches;
  llama3_8b     Llama-3.1-8B shapes (random weights), bf16; needs a large accelerator.
Every field can be overridden: `--config.repeats=5 --config.clients=1,2`
`--config.tasks=generate`.
"""

import ml_collections

MODELS = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2,
                 num_heads=4, num_kv_heads=2, rope_theta=10000.0),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
                num_heads=8, num_kv_heads=4, rope_theta=10000.0),
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama3_2_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_layers=16, num_heads=32, num_kv_heads=8, rope_theta=500000.0),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0),
}


def get_config(shape: str = "small") -> ml_collections.ConfigDict:
  if shape not in MODELS:
    raise ValueError(f"unknown benchmark shape {shape!r}; expected one of {sorted(MODELS)}")
  cpu_sized = shape in ("tiny", "small", "smollm2_135m")
  c = ml_collections.ConfigDict()
  c.shape = shape
  c.model = ml_collections.ConfigDict(dict(
      **{"tie_word_embeddings": False, **MODELS[shape]}, remat="none", attention_impl="",
      # The JAX side's frozen base (models/quant): none, nf4, int8, or keep (needs
      # config.checkpoint to be a .gguf file or a named base). The torch side stays float.
      quantize="none", quant_block_size=64, quant_double_quant=False))
  # Base weights and compute. Adapters and optimizer state are always float32.
  c.dtype = "float32" if cpu_sized else "bfloat16"
  # The paper's adapter: r=16, alpha=64 on all seven projections.
  c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=64.0,
                                          targets="q,k,v,o,gate,up,down"))
  c.batch_size = 4 if shape != "tiny" else 2
  # The paper trains on 800 tokens; smollm2_135m: the five-site median (459) in its bucket.
  c.seq_len = {"tiny": 64, "small": 256, "smollm2_135m": 512}.get(shape, 800)
  # Local steps per client per call / round. One at the 135M shape: a [4, 512] step takes
  # ~30 s on 2 CPU cores (AVX2), and the K=1..4 rounds of three frameworks add up to ~30 steps.
  c.steps = {"small": 3, "smollm2_135m": 1}.get(shape, 2)
  # K per round. The 135M shape stops at 4 (K=8 of three frameworks would add an hour on
  # 2 CPU cores); the small shape covers 1, 2, 4, 8.
  c.clients = {"tiny": (1, 2), "llama3_8b": (1, 2), "smollm2_135m": (1, 2, 4)}.get(
      shape, (1, 2, 4, 8))
  c.tasks = ("train", "rounds", "generate")   # which measurements to run
  c.skip = ()   # worker specs not to run, e.g. ("torch_compile/rounds", "jax/rounds/vmap")
  # JAX client modes timed per round (config.mode's values; fedjax_lora/client_modes.py).
  # A (mode, K) whose estimated activations exceed most of the free memory is skipped
  # (bench/jax_side.py FIT_FRACTION).
  c.modes = ("sequential", "chunked:2", "vmap")
  c.frameworks = ("jax", "torch_eager", "torch_compile")
  # Timed repetitions after the first (compile) call; 2 at the 135M shape, where one
  # training step takes ~30 s on 2 CPU cores.
  c.repeats = {"tiny": 1, "smollm2_135m": 2}.get(shape, 3)
  c.generate = ml_collections.ConfigDict(dict(
      batch_size=16 if shape != "tiny" else 4,
      # smollm2_135m: five-site test prompts have a median of 422 tokens (bucket 512).
      prompt_len={"tiny": 16, "small": 128}.get(shape, 512),
      new_tokens={"tiny": 8, "small": 64}.get(shape, 128)))
  c.peak_matmul_size = {"tiny": 256}.get(shape, 2048 if cpu_sized else 8192)  # n of the n x n matmul
  # "" = random weights of `model`; an HF directory, .gguf file or named base (e.g.
  # smollm2-135m-instruct) = its real weights and shape (`model` keeps remat/attention only).
  c.checkpoint = ""
  c.seed = 0
  c.device = "auto"           # "auto": cuda when torch sees a GPU, else cpu
  return c
