"""Federated algorithms by name: which aggregator, and what changes on the client side.

An algorithm is data: the server aggregator (fedjax_lora.aggregators) plus the client
behaviour it needs (frozen factors, proximal term, control variates, a private local
adapter, factors that never leave the site, per-site ranks, a base merge).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Algorithm:
  aggregator: str
  train_factors: tuple[str, ...] = ("a", "b")
  prox: bool = False             # FedProx: client adds mu (w - w_global) to the gradient
  scaffold: bool = False         # control variates; uplink counted twice
  local_adapter: bool = False    # dual_lora: a second adapter that never leaves the site
  personal_factors: tuple[str, ...] = ()  # fedsa_lora: factors kept per site ("b",)
  hetero_ranks: bool = False     # per-site ranks padded to the largest (rank masks)
  merge_base: bool = False       # flora: aggregated products are merged into the base
  needs_validation: bool = False # fedmedlora_plus: server validation loss per client


ALGORITHMS = {
    "fedavg": Algorithm("fedavg"),
    "fedmedlora_plus": Algorithm("fedmedlora_plus", needs_validation=True),
    "fedprox": Algorithm("fedprox", prox=True),
    "fedavgm": Algorithm("fedavgm"),
    "fedadam": Algorithm("fedadam"),
    "fedyogi": Algorithm("fedyogi"),
    "fedadagrad": Algorithm("fedadagrad"),
    "scaffold": Algorithm("scaffold", scaffold=True),
    "ffa_lora": Algorithm("ffa_lora", train_factors=("b",)),
    "fedsa_lora": Algorithm("fedsa_lora", personal_factors=("b",)),
    "dual_lora": Algorithm("dual_lora", local_adapter=True),
    "flora": Algorithm("flora", hetero_ranks=True, merge_base=True),
    "flexlora": Algorithm("flexlora", hetero_ranks=True),
    "hetlora": Algorithm("hetlora", hetero_ranks=True),
    "median": Algorithm("median"),
    "trimmed_mean": Algorithm("trimmed_mean"),
    "norm_clip": Algorithm("norm_clip"),
    "dp_fedavg": Algorithm("dp_fedavg"),  # client-level DP (config.privacy.client_*)
}


def select_factors(params: dict, factors) -> dict:
  """{target: {factor: ...}} restricted to `factors` (e.g. the B that fedsa_lora keeps local)."""
  return {t: {f: ab[f] for f in factors if f in ab} for t, ab in params.items()}


def overlay_factors(params: dict, override: dict) -> dict:
  """`params` with the factors present in `override` replaced (a site's own B on the global)."""
  return {t: {f: override[t].get(f, ab[f]) for f in ab} for t, ab in params.items()}


def get_algorithm(name: str) -> Algorithm:
  if name not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}")
  return ALGORITHMS[name]
