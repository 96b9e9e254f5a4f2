"""Every federated algorithm, one record each: read an algorithm's whole definition here.

A record says what the server does (its aggregator factory, whose keyword parameters are
the `config.aggregator` fields it takes), what travels (`sends`), what the sites do
differently (which factors train, a proximal term, control variates, a private local
adapter, per-site ranks, a merge into the base), what each site keeps between rounds, and
why a secure-aggregation server cannot serve it.

To add an algorithm, add one record to ALGORITHMS (and, for a new server rule, its
aggregator in fedjax_lora/aggregators); tests/test_algorithms.py checks every record
against its aggregator.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from fedjax_lora import aggregators as agg
from fedjax_lora.aggregators import Aggregator
from fedjax_lora.client import ClientConfig

FACTORS = ("a", "b")
# Aggregator combines a secure-aggregation server can serve: it learns only the mean.
MEAN_COMBINES = ("mean", "mean_then_step")


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One federated algorithm.

  name: the config.algorithm value (also the aggregator's name in metrics and the ledger).
  aggregator: factory of the server rule; its keyword parameters are its options.
  sends: the LoRA factors a site uploads; the aggregator must take exactly these.
  train_factors: the factors a site trains; those trained but not sent stay at the site.
  individual: why the server needs each upload on its own ("" when a weighted mean of the
    uploads is all it needs; the validation weighting's reason is derived).
  """
  name: str
  aggregator: Callable[..., Aggregator]
  sends: tuple[str, ...] = FACTORS
  train_factors: tuple[str, ...] = FACTORS
  prox: bool = False             # FedProx: the client adds mu (w - w_global) to the gradient
  scaffold: bool = False         # control variates: uploaded beside the model (uplink x2)
  local_adapter: bool = False    # dual_lora: a second adapter that never leaves the site
  hetero_ranks: bool = False     # per-site ranks padded to the largest (rank masks)
  merge_base: bool = False       # flora: the aggregated products are merged into the base
  needs_validation: bool = False # fedmedlora_plus: server validation loss per client
  client_dp: bool = False        # dp_fedavg: config.privacy.client_* configure the aggregator
  individual: str = ""

  @property
  def personal_factors(self) -> tuple[str, ...]:
    """Factors a site trains and never sends (fedsa_lora's B): kept per site."""
    return tuple(f for f in self.train_factors if f not in self.sends)

  @property
  def site_state(self) -> tuple[str, ...]:
    """What each site keeps between rounds besides its data (the simulator's state["sites"]
    keys): its own factors, its local adapter, its control variate."""
    return (("personal",) * bool(self.personal_factors) + ("local",) * self.local_adapter
            + ("control",) * self.scaffold)

  def option_names(self) -> tuple[str, ...]:
    """The keyword options the aggregator factory takes."""
    return tuple(inspect.signature(self.aggregator).parameters)

  def make_aggregator(self, **options) -> Aggregator:
    """The server rule with `options`; ValueError names an option the factory lacks."""
    allowed = self.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
      raise ValueError(f"aggregator {self.name!r} has no option(s) {', '.join(unknown)}; it "
                       f"takes {', '.join(allowed) if allowed else 'no options'}")
    return self.aggregator(**options)

  def client_config(self, prox_mu: float = 0.0, **settings) -> ClientConfig:
    """The site's training settings with this algorithm's behaviour in them (which factors
    train, the proximal term, control variates); `settings` are the other ClientConfig
    fields (learning rate, schedule, DP-SGD)."""
    return ClientConfig(train_factors=self.train_factors, scaffold=self.scaffold,
                        prox_mu=prox_mu if self.prox else 0.0, **settings)

  def secagg_obstacle(self) -> str:
    """Why secure aggregation cannot serve this algorithm ("" when it can: the server needs
    nothing but the weighted mean of the uploads, by its aggregator's `combine`)."""
    if self.needs_validation:
      return "it scores every site's adapter on the server validation set"
    combine = self.make_aggregator().combine
    return "" if combine in MEAN_COMBINES else (self.individual or "it needs individual updates")


def _mean(name: str, parts: tuple[str, ...] = FACTORS) -> Callable[[], Aggregator]:
  """A token-weighted mean of `parts` under the algorithm's own name (no options)."""
  def make() -> Aggregator:
    return agg.fedavg(parts=parts, name=name)
  return make


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    # Fed-MedLoRA: sites weighted by their training tokens.
    Algorithm("fedavg", _mean("fedavg")),
    # Fed-MedLoRA+: weights p_k ∝ n_k^gamma exp(-L_k / T) from each adapter's loss on the
    # server validation set (config.aggregator.gamma, temperature).
    Algorithm("fedmedlora_plus", _mean("fedmedlora_plus"), needs_validation=True),
    Algorithm("fedprox", _mean("fedprox"), prox=True),
    Algorithm("fedavgm", agg.fedavgm),
    Algorithm("fedadam", agg.fedadam),
    Algorithm("fedyogi", agg.fedyogi),
    Algorithm("fedadagrad", agg.fedadagrad),
    Algorithm("scaffold", agg.scaffold, scaffold=True,
              individual="it also aggregates individual control variates"),
    # FFA-LoRA: A stays at its shared random init; only B trains and travels.
    Algorithm("ffa_lora", _mean("ffa_lora", ("b",)), sends=("b",), train_factors=("b",)),
    # FedSA-LoRA: A is shared, B stays at the site.
    Algorithm("fedsa_lora", _mean("fedsa_lora", ("a",)), sends=("a",)),
    # Med-DualLoRA: the global adapter is averaged; a private local one never leaves.
    Algorithm("dual_lora", _mean("dual_lora"), local_adapter=True),
    Algorithm("flora", agg.flora, hetero_ranks=True, merge_base=True,
              individual="it stacks individual factors"),
    Algorithm("flexlora", agg.flexlora, hetero_ranks=True,
              individual="it needs individual products"),
    Algorithm("hetlora", agg.hetlora, hetero_ranks=True,
              individual="it weights sites by their own product norms"),
    Algorithm("median", agg.median,
              individual="it takes coordinate-wise order statistics of individual updates"),
    Algorithm("trimmed_mean", agg.trimmed_mean,
              individual="it sorts individual updates per coordinate"),
    Algorithm("norm_clip", agg.norm_clip, individual="it needs each update's norm"),
    # Client-level DP-FedAvg (McMahan et al. 2018): clip, noise from config.privacy.client_*.
    Algorithm("dp_fedavg", agg.dp_fedavg, client_dp=True,
              individual="it clips each update on the server"),
)}


def get_algorithm(name: str) -> Algorithm:
  if name not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}")
  return ALGORITHMS[name]


def get_aggregator(name: str, **options) -> Aggregator:
  """Algorithm `name`'s server rule with `options`; ValueError on an unknown name or option."""
  return get_algorithm(name).make_aggregator(**options)


def select_factors(params: dict, factors) -> dict:
  """{target: {factor: ...}} restricted to `factors` (e.g. the B that fedsa_lora keeps local)."""
  return {t: {f: ab[f] for f in factors if f in ab} for t, ab in params.items()}


def overlay_factors(params: dict, override: dict) -> dict:
  """`params` with the factors present in `override` replaced (a site's own B on the global)."""
  return {t: {f: override[t].get(f, ab[f]) for f in ab} for t, ab in params.items()}
