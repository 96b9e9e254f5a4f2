"""The JAX side of the benchmark, written as a user would run it: jitted calls on the
first device, host inputs passed in, results blocked on before the clock stops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lora import client_modes
from fedjax_lora.algorithms import get_algorithm
from fedjax_lora.bench import memory, workload
from fedjax_lora.bench.timing import first_and_repeats, prefill_and_decode
from fedjax_lora.client import ClientConfig, client_update
from fedjax_lora.rounds import RoundSpec, compile_round
from models import checkpoints, generation, hf_checkpoint, lora as lora_lib, quant


# A (mode, K) whose estimated activations exceed this fraction of the free memory is
# skipped (named in the results) rather than run into the out-of-memory killer.
FIT_FRACTION = 0.9


def device_description() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count()}


def peak_matmul(n: int, dtype: str, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n x n x n matmuls (the device's practical peak)."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  stats = first_and_repeats(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2.0 * n ** 3 / min(stats["times_s"])


def _memory(before_mb: float) -> dict:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return {"kind": "device allocator peak", "peak_mb": round(stats["peak_bytes_in_use"] / 2**20, 1)}
  return memory.host_memory(before_mb)


def _load(c, workdir):
  cfg = workload.model_config(c)
  qc = quant.QuantConfig.from_settings(c.model)
  if qc.reads_gguf:  # the GGUF's own blocks; the shared HF copy holds their float values
    cfg, graphdef, base = checkpoints.load_params(
        checkpoints.resolve(c.checkpoint, gguf=True), cfg, quantize=qc)
  else:
    cfg, graphdef, base = hf_checkpoint.load_params(workload.checkpoint_dir(workdir), cfg,
                                                    quantize=qc)
  spec = workload.lora_spec(c)
  adapter = lora_lib.init_adapter(cfg, spec, jax.random.key(c.seed)).params
  return cfg, graphdef, base, spec, adapter


def train(c, workdir) -> dict:
  """Tokens/s of one client's local training: `steps` fused steps in one compiled call."""
  cfg, graphdef, base, spec, adapter = _load(c, workdir)
  # Host batches go in with every call, as the torch side converts its own.
  batches, mask = workload.client_batches(c, cfg.vocab_size, 0)
  step = jax.jit(lambda base, params, batches, mask: client_update(
      graphdef, base, {"global": params}, {"global": spec}, batches, mask, None,
      ClientConfig()))
  before = memory.rss_mb()
  stats = first_and_repeats(
      lambda: jax.block_until_ready(step(base, adapter, batches, mask)), c.repeats)
  stats["tokens_per_s"] = workload.client_round_tokens(c) / stats["median_s"]
  stats["memory"] = _memory(before)
  stats["base_bytes"] = quant.base_bytes(base)  # resident, packed if config.model.quantize
  return stats


def rounds(c, workdir, mode: str) -> dict:
  """Wall time and memory of a whole FedAvg round for each K in one client mode (`vmap`,
  `sequential` or `chunked:N`), inputs from the host. K ascends, so the running peak of
  this process after K is that K's peak (a round's memory grows with K)."""
  cfg, graphdef, base, spec, adapter = _load(c, workdir)
  aggregator = get_algorithm("fedavg").make_aggregator()
  device = jax.devices()[0]
  out = {}
  before = memory.rss_mb()
  for k in sorted(c.clients):
    clients, _ = client_modes.choose(mode, k, cfg, c.batch_size, c.seq_len, device)
    need = clients.in_flight(k) * client_modes.activation_bytes(cfg, c.batch_size, c.seq_len)
    free = client_modes.free_device_bytes(device)
    if free is not None and device.platform == "cpu":
      # What this worker already holds from smaller K (XLA keeps its buffers) is reusable.
      free += max(0.0, memory.rss_mb() - before) * 2**20
    if free is not None and need > FIT_FRACTION * free:
      out[f"{mode}/K={k}"] = {"skipped": f"needs ~{need / 2**30:.1f} GiB of activations, "
                                         f"{free / 2**30:.1f} GiB free"}
      print(f"  jax {mode} K={k}: skipped ({out[f'{mode}/K={k}']['skipped']})", flush=True)
      continue
    round_fn = compile_round(RoundSpec(get_algorithm("fedavg"), ClientConfig(), spec,
                                       mode=clients.mode, chunk=clients.chunk),
                             aggregator, graphdef)
    batch_list = workload.round_batches(c, cfg.vocab_size, k)
    batches = jax.tree.map(lambda *x: np.stack(x), *[b for b, _ in batch_list])
    mask = np.stack([m for _, m in batch_list])
    keys = jax.random.split(jax.random.key(0), k)
    counts = np.full(k, float(workload.client_round_tokens(c)), np.float32)
    state = {"global": adapter, "server": aggregator.init(adapter)}

    def one_round():
      new_state, _, metrics = round_fn(base, state, {}, batches, mask, np.arange(k),
                                       np.ones(k, bool), counts, keys, None, None)
      return jax.block_until_ready((new_state, metrics))

    stats = first_and_repeats(one_round, c.repeats)
    stats["tokens_per_s"] = k * workload.client_round_tokens(c) / stats["median_s"]
    stats["clients"] = clients.describe()
    stats["memory"] = _memory(before)
    out[f"{mode}/K={k}"] = stats
    print(f"  jax {mode} K={k} ({clients.describe()}): {stats['median_s']:.3f} s per round "
          f"(first {stats['first_s']:.2f} s), peak {stats['memory']['peak_mb']:,.0f} MB",
          flush=True)
  return out


def generate(c, workdir) -> dict:
  """New tokens/s of batched greedy decoding with the KV cache, no early stop; and apart,
  the prefill (a one-token call) and the decoding steps' own rate."""
  cfg, graphdef, base, spec, adapter = _load(c, workdir)
  tokens, mask = workload.prompts(c, cfg.vocab_size)
  adapters = [lora_lib.LoraAdapter(adapter, spec)]
  run = lambda n: jax.block_until_ready(generation.generate(
      cfg, graphdef, base, adapters, tokens, mask, max_new_tokens=n, eos_ids=()))
  before = memory.rss_mb()
  stats = first_and_repeats(lambda: run(c.generate.new_tokens), c.repeats)
  stats["new_tokens_per_s"] = c.generate.batch_size * c.generate.new_tokens / stats["median_s"]
  stats.update(prefill_and_decode(c, lambda: run(1), stats["median_s"]))
  stats["memory"] = _memory(before)
  return stats
