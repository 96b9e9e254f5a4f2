"""How a round runs its clients: all at once, one at a time, or in chunks.

`config.mode` (and `RoundSpec.mode`/`chunk`):
  vmap        every sampled client at once under `jax.vmap` (activations x K);
  sequential  one client after another under `lax.map` (activations x 1);
  chunked:N   N clients at a time under `vmap`, the chunks one after another under
              `lax.map` (activations x N);
  auto        `chunked:N` with the largest N whose estimated training activations fit in
              MEMORY_FRACTION of the device's free memory; on the CPU backend N is 1
              (see `choose`).
A chunk that holds every client runs as vmap, a chunk of one as sequential.
All four trace the same client function, so their results agree.
"""

from __future__ import annotations

import dataclasses

RESOLVED = ("vmap", "sequential", "chunked")  # what a round runs (`RoundSpec.mode`)
# Fraction of the free device memory that the clients' activations may take; the rest is
# left for the base, XLA's temporaries and fragmentation.
MEMORY_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class ClientMode:
  mode: str          # vmap | sequential | chunked
  chunk: int = 0     # clients per chunk (chunked only)

  def in_flight(self, num_clients: int) -> int:
    """Clients training at once (whose activations are alive together)."""
    return {"vmap": num_clients, "chunked": self.chunk}.get(self.mode, 1)

  def describe(self) -> str:
    return f"chunked:{self.chunk}" if self.mode == "chunked" else self.mode


def parse(text: str) -> tuple[str, int]:
  """'vmap' | 'sequential' | 'auto' | 'chunked:N' -> (mode, N); ValueError naming the form."""
  name, _, arg = str(text).partition(":")
  if name in ("vmap", "sequential", "auto") and not arg:
    return name, 0
  if name == "chunked":
    try:
      n = int(arg)
    except ValueError:
      n = 0
    if n >= 1:
      return name, n
  raise ValueError(f"must be vmap, sequential, auto or chunked:N with N >= 1, got {text!r}")


def chunk_size(num_clients: int, chunk: int) -> int:
  """The chunk actually used for `num_clients` clients: the largest divisor of num_clients
  that is <= chunk (chunks are equal, so no client slot computes padding)."""
  chunk = max(1, min(chunk, num_clients))
  while num_clients % chunk:
    chunk -= 1
  return chunk


def activation_bytes(model_config, batch_size: int, seq_len: int) -> int:
  """Estimated bytes one client's training step keeps for its backward pass.

  Per layer and token: the normed inputs, q/k/v and their rotated copies, the attention
  output and projection, the MLP's gate, up, SiLU and product (8 D + 3 kv + 4 F values),
  plus the attention probabilities and logits (2 H L values); then the float32 logits and
  their gradient over the vocabulary. With remat "full" a layer keeps only its input, plus
  one layer's full set while it is recomputed; the other policies save more than "full"
  and less than none, and are counted as none (an upper bound). At the SmolLM2-135M shape
  ([4, 512], float32) this gives 5.4 GiB; the benchmark's training worker peaked 5.65 GiB
  above its loaded model.
  """
  c = model_config
  b = c.jnp_dtype.itemsize
  n = batch_size * seq_len
  kv = c.num_kv_heads * c.head_dim
  per_layer = n * (8 * c.hidden_size + 3 * kv + 4 * c.intermediate_size) * b
  per_layer += 2 * batch_size * c.num_heads * seq_len * seq_len * 4
  layers = c.num_layers * per_layer
  if c.remat == "full":
    layers = c.num_layers * n * c.hidden_size * b + per_layer
  return int(layers + 2 * n * c.vocab_size * 4)


def free_device_bytes(device) -> int | None:
  """Free memory of an accelerator, or the host's available memory for the CPU backend."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def choose(mode: str, num_clients: int, model_config, batch_size: int, seq_len: int,
           device) -> tuple[ClientMode, str]:
  """(ClientMode, why) for `mode` as in config.mode and `num_clients` sampled per round."""
  name, n = parse(mode)
  if name == "chunked":
    return _from_chunk(chunk_size(num_clients, n), num_clients,
                       f"{num_clients} clients in chunks of at most {n}")
  if name != "auto":
    return ClientMode(name), "as configured"
  per_client = activation_bytes(model_config, batch_size, seq_len)
  free = free_device_bytes(device)
  fits = num_clients if free is None else int(MEMORY_FRACTION * free // max(per_client, 1))
  why = (f"~{per_client / 2**30:.2f} GiB of activations per client, "
         f"{'unknown' if free is None else f'{free / 2**30:.1f} GiB'} free")
  if device.platform == "cpu":
    # XLA:CPU already spreads one client's matmuls over every core, and vmapped clients
    # ran slower than sequential ones: 8 clients of the small benchmark shape took 20.4 s
    # vmapped against 15.7 s in sequence (benchmarks/results/small_cpu_avx512.md), and at the
    # 135M base 2 clients took 57.4 s vmapped against 56.8 s (smollm2_135m_cpu.md).
    fits = min(fits, 1)
    why += "; on CPU one client at a time is fastest"
  return _from_chunk(chunk_size(num_clients, max(1, fits)), num_clients, why)


def _from_chunk(chunk: int, num_clients: int, why: str) -> tuple[ClientMode, str]:
  """A chunk of one client is sequential, a chunk of every client vmap."""
  if chunk == 1:
    return ClientMode("sequential"), why
  if chunk >= num_clients:
    return ClientMode("vmap"), why
  return ClientMode("chunked", chunk), why
