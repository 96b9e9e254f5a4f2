r"""Compile time of the LoRA forward+backward step against depth, scanned vs unrolled layers.

  python -m launch.compile_time --layers=2,16 --hidden_size=512 --out=benchmarks/results/compile_time_cpu.json

Scanning the stacked layers should keep compile time nearly flat in depth; the unrolled
variant is measured beside it for contrast. Weights are abstract (no allocation).
"""

import json
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from fedjax_lora.losses import causal_lm_loss
from launch import errors
from models import llama
from models import lora as lora_lib
from models.config import LlamaConfig

_LAYERS = flags.DEFINE_list("layers", ["2", "16"], "Depths to compile.")
_HIDDEN = flags.DEFINE_integer("hidden_size", 512, "Model width.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Compilations per setting; the median is reported.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")


def compile_seconds(num_layers: int, scan: bool) -> float:
  config = LlamaConfig(vocab_size=32000, hidden_size=_HIDDEN.value,
                       intermediate_size=_HIDDEN.value * 8 // 3 // 64 * 64, num_layers=num_layers,
                       num_heads=_HIDDEN.value // 64, num_kv_heads=max(1, _HIDDEN.value // 256),
                       scan_layers=scan)
  graphdef, params = llama.abstract_model(config)
  adapter = jax.eval_shape(lambda: lora_lib.init_adapter(
      config, lora_lib.LoraSpec(rank=16, alpha=64), jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((_BATCH.value, _SEQ.value), jnp.int32)

  def loss(adapter, params, tokens):
    logits, _ = llama.forward(graphdef, params, [adapter], tokens)
    return causal_lm_loss(logits, tokens, jnp.ones_like(tokens))[0]

  times = []
  for _ in range(_REPEATS.value):
    step = jax.jit(jax.value_and_grad(loss))  # a fresh function defeats the compilation cache
    t0 = time.perf_counter()
    step.lower(adapter, params, tokens).compile()
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", None)
  rows = []
  for scan in (True, False):
    for depth in (int(d) for d in _LAYERS.value):
      secs = compile_seconds(depth, scan)
      rows.append({"layers": depth, "scan_layers": scan, "compile_seconds": round(secs, 3)})
      print(f"layers={depth:3d} scan={scan!s:5}  compile {secs:6.2f}s", flush=True)
  summary = {}
  for scan in (True, False):
    t = {r["layers"]: r["compile_seconds"] for r in rows if r["scan_layers"] == scan}
    lo, hi = min(t), max(t)
    summary["scan" if scan else "unrolled"] = round(t[hi] / t[lo], 2)
    print(f"{'scan' if scan else 'unrolled'}: compile({hi})/compile({lo}) = {t[hi] / t[lo]:.2f}")
  if _OUT.value:
    result = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
              "jax": jax.__version__, "hidden_size": _HIDDEN.value, "seq_len": _SEQ.value,
              "batch_size": _BATCH.value, "rows": rows, "ratio_deep_over_shallow": summary}
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  errors.run(main)
