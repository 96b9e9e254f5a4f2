"""Server-side aggregators as pure (init, apply) pairs, built by their factories.

    agg = fedadam(server_lr=0.1)   # or algorithms.get_aggregator("fedadam", server_lr=0.1)
    state = agg.init(global_params)
    new_global, state, metrics = jax.jit(agg.apply)(
        global_params, client_params, weights, present, state, extras)

client_params carry a leading client axis K; weights [K] sum to 1 over present clients;
present [K] bool; extras holds optional arrays ("control_delta", "rank_mask", "num_clients").
Options are Python constants fixed at construction, so apply jits without static args.
"""

from __future__ import annotations

from fedjax_lora.aggregators.base import Aggregator, factor_error
from fedjax_lora.aggregators.dp_fedavg import dp_fedavg
from fedjax_lora.aggregators.fedavg import fedavg, validation_weights
from fedjax_lora.aggregators.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_lora.aggregators.hetero import flexlora, flora, flora_stack, hetlora
from fedjax_lora.aggregators.robust import median, norm_clip, trimmed_mean
from fedjax_lora.aggregators.scaffold import scaffold


__all__ = ["Aggregator", "dp_fedavg", "factor_error", "fedadagrad", "fedadam", "fedavg",
           "fedavgm", "fedyogi", "flexlora", "flora", "flora_stack", "hetlora", "median",
           "norm_clip", "scaffold", "trimmed_mean", "validation_weights"]
