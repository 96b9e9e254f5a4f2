"""Batched generation for evaluation: prompts in, answer texts and throughput out.

Prompts are sorted by length and grouped into fixed-shape batches: the prompt length is
bucketed to a power of two, and a short last batch runs at the next power of two of its
rows, filled with copies of a real row (whose outputs are thrown away). Each row stops at its own new-token budget, passed as an
array, so the compiled program depends only on the prompt bucket (and the number of
adapters), not on the budgets (`python -m launch.decode_shapes` counts the programs of a
config). The price: every batch's KV cache has room for `max_new_tokens` and each step
attends over all of it (masked), however short the batch's budgets.

The answer copies the input text with tags added, so each prompt's budget is derived from
its own input length (`new_tokens_factor` × input tokens + `new_tokens_margin`, capped at
`max_new_tokens`), never from the gold answer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lora.data import templates
from fedjax_lora.data.arrays import bucket_size
from models import generation
from models import lora as lora_lib

OUTPUT_END_MARKERS = ("\n### ",)  # a model that starts a new prompt section has finished


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  batch_size: int = 16
  max_new_tokens: int = 1024
  new_tokens_factor: float = 2.0
  new_tokens_margin: int = 16
  min_new_tokens: int = 16
  temperature: float = 0.0     # 0: greedy (the paper's setting)
  seed: int = 0

  def __post_init__(self):
    if self.batch_size < 1 or self.max_new_tokens < 1:
      raise ValueError("batch_size and max_new_tokens must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass
class DecodeStats:
  """Throughput of one `Decoder.generate` call (real rows only; fill rows excluded).

  Batches of a shape this Decoder had not run before include compilation; they count in
  `seconds` but `tokens_per_second` uses only the other (`warm_*`) batches when any exist.
  """
  prompts: int = 0
  new_tokens: int = 0
  seconds: float = 0.0
  warm_tokens: int = 0
  warm_seconds: float = 0.0
  batches: int = 0
  hit_budget: int = 0           # answers cut by their token budget (no EOS)
  shapes: set = dataclasses.field(default_factory=set)  # (batch, prompt len, cap, adapters)

  @property
  def tokens_per_second(self) -> float:
    if self.warm_seconds:
      return self.warm_tokens / self.warm_seconds
    return self.new_tokens / self.seconds if self.seconds else 0.0

  def add(self, other: "DecodeStats") -> None:
    self.prompts += other.prompts
    self.new_tokens += other.new_tokens
    self.seconds += other.seconds
    self.warm_tokens += other.warm_tokens
    self.warm_seconds += other.warm_seconds
    self.batches += other.batches
    self.hit_budget += other.hit_budget
    self.shapes |= other.shapes

  def to_dict(self) -> dict:
    return {"prompts": self.prompts, "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1), "batches": self.batches,
            "hit_budget": self.hit_budget, "distinct_shapes": len(self.shapes)}


def clean_output(text: str) -> str:
  """The answer part of a decoded continuation: up to a new prompt section, stripped."""
  for marker in OUTPUT_END_MARKERS:
    cut = text.find(marker)
    if cut >= 0:
      text = text[:cut]
  return text.strip()


def budget(n_input_tokens: int, cfg: DecodeConfig) -> int:
  """New-token budget for an answer that copies n input tokens with tags."""
  want = math.ceil(cfg.new_tokens_factor * n_input_tokens) + cfg.new_tokens_margin
  return min(cfg.max_new_tokens, max(cfg.min_new_tokens, want))


def prompt_bucket(n_prompt_tokens: int) -> int:
  """The padded prompt length a prompt is decoded at (one compiled program per bucket):
  the power-of-two rule training buckets its sequence lengths with, without the cap."""
  return bucket_size(n_prompt_tokens)


def batch_sizes(n_rows: int, batch_size: int) -> list[int]:
  """The batch shapes n rows of one prompt bucket run at: full batches, then the rest at
  the next power of two. 4 prompts in a batch of 16 would spend three quarters of every
  step on copies (about 50 s per site and round of the per-round hook, 135M base, 2 cores)."""
  full, rest = divmod(n_rows, batch_size)
  return [batch_size] * full + ([bucket_size(rest, minimum=1, cap=batch_size)] if rest else [])


class Decoder:
  """Greedy/sampled generation for many prompts with one tokenizer and model."""

  def __init__(self, model_config, graphdef, renderer, cfg: DecodeConfig = DecodeConfig(),
               log: Callable[[str], None] | None = None):
    """`renderer`: the data's `templates.Renderer` (a bare tokenizer: the paper format)."""
    self.renderer = templates.as_renderer(renderer)
    self.tokenizer = self.renderer.tokenizer
    self.model_config, self.graphdef, self.cfg = model_config, graphdef, cfg
    self.log = log
    self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    self.eos_ids = self.renderer.stop_ids  # EOS, and the chat template's end of turn
    self.total = DecodeStats()

  def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt exactly as training tokenized the prompt part of its sequence."""
    return self.renderer.prompt_ids(prompts)

  def _count(self, texts: Sequence[str]) -> list[int]:
    return [len(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

  def generate(self, base, adapters, prompts: Sequence[str], input_texts: Sequence[str],
               label: str = "") -> tuple[list[str], DecodeStats]:
    """Answer texts (cleaned) for `prompts`, in order, and this call's statistics."""
    if len(prompts) != len(input_texts):
      raise ValueError(f"{len(prompts)} prompts but {len(input_texts)} input texts")
    stats = DecodeStats()
    if not prompts:
      return [], stats
    cfg = self.cfg
    ids = self.encode_prompts(prompts)
    budgets = [budget(n, cfg) for n in self._count(input_texts)]
    max_positions = self.model_config.max_position_embeddings
    # Within a prompt bucket, rows with similar budgets share batches, so a batch ends
    # (every row done) close to its rows' own budgets.
    order = sorted(range(len(ids)), key=lambda i: (prompt_bucket(len(ids[i])), budgets[i], i))
    outputs: list[str | None] = [None] * len(ids)
    n_adapters = len(lora_lib.as_adapter_list(adapters))
    rng = jax.random.key(cfg.seed)
    groups: dict[int, list[int]] = {}
    for i in order:
      groups.setdefault(prompt_bucket(len(ids[i])), []).append(i)
    for plen, members in groups.items():
      cap = max(1, min(cfg.max_new_tokens, max_positions - plen))
      for b, size in enumerate(batch_sizes(len(members), cfg.batch_size)):
        rows = members[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        filled = rows + [rows[0]] * (size - len(rows))
        tokens, mask = generation.left_pad([ids[i] for i in filled], self.pad_id, plen)
        row_budgets = np.array([min(budgets[i], cap) for i in filled], np.int32)
        rng, key = jax.random.split(rng)
        t0 = time.perf_counter()
        out, lengths = generation.generate(
            self.model_config, self.graphdef, base, adapters, jnp.asarray(tokens),
            jnp.asarray(mask), max_new_tokens=cap, eos_ids=self.eos_ids,
            sample=cfg.temperature > 0, temperature=cfg.temperature or 1.0, rng=key,
            pad_id=self.pad_id, row_budgets=row_budgets)
        out, lengths = jax.device_get((out, lengths))
        seconds = time.perf_counter() - t0
        shape = (size, plen, cap, n_adapters)
        warm = shape in self.total.shapes or shape in stats.shapes
        real_tokens = 0
        for r, i in enumerate(rows):
          n = int(lengths[r])
          row = np.asarray(out[r, :n]).tolist()
          stats.hit_budget += int(not (row and row[-1] in self.eos_ids))
          real_tokens += n
          outputs[i] = clean_output(self.tokenizer.decode(row, skip_special_tokens=True))
        stats.seconds += seconds
        stats.batches += 1
        stats.shapes.add(shape)
        stats.prompts += len(rows)
        stats.new_tokens += real_tokens
        if warm:
          stats.warm_seconds += seconds
          stats.warm_tokens += real_tokens
    self.total.add(stats)
    if self.log:
      self.log(f"  generated {label + ': ' if label else ''}{stats.prompts} answers, "
               f"{stats.new_tokens} tokens in {stats.seconds:.1f}s "
               f"({stats.tokens_per_second:.0f} tok/s, {stats.hit_budget} hit the budget)")
    return outputs, stats
