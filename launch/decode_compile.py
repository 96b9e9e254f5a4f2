r"""Compile time and warm throughput of KV-cache decoding (`models.generation.generate`).

  # compile seconds and HLO size of one generate call, per depth (abstract weights)
  python -m launch.decode_compile --shape=smollm2_135m --batch_size=4 --prompt_len=256 \
      --new_tokens=32
  python -m launch.decode_compile --shape=small --layers=2,8
  # warm decode throughput (random weights, median of --repeats calls after the first)
  python -m launch.decode_compile --shape=small --throughput --batch_size=16 \
      --prompt_len=128 --new_tokens=128

Every call decodes exactly --new_tokens per row (no EOS) through one rank-16 LoRA adapter
on all seven projections, as the benchmark does.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import benchmark as benchmark_config
from models import generation, llama
from models import lora as lora_lib
from models.config import LlamaConfig

# The benchmark's model shapes (configs/benchmark.py), one place for each.
_SHAPES = benchmark_config.MODELS
_SHAPE = flags.DEFINE_enum("shape", "small", ["small", "smollm2_135m"],
                           "Model width and default depth (a configs/benchmark.py shape).")
_LAYERS = flags.DEFINE_list("layers", None, "Depths to measure (default: the shape's).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Rows decoded together.")
_PROMPT = flags.DEFINE_integer("prompt_len", 256, "Prompt length (all tokens real).")
_NEW = flags.DEFINE_integer("new_tokens", 32, "New tokens per row.")
_THROUGHPUT = flags.DEFINE_bool("throughput", False, "Time warm calls instead of compiling.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Warm calls timed (--throughput).")


def _setup(num_layers, abstract):
  config = LlamaConfig(**{**_SHAPES[_SHAPE.value], "num_layers": num_layers},
                       max_position_embeddings=_PROMPT.value + _NEW.value, eos_token_id=None)
  spec = lora_lib.LoraSpec(rank=16, alpha=64)
  if abstract:
    graphdef, params = llama.abstract_model(config)
    adapter = jax.eval_shape(lambda: lora_lib.init_adapter(config, spec, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((_BATCH.value, _PROMPT.value), jnp.int32)
    return config, graphdef, params, adapter, tokens, tokens
  graphdef, params = llama.init_model(config)
  adapter = lora_lib.init_adapter(config, spec, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(3, config.vocab_size,
                                             (_BATCH.value, _PROMPT.value), dtype=np.int32)
  return config, graphdef, params, adapter, jnp.asarray(tokens), jnp.ones_like(tokens)


def compile_stats(num_layers):
  """(lower seconds, compile seconds, lowered HLO characters) of one generate program."""
  config, graphdef, params, adapter, tokens, mask = _setup(num_layers, abstract=True)
  t0 = time.perf_counter()
  # The arguments `generation.generate` passes (config is static: each depth lowers anew).
  lowered = generation._generate.lower(
      config, graphdef, params, (adapter,), tokens, mask,
      jax.ShapeDtypeStruct((_BATCH.value,), jnp.int32), max_new_tokens=_NEW.value,
      eos_ids=(), sample=False, temperature=1.0, rng=None, pad_id=0)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1, len(lowered.as_text())


def throughput(num_layers):
  """(first call seconds, new tokens/s of the median warm call)."""
  config, graphdef, params, adapter, tokens, mask = _setup(num_layers, abstract=False)
  run = lambda: jax.block_until_ready(generation.generate(
      config, graphdef, params, (adapter,), tokens, mask, max_new_tokens=_NEW.value))
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return first, _BATCH.value * _NEW.value / statistics.median(times), times


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", None)
  depths = [int(d) for d in _LAYERS.value or [_SHAPES[_SHAPE.value]["num_layers"]]]
  for depth in depths:
    if _THROUGHPUT.value:
      first, tps, times = throughput(depth)
      print(f"{_SHAPE.value} layers={depth}: first call {first:.2f}s, warm {tps:.1f} new tok/s "
            f"(calls {', '.join(f'{t:.3f}' for t in times)} s)", flush=True)
    else:
      lower, comp, size = compile_stats(depth)
      print(f"{_SHAPE.value} layers={depth}: lower {lower:.2f}s, compile {comp:.2f}s, "
            f"lowered HLO {size} chars", flush=True)


if __name__ == "__main__":
  app.run(main)
