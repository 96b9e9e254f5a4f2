"""Partitioners: which documents go to which simulated site. Pure, seeded, disjoint, covering.

Each returns a list (one per site) of sorted document indices. Label skew follows the
usual Dirichlet recipe (Hsu et al. 2019, arXiv 1909.06335): for every label, the share of
its documents each site receives is drawn from Dir(alpha); small alpha gives each site a
few dominant labels, large alpha approaches IID.
"""

from __future__ import annotations

import collections
from typing import Hashable, Sequence

import numpy as np

PARTITIONERS = ("natural", "iid", "dirichlet", "quantity")


def _check(num_items: int, num_sites: int):
  if num_sites < 1:
    raise ValueError(f"num_sites must be >= 1, got {num_sites}")
  if num_items < num_sites:
    raise ValueError(f"cannot split {num_items} documents over {num_sites} sites")


def natural(groups: Sequence[Hashable]) -> tuple[list[list[int]], list[Hashable]]:
  """One site per distinct group (e.g. source corpus), in first-seen order."""
  order = list(dict.fromkeys(groups))
  sites = [[] for _ in order]
  index = {g: i for i, g in enumerate(order)}
  for i, g in enumerate(groups):
    sites[index[g]].append(i)
  return sites, order


def iid(num_items: int, num_sites: int, seed: int) -> list[list[int]]:
  """A random permutation cut into near-equal parts."""
  _check(num_items, num_sites)
  perm = np.random.default_rng(seed).permutation(num_items)
  return [sorted(p.tolist()) for p in np.array_split(perm, num_sites)]


def quantity(num_items: int, num_sites: int, alpha: float, seed: int,
             min_size: int = 1) -> list[list[int]]:
  """Random assignment with site sizes proportional to a Dir(alpha) draw (size skew only)."""
  _check(num_items, num_sites * min_size)
  rng = np.random.default_rng(seed)
  shares = rng.dirichlet(np.full(num_sites, alpha))
  extra = num_items - num_sites * min_size
  sizes = np.floor(shares * extra).astype(int) + min_size
  for i in np.argsort(-shares)[: num_items - sizes.sum()]:  # hand out the rounding remainder
    sizes[i] += 1
  perm = rng.permutation(num_items)
  bounds = np.cumsum(sizes)[:-1]
  return [sorted(p.tolist()) for p in np.split(perm, bounds)]


def dirichlet(labels: Sequence[Hashable], num_sites: int, alpha: float, seed: int,
              min_size: int = 1, max_tries: int = 100) -> list[list[int]]:
  """Label-skewed split of documents by their (dominant) label.

  Redraws until every site holds at least `min_size` documents (as is common practice);
  raises if that is impossible within `max_tries`.
  """
  _check(len(labels), num_sites * min_size)
  if alpha <= 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  by_label = collections.defaultdict(list)
  for i, lab in enumerate(labels):
    by_label[lab].append(i)
  keys = sorted(by_label, key=str)
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    sites = [[] for _ in range(num_sites)]
    for lab in keys:
      idx = rng.permutation(by_label[lab])
      shares = rng.dirichlet(np.full(num_sites, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for s, part in enumerate(np.split(idx, cuts)):
        sites[s].extend(part.tolist())
    if min(len(s) for s in sites) >= min_size:
      return [sorted(s) for s in sites]
  raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every one of {num_sites} sites "
                   f">= {min_size} documents in {max_tries} tries; raise alpha or lower min_size")


def label_divergence(labels: Sequence[Hashable], sites: Sequence[Sequence[int]]) -> float:
  """Mean total-variation distance between each site's label distribution and the pool's."""
  keys = sorted(set(labels), key=str)
  pos = {k: i for i, k in enumerate(keys)}

  def dist(idx):
    v = np.zeros(len(keys))
    for i in idx:
      v[pos[labels[i]]] += 1
    return v / max(v.sum(), 1)

  pool = dist(range(len(labels)))
  return float(np.mean([0.5 * np.abs(dist(s) - pool).sum() for s in sites if len(s)]))


def dominant_label(types: Sequence[str]) -> str:
  """A document's label for skewing: its most frequent entity type ("none" if it has none)."""
  if not types:
    return "none"
  counts = collections.Counter(types)
  return min(counts, key=lambda t: (-counts[t], t))
