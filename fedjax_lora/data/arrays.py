"""Site arrays: the fixed-shape token arrays of one site and split, and every row-level
operation on them.

`encoding.encode` turns examples into token ids; `to_arrays` pads them to [N, L] with the
attention and loss masks. The rest works on those arrays: `take_rows` (the first n
examples), `pool` (several sites as one, for centralized training), `gather` (rows at a
batch plan's indices, padded to a common length), `validation_chunks` (the server
validation set, cut into chunks of `run.val_chunk` rows) and `bucket_size`, the one
power-of-two rule for every shape that is bucketed to bound recompilation (training
sequence lengths, decoding prompt lengths, the rows of a last decoding batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

LOSS_MODES = ("full", "completion")
PAD_ROW = -1  # a batch plan's index of a padding row (no example)


@dataclasses.dataclass
class SiteArrays:
  """One split of one site, padded to a bucketed length.

  tokens / attention_mask / loss_mask: [N, L]; loss_mask[i, t] = 1 where token t is a
  supervised target (see fedjax_lora.losses.causal_lm_loss).
  """
  tokens: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray
  prompt_lengths: np.ndarray  # tokens before the target (incl. <s>), for generation
  truncated: int
  without_targets: int = 0    # rows with no supervised token (completion loss, long prompt)

  @property
  def token_count(self) -> int:
    return int(self.loss_mask[:, 1:].sum())

  def __len__(self) -> int:
    return int(self.tokens.shape[0])


def bucket_size(n: int, minimum: int = 16, cap: int | None = None) -> int:
  """Next power of two >= n, at least `minimum` and at most `cap`, so few shapes get compiled."""
  size = max(minimum, 1 << max(0, int(n - 1).bit_length()))
  return size if cap is None else min(cap, size)


def to_arrays(encoded, pad_id: int, max_length: int, loss: str = "full",
              length: int | None = None) -> SiteArrays:
  """Pads one encoded split to [N, L]; L is bucketed unless `length` fixes it (e.g. across
  sites). The loss covers the whole sequence ("full", the paper's released code) or only
  the target ("completion")."""
  if loss not in LOSS_MODES:
    raise ValueError(f"loss must be one of {LOSS_MODES}, got {loss!r}")
  ids = encoded["input_ids"]
  prompt_lengths = np.asarray(encoded["prompt_length"], np.int32).reshape(-1)
  longest = max((len(s) for s in ids), default=1)
  length = length or bucket_size(longest, cap=max_length)
  if longest > length:
    raise ValueError(f"sequence of {longest} tokens does not fit length {length}")
  n = len(ids)
  tokens = np.full((n, length), pad_id, np.int32)
  attention = np.zeros((n, length), bool)
  for i, s in enumerate(ids):
    tokens[i, :len(s)] = s
    attention[i, :len(s)] = True
  loss_mask = attention.copy()
  if loss == "completion":
    loss_mask &= np.arange(length)[None, :] >= prompt_lengths[:, None]
  without = int((loss_mask[:, 1:].sum(axis=1) == 0).sum())
  return SiteArrays(tokens, attention, loss_mask.astype(np.float32), prompt_lengths,
                    int(sum(encoded["truncated"])), without)


def common_length(arrays: Sequence[SiteArrays]) -> int:
  """The sequence length every one of `arrays` fits (the longest of their lengths)."""
  return max(a.tokens.shape[1] for a in arrays)


def take_rows(arrays: SiteArrays, n: int) -> SiteArrays:
  """The first n examples (training splits are already shuffled when built)."""
  return dataclasses.replace(arrays, tokens=arrays.tokens[:n],
                             attention_mask=arrays.attention_mask[:n],
                             loss_mask=arrays.loss_mask[:n],
                             prompt_lengths=arrays.prompt_lengths[:n],
                             truncated=0, without_targets=0)  # not tracked per row


def pool(arrays: Sequence[SiteArrays]) -> SiteArrays:
  """All rows of several sites, padded to the longest length (centralized training)."""
  length = common_length(arrays)

  def pad(x, fill=0):
    return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=fill)
  return SiteArrays(np.concatenate([pad(a.tokens) for a in arrays]),
                    np.concatenate([pad(a.attention_mask) for a in arrays]),
                    np.concatenate([pad(a.loss_mask) for a in arrays]),
                    np.concatenate([a.prompt_lengths for a in arrays]),
                    sum(a.truncated for a in arrays), sum(a.without_targets for a in arrays))


def gather(arrays: SiteArrays, index: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """Rows of a site's arrays at `index` (any shape), padded/cut to `length` tokens.

  Padding rows (`PAD_ROW`) attend to their first position only (an all-masked row would
  give NaN attention) and carry no loss.
  """
  flat = index.reshape(-1)
  real = flat != PAD_ROW
  take = np.where(real, flat, 0)
  L = arrays.tokens.shape[1]
  if length < L:
    raise ValueError(f"sequence length {length} shorter than the site's arrays ({L})")
  out = {}
  for name, src, fill in (("tokens", arrays.tokens, 0),
                          ("attention_mask", arrays.attention_mask, False),
                          ("loss_mask", arrays.loss_mask, 0.0)):
    rows = np.full((flat.size, length), fill, src.dtype)
    rows[:, :L] = src[take]
    rows[~real] = fill
    out[name] = rows.reshape(index.shape + (length,))
  out["attention_mask"].reshape(-1, length)[~real, 0] = True
  return out


def validation_chunks(devs: Sequence[SiteArrays], per_site: int, chunk: int,
                      length: int) -> dict[str, np.ndarray]:
  """The first `per_site` rows of every dev split, stacked and chunked [C, chunk, length].

  The last chunk is filled with padding rows (first position attended, no loss)."""
  rows = [gather(dev, np.arange(min(per_site, len(dev))), length) for dev in devs]
  stacked = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  total = stacked["tokens"].shape[0]
  chunks = math.ceil(total / chunk)
  pad = chunks * chunk - total
  out = {}
  for k, v in stacked.items():
    fill = np.zeros((pad,) + v.shape[1:], v.dtype)
    if k == "attention_mask":
      fill[:, 0] = True
    out[k] = np.concatenate([v, fill]).reshape((chunks, chunk) + v.shape[1:])
  return out
