"""The PyTorch side of the benchmark: the peers' stack (transformers + peft), eager or
`torch.compile`d, fed the same checkpoint, adapter init and batches as the JAX side so
that the ratios compare implementations, not workloads."""

from __future__ import annotations

import jax
import numpy as np
import torch

from fedjax_lora.bench import memory, workload
from fedjax_lora.bench.timing import first_and_repeats, prefill_and_decode
from fedjax_lora.client import ClientConfig
from fedjax_lora.torch_baseline import TorchFederation
from models import lora as lora_lib


def device_name(c) -> str:
  if c.device != "auto":
    return c.device
  return "cuda" if torch.cuda.is_available() else "cpu"


def device_description(c) -> dict:
  dev = device_name(c)
  kind = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  return {"device": dev, "device_kind": kind, "threads": torch.get_num_threads()}


def _sync(c):
  if device_name(c) == "cuda":
    torch.cuda.synchronize()


def peak_matmul(c, n: int, repeats: int = 5) -> float:
  dtype = getattr(torch, c.dtype)
  dev = device_name(c)
  gen = torch.Generator(device="cpu").manual_seed(0)
  a = torch.randn(n, n, generator=gen).to(dev, dtype)
  b = torch.randn(n, n, generator=gen).to(dev, dtype)

  def matmul():
    a @ b
    _sync(c)
  stats = first_and_repeats(matmul, repeats)
  return 2.0 * n ** 3 / min(stats["times_s"])


def _memory(c, before_mb: float) -> dict:
  if device_name(c) == "cuda":
    return {"kind": "device allocator peak",
            "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
  return memory.host_memory(before_mb)


def _federation(c, workdir, compile: bool):
  cfg = workload.model_config(c)
  spec = workload.lora_spec(c)
  fed = TorchFederation(workload.checkpoint_dir(workdir), spec, ClientConfig(), compile=compile,
                        device=device_name(c), dtype=c.dtype)
  # The same initial adapter as the JAX side (A from the same key, B = 0).
  start = jax.tree.map(np.asarray, lora_lib.init_adapter(cfg, spec, jax.random.key(c.seed)).params)
  return cfg, fed, start


def train(c, workdir, compile: bool) -> dict:
  cfg, fed, start = _federation(c, workdir, compile)
  batches, mask = workload.client_batches(c, cfg.vocab_size, 0)
  fed.set_adapter(start)
  before = memory.rss_mb()

  def one_client():
    fed.train_client(batches, mask)
    _sync(c)
  stats = first_and_repeats(one_client, c.repeats)
  stats["tokens_per_s"] = workload.client_round_tokens(c) / stats["median_s"]
  stats["memory"] = _memory(c, before)
  return stats


def rounds(c, workdir, compile: bool) -> dict:
  cfg, fed, start = _federation(c, workdir, compile)
  out = {}
  before = memory.rss_mb()
  for k in sorted(c.clients):
    clients = workload.round_batches(c, cfg.vocab_size, k)
    counts = np.full(k, float(workload.client_round_tokens(c)))

    def one_round():
      fed.run_round(start, clients, counts)
      _sync(c)
    stats = first_and_repeats(one_round, c.repeats)
    stats["tokens_per_s"] = k * workload.client_round_tokens(c) / stats["median_s"]
    stats["memory"] = _memory(c, before)  # running peak: K ascends (see jax_side.rounds)
    out[f"sequential/K={k}"] = stats
    print(f"  torch{' compiled' if compile else ''} K={k}: {stats['median_s']:.3f} s per round "
          f"(first {stats['first_s']:.2f} s)", flush=True)
  return out


def generate(c, workdir) -> dict:
  """`transformers` generate: greedy, KV cache, exactly new_tokens per row (no EOS stop)."""
  cfg, fed, start = _federation(c, workdir, compile=False)
  fed.set_adapter(start)
  model = fed.model.eval()
  tokens, mask = workload.prompts(c, cfg.vocab_size)
  ids = torch.from_numpy(tokens).long().to(device_name(c))
  attn = torch.from_numpy(mask).long().to(device_name(c))
  n = c.generate.new_tokens
  before = memory.rss_mb()

  def run(new_tokens):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    _sync(c)
    assert out.shape[1] == tokens.shape[1] + new_tokens
  stats = first_and_repeats(lambda: run(n), c.repeats)
  stats["new_tokens_per_s"] = c.generate.batch_size * n / stats["median_s"]
  stats.update(prefill_and_decode(c, lambda: run(1), stats["median_s"]))
  stats["memory"] = _memory(c, before)
  return stats
