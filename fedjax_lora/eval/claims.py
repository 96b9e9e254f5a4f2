"""The papers' claims as paired comparisons of an evaluation run, each with a verdict.

A claim holds one or more comparisons; a comparison is a statistic over per-(setting,
site) F1 (`Table`), e.g. the mean over the training sites of federated minus zero-shot F1.
Its 95% interval comes from the paired document bootstrap of `eval/bootstrap.py`, and its
verdict from where the interval lies (`verdict`):

- `supported`: the interval lies above −margin (for a two-sided claim: excludes 0);
- `contradicted`: the interval lies below −margin;
- `inconclusive`: it crosses −margin (for margin 0: crosses zero).

A margin is used only for "comes close to" claims (non-inferiority within `margin` F1
points); "better than" and "at least as good as" claims use margin 0, so an equal score is
inconclusive, never supported. Claims whose settings were not run are reported as such.
Sources of the quoted figures: Fed-MedLoRA (Li et al., arXiv 2601.22124), the blockchain
federated-LoRA paper (quoted in ../shared/docs/method.md), Med-DualLoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from fedjax_lora.eval import bootstrap

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_RUN = ("supported", "contradicted", "inconclusive",
                                                  "not run")


class Missing(KeyError):
  """A statistic needs a (setting, site) score the run does not have."""


class Table:
  """(setting, site) -> F1 replicates [B + 1] for one kind (strict or lenient), computed
  lazily from a run's per-example counts with one shared `Resampler`."""

  def __init__(self, settings: Mapping[str, Mapping], resampler: bootstrap.Resampler,
               kind: str, task: str = "ner"):
    self.settings, self.resampler, self.kind, self.task = settings, resampler, kind, task
    self._cache: dict[tuple[str, str], np.ndarray] = {}

  def has(self, setting: str, site: str) -> bool:
    r = self.settings.get(setting, {}).get("sites", {}).get(site, {}).get(self.task)
    return bool(r and "per_example" in r)

  def __call__(self, setting: str, site: str) -> np.ndarray:
    key = (setting, site)
    if key not in self._cache:
      if not self.has(setting, site):
        raise Missing(f"{setting} on {site}")
      counts = self.settings[setting]["sites"][site][self.task]["per_example"][self.kind]
      self._cache[key] = self.resampler.site_f1(site, np.asarray(counts).reshape(-1, 3))
    return self._cache[key]

  def mean(self, setting: str, sites: Sequence[str]) -> np.ndarray:
    """Macro F1: the mean over `sites` (each hospital counts once)."""
    return _mean([self(setting, s) for s in sites], f"{setting} on no sites")


def _mean(values: list, what: str) -> np.ndarray:
  """Elementwise mean of replicate arrays; a comparison over nothing is not run."""
  if not values:
    raise Missing(what)
  return np.mean(values, axis=0)


Statistic = Callable[[Table], np.ndarray]  # F1 points x 100 not applied: fractions


@dataclasses.dataclass(frozen=True)
class Comparison:
  name: str                      # what is compared, in words
  statistic: Statistic           # replicates of (claimed better) − (reference), in F1 units
  margin: float = 0.0            # non-inferiority margin in F1 units (0.05 = 5 points)
  two_sided: bool = False        # "differs" rather than "is better"


@dataclasses.dataclass(frozen=True)
class Claim:
  id: str
  text: str
  paper: str                     # the figure the paper reports, quoted
  comparisons: tuple[Comparison, ...]


def verdict(lo: float, hi: float, margin: float = 0.0, two_sided: bool = False) -> str:
  """Where the interval [lo, hi] of (claimed − reference) lies (module docstring)."""
  if two_sided:
    return SUPPORTED if lo > 0 or hi < 0 else INCONCLUSIVE
  if lo > -margin:
    return SUPPORTED
  if hi < -margin:
    return CONTRADICTED
  return INCONCLUSIVE


def evaluate(claims: Sequence[Claim], settings: Mapping[str, Mapping],
             resampler: bootstrap.Resampler, kinds: Sequence[str] = bootstrap.KINDS,
             task: str = "ner") -> list[dict]:
  """One row per comparison: interval per kind (F1 points) and the verdict on the first."""
  tables = {k: Table(settings, resampler, k, task) for k in kinds}
  rows = []
  for claim in claims:
    for comp in claim.comparisons:
      row = {"claim": claim.id, "text": claim.text, "paper": claim.paper,
             "comparison": comp.name, "margin_points": 100 * comp.margin,
             "two_sided": comp.two_sided}
      try:
        for kind in kinds:
          ci = bootstrap.interval(comp.statistic(tables[kind]))
          row[kind] = {k: 100 * v for k, v in ci.items()}
      except Missing as e:
        row["verdict"], row["missing"] = NOT_RUN, str(e).strip("'\"")
      else:
        first = row[kinds[0]]
        row["verdict"] = verdict(first["lo"] / 100, first["hi"] / 100, comp.margin,
                                 comp.two_sided)
      rows.append(row)
  return rows


# ---- the claims of issue 16 ----------------------------------------------------------------

def _diff(a: Statistic, b: Statistic) -> Statistic:
  return lambda t: a(t) - b(t)


