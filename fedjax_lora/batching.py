"""Host-side batch plans: every client of a round gets [S, A, B, L] arrays plus a step mask.

Clients hold different amounts of data; padding them all to the round's longest step
count with masked steps keeps one compiled program for every round and client. Within a
step, a last partial batch is filled with padding rows that carry no loss (as the HF
Trainer keeps partial batches rather than dropping them).
"""

from __future__ import annotations

import numpy as np

from fedjax_lora.client import steps_per_round
from fedjax_lora.data.arrays import PAD_ROW, SiteArrays, gather


def example_order(num_examples: int, batch_size: int, accumulation: int, epochs: int,
                  rng: np.random.Generator) -> np.ndarray:
  """[S, A, B] example indices (PAD_ROW for padding), reshuffled every epoch."""
  per_step = batch_size * accumulation
  steps_per_epoch = steps_per_round(num_examples, batch_size, accumulation, 1)
  plans = []
  for _ in range(epochs):
    order = np.full(steps_per_epoch * per_step, PAD_ROW, np.int64)
    order[:num_examples] = rng.permutation(num_examples)
    plans.append(order.reshape(steps_per_epoch, accumulation, batch_size))
  return np.concatenate(plans)


def round_batches(sites: list[SiteArrays], batch_size: int, accumulation: int, epochs: int,
                  rngs: list[np.random.Generator], length: int,
                  num_steps: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Stacked batches [K, S, A, B, L] and step mask [K, S] for one round of K clients."""
  plans = [example_order(len(a), batch_size, accumulation, epochs, r)
           for a, r in zip(sites, rngs)]
  steps = num_steps or max(p.shape[0] for p in plans)
  if any(p.shape[0] > steps for p in plans):
    raise ValueError(f"a client needs {max(p.shape[0] for p in plans)} steps but the round "
                     f"allows {steps}")
  mask = np.zeros((len(sites), steps), bool)
  batches = []
  for k, (arrays, plan) in enumerate(zip(sites, plans)):
    padded = np.full((steps,) + plan.shape[1:], PAD_ROW, np.int64)
    padded[:plan.shape[0]] = plan
    mask[k, :plan.shape[0]] = True
    batches.append(gather(arrays, padded, length))
  stacked = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
  return stacked, mask
