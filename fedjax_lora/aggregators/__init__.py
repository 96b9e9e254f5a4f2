"""Server-side aggregators as pure (init, apply) pairs, looked up by name.

    agg = get_aggregator("fedadam", server_lr=0.1)
    state = agg.init(global_params)
    new_global, state, metrics = jax.jit(agg.apply)(
        global_params, client_params, weights, present, state, extras)

client_params carry a leading client axis K; weights [K] sum to 1 over present clients;
present [K] bool; extras holds optional arrays ("control_delta", "rank_mask", "num_clients").
Options are Python constants fixed at construction, so apply jits without static args.
"""

from __future__ import annotations

import inspect
from typing import Callable

from fedjax_lora.aggregators.base import Aggregator, factor_error
from fedjax_lora.aggregators.dp_fedavg import dp_fedavg
from fedjax_lora.aggregators.fedavg import fedavg, validation_weights
from fedjax_lora.aggregators.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_lora.aggregators.hetero import flexlora, flora, flora_stack, hetlora
from fedjax_lora.aggregators.robust import median, norm_clip, trimmed_mean
from fedjax_lora.aggregators.scaffold import scaffold


def _fedavg_variant(name: str, parts: tuple[str, ...] = ("a", "b")) -> Callable[[], Aggregator]:
  def make() -> Aggregator:
    return fedavg(parts=parts, name=name)
  return make


def _fedavg(parts=("a", "b")) -> Aggregator:
  return fedavg(parts=parts)


REGISTRY: dict[str, Callable[..., Aggregator]] = {
    "fedavg": _fedavg,
    "fedmedlora": _fedavg_variant("fedmedlora"),
    "fedmedlora_plus": _fedavg_variant("fedmedlora_plus"),  # weights from validation_weights
    "fedprox": _fedavg_variant("fedprox"),                  # proximal term is client-side
    "dual_lora": _fedavg_variant("dual_lora"),              # local adapter never leaves the site
    "ffa_lora": _fedavg_variant("ffa_lora", ("b",)),        # A frozen and shared: send B only
    "fedsa_lora": _fedavg_variant("fedsa_lora", ("a",)),    # B stays at the site: send A only
    "fedavgm": fedavgm,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedadagrad": fedadagrad,
    "scaffold": scaffold,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "norm_clip": norm_clip,
    "dp_fedavg": dp_fedavg,                                 # client-level DP (McMahan 2018)
    "hetlora": hetlora,
    "flexlora": flexlora,
    "flora": flora,
}


def option_names(name: str) -> tuple[str, ...]:
  """The keyword options aggregator `name` accepts."""
  return tuple(inspect.signature(_factory(name)).parameters)


def _factory(name: str) -> Callable[..., Aggregator]:
  if name not in REGISTRY:
    raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name]


def get_aggregator(name: str, **options) -> Aggregator:
  """The aggregator `name` with its options; ValueError on an unknown name or option."""
  factory = _factory(name)
  allowed = option_names(name)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"aggregator {name!r} has no option(s) {', '.join(unknown)}; it takes "
                     f"{', '.join(allowed) if allowed else 'no options'}")
  return factory(**options)


__all__ = ["Aggregator", "REGISTRY", "factor_error", "flora_stack", "get_aggregator",
           "option_names", "validation_weights"]