def paper_claims(train: Sequence[str], external: Sequence[str], new_sites: Sequence[str],
                 fed: str = "federated/fedavg", plus: str = "federated/fedmedlora_plus",
                 dual: str = "federated/dual_lora", adapt_k: Sequence[str] = (),
                 val_sizes: Sequence[int] = (), close_margin: float = 0.05) -> list[Claim]:
  """The claims of the Fed-MedLoRA, blockchain federated-LoRA and Med-DualLoRA papers as
  comparisons over this run's sites (see the issue "Evidence" for their wording)."""
  train, held_out = list(train), list(external) + list(new_sites)
  single = lambda s: f"single_site/{s}"
  fed_in = lambda t: t.mean(fed, train)

  def single_in(t):     # each site's own model on its own test split
    return _mean([t(single(s), s) for s in train], "no training sites")

  def single_held_out(t):   # every single-site model on every held-out site
    return _mean([t.mean(single(s), held_out) for s in train], "no training sites")

  def worst(values):
    if not values:
      raise Missing("no sites")
    return np.min(np.stack(values), axis=0)

  def single_other(t):  # each single-site model on the other training sites
    return _mean([t(single(i), j) for i in train for j in train if j != i],
                 "one training site: no other sites")

  claims = [
      Claim("1", "Federated LoRA (Fed-MedLoRA, token-weighted FedAvg) improves strongly on "
            "zero-shot", "up to +65% F1 (Fed-MedLoRA)",
            (Comparison("FedAvg − zero-shot, mean F1 over training sites",
                        _diff(fed_in, lambda t: t.mean("zero_shot", train))),)),
      Claim("2", "Federated beats single-site training, in-domain and on external sites",
            "about +25% (Fed-MedLoRA)",
            (Comparison("FedAvg − each site's own model, in-domain (mean over sites)",
                        _diff(fed_in, single_in)),
             Comparison("FedAvg − single-site models, held-out sites (mean over models "
                        "and sites)", _diff(lambda t: t.mean(fed, held_out), single_held_out)))),
      Claim("3", "Fed-MedLoRA+ is at least as good as Fed-MedLoRA under heterogeneity, and "
            "better with a noisy site", "Fed-MedLoRA+ ≥ Fed-MedLoRA (Fed-MedLoRA)",
            (Comparison("Fed-MedLoRA+ − FedAvg, natural sites",
                        _diff(lambda t: t.mean(plus, train), fed_in)),
             Comparison("Fed-MedLoRA+ − FedAvg, one label-flipping site",
                        _diff(lambda t: t.mean("faulty/fedmedlora_plus", train),
                              lambda t: t.mean("faulty/fedavg", train))))),
      Claim("4", "Federated comes close to centralized (pooled data)",
            f"close to centralized (Fed-MedLoRA); here: within {100 * close_margin:.0f} F1 "
            "points", (Comparison("FedAvg − centralized, mean over training sites",
                                  _diff(fed_in, lambda t: t.mean("centralized", train)),
                                  margin=close_margin),)),
      Claim("5", "A new low-resource site adapts better from the federated adapter than from "
            "scratch", "federated start > local-only (Fed-MedLoRA, YNHH case study)",
            tuple(Comparison(f"from federated − from scratch, k={k}, new site",
                             _diff(lambda t, k=k: t.mean(f"new_site/from_federated/k={k}",
                                                         new_sites),
                                   lambda t, k=k: t.mean(f"new_site/from_scratch/k={k}",
                                                         new_sites)))
                  for k in adapt_k)),
      Claim("6", "Federation raises the worst site's F1 and cross-site generalization",
            "worst client +41.2%, generalization +23.6% (blockchain federated LoRA)",
            (Comparison("worst training site: FedAvg − single-site models",
                        _diff(lambda t: worst([t(fed, s) for s in train]),
                              lambda t: worst([t(single(s), s) for s in train]))),
             Comparison("each training site: FedAvg − the other sites' single-site models "
                        "(mean over model × other site)",
                        _diff(lambda t: _mean([t(fed, j) for i in train for j in train
                                               if j != i], "one training site"),
                              single_other)))),
      Claim("7", "Med-DualLoRA (global + private local adapter) gives each site at least "
            "FedAvg's in-domain F1", "personalization ≥ FedAvg in-domain (Med-DualLoRA)",
            (Comparison("Med-DualLoRA (site's own model) − FedAvg, in-domain",
                        _diff(lambda t: t.mean(dual, train), fed_in)),
             Comparison("Med-DualLoRA − FedAvg, worst training site",
                        _diff(lambda t: worst([t(dual, s) for s in train]),
                              lambda t: worst([t(fed, s) for s in train]))))),
  ]
  if len(val_sizes) >= 2:
    lo, hi = min(val_sizes), max(val_sizes)
    claims.append(Claim(
        "8", "Fed-MedLoRA+ is sensitive to the size of the server validation set",
        "open question in the paper summary (\"next checks\")",
        (Comparison(f"validation set {hi} − {lo} records per site (with the noisy site)",
                    _diff(lambda t: t.mean(f"val_size/{hi}", train),
                          lambda t: t.mean(f"val_size/{lo}", train)), two_sided=True),)))
  return claims
