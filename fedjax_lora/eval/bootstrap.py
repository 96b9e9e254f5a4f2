"""Paired bootstrap confidence intervals for F1 comparisons over test examples.

Every setting of an evaluation run is scored on the same test examples of a site, so a
comparison between two settings is paired: one bootstrap replicate draws one resample of
a site's test documents and recomputes every setting's F1 on that same resample. A
statistic (a difference of site F1s, of means over sites, of worst sites) is then a
function of these per-(setting, site) replicate arrays, and its 95% interval is the
2.5th..97.5th percentile of its replicates (the percentile bootstrap; Efron & Tibshirani
1993, ch. 13). Resampling is by document: the sentences of one note are not independent,
so a document's examples are drawn together (with one example per document this is the
plain example bootstrap). Replicate 0 is always the observed value on the full test set.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import numpy as np

KINDS = ("strict", "lenient")
DEFAULT_REPLICATES = 2000


def f1(tp, n_pred, n_gold) -> np.ndarray:
  """Micro F1 = 2 tp / (n_pred + n_gold), 0 where nothing was predicted or gold (elementwise)."""
  tp, denom = np.asarray(tp, np.float64), np.asarray(n_pred, np.float64) + n_gold
  return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def _seed(seed: int, site: str) -> int:
  return int(hashlib.sha256(f"{seed}:{site}".encode()).hexdigest()[:12], 16)


@dataclasses.dataclass
class Resampler:
  """Seeded document resamples per site, shared by every setting scored on that site.

  `groups[site]` holds each test example's document id, in the order the examples were
  scored. `replicates` resamples of the site's documents are drawn once (seeded by `seed`
  and the site's name, so adding a site changes no other site's draws).
  """
  groups: Mapping[str, Sequence[str]]
  replicates: int = DEFAULT_REPLICATES
  seed: int = 0

  def __post_init__(self):
    if self.replicates < 1:
      raise ValueError(f"replicates must be >= 1, got {self.replicates}")
    self._member: dict[str, np.ndarray] = {}
    self._draws: dict[str, np.ndarray] = {}
    for site, ids in self.groups.items():
      _, member = np.unique(np.asarray(list(ids), dtype=object).astype(str), return_inverse=True)
      self._member[site] = member.reshape(-1)
      n_docs = int(member.max()) + 1 if len(member) else 0
      rng = np.random.default_rng(_seed(self.seed, site))
      draws = rng.integers(0, n_docs, size=(self.replicates, n_docs)) if n_docs else \
          np.zeros((self.replicates, 0), np.int64)
      # Row 0 is the observed test set: every document once.
      self._draws[site] = np.concatenate([np.arange(n_docs)[None], draws])

  def site_f1(self, site: str, counts: np.ndarray) -> np.ndarray:
    """[replicates + 1] F1 of one setting on `site`; `counts` is [n_examples, 3] (tp, n_pred,
    n_gold) per example, in the order of `groups[site]`."""
    counts = np.asarray(counts, np.int64).reshape(-1, 3)
    member = self._member[site]
    if len(counts) != len(member):
      raise ValueError(f"site {site}: {len(counts)} scored examples but {len(member)} in the "
                       "resampler; settings must be scored on the same test examples")
    per_doc = np.zeros((int(member.max()) + 1 if len(member) else 0, 3), np.int64)
    np.add.at(per_doc, member, counts)
    drawn = per_doc[self._draws[site]].sum(axis=1)  # [replicates + 1, 3]
    return f1(drawn[:, 0], drawn[:, 1], drawn[:, 2])


def interval(replicates: np.ndarray, level: float = 0.95) -> dict[str, float]:
  """{"value": observed (replicate 0), "lo", "hi"}: the percentile interval of the rest."""
  replicates = np.asarray(replicates, np.float64)
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(replicates[1:], [tail, 100 - tail])
  return {"value": float(replicates[0]), "lo": float(lo), "hi": float(hi)}
