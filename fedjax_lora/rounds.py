"""One federated round as one compiled program: local training of every sampled client,
server-side validation, aggregation and the update of per-site state.

Clients run under `jax.vmap` over a leading client axis with the frozen base broadcast
(`mode="vmap"`), one after another under `lax.map` when only one client fits in memory
(`mode="sequential"`), or `chunk` at a time: vmapped within a chunk, chunks under
`lax.map` (`mode="chunked"`; `fedjax_lora.client_modes` chooses it for `auto`). All trace
the same client function, so their results agree; the client axis can be sharded over a
mesh axis `clients` by placing the inputs (see `fedjax_lora.mesh`).
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp

from fedjax_lora import aggregators as agg_lib
from fedjax_lora import client_modes
from fedjax_lora.aggregators import base as agg_base
from fedjax_lora.algorithms import Algorithm, overlay_factors, select_factors
from fedjax_lora.client import ClientConfig, client_update, optimizer, scaffold_control
from fedjax_lora.faults import apply_upload_faults
from fedjax_lora.losses import causal_lm_loss
from models import llama, lora
from models.lora import LoraAdapter, LoraSpec

MODES = client_modes.RESOLVED


@dataclasses.dataclass(frozen=True)
class RoundSpec:
  """Everything static about a round (hashable: part of the compiled program's identity)."""
  algorithm: Algorithm
  client: ClientConfig
  global_spec: LoraSpec
  local_spec: LoraSpec | None = None
  mode: str = "vmap"
  chunk: int = 0               # clients per chunk (mode="chunked")
  gamma: float = 0.0           # fedmedlora_plus: p_k ∝ n_k^gamma exp(-L_k / T)
  temperature: float = 1.0
  keep_optimizer_state: bool = False


def base_with_delta(base: dict, delta: dict, spec: LoraSpec) -> dict:
  """Adds dense per-target deltas [n, in, out] (times the LoRA scale) into the base kernels."""
  if not delta:
    return base
  layers = dict(base["layers"])
  num_layers = next(iter(layers.values())).shape[0]
  idx = jnp.array(spec.layer_indices(num_layers))
  for target, d in delta.items():
    w = layers[target]
    merged = w[idx].astype(jnp.float32) + spec.scale * d
    layers[target] = w.at[idx].set(merged.astype(w.dtype))
  return {**base, "layers": layers}


def effective_base(spec: RoundSpec, base: dict, server: dict) -> dict:
  """The frozen base the round's models run on: FLoRA's merged updates added in."""
  if not spec.algorithm.merge_base:
    return base
  return base_with_delta(base, server.get("base_delta", {}), spec.global_spec)


def validation_loss(graphdef, base, adapters, val: dict):
  """Mean token cross-entropy over the validation set (chunks of [C, L] under lax.map)."""
  def chunk(batch):
    logits, _ = llama.forward(graphdef, base, adapters, batch["tokens"],
                              attention_mask=batch["attention_mask"])
    mean, count = causal_lm_loss(logits, batch["tokens"], batch["loss_mask"])
    return mean * count, count
  sums, counts = jax.lax.map(chunk, val)
  return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)


def _client_axis(fn, spec: RoundSpec, in_axes):
  """fn over the leading client axis of the `in_axes == 0` arguments, as spec.mode says."""
  if spec.mode == "vmap":
    return jax.vmap(fn, in_axes=in_axes)
  if spec.mode == "chunked":
    per_chunk = jax.vmap(fn, in_axes=in_axes)
  else:
    per_chunk = fn

  def mapped(*args):
    xs = tuple(a for a, ax in zip(args, in_axes) if ax == 0)
    m = jax.tree.leaves(xs)[0].shape[0]
    chunk = client_modes.chunk_size(m, spec.chunk) if spec.mode == "chunked" else 1
    if spec.mode == "chunked":  # [M, ...] -> [M / chunk, chunk, ...]
      xs = jax.tree.map(lambda x: x.reshape((m // chunk, chunk) + x.shape[1:]), xs)

    def one(x):
      it = iter(x)
      return per_chunk(*[next(it) if ax == 0 else a for a, ax in zip(args, in_axes)])
    out = jax.lax.map(one, xs)
    if spec.mode == "chunked":
      out = jax.tree.map(lambda y: y.reshape((m,) + y.shape[2:]), out)
    return out
  return mapped


def _take(tree, idx):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


# ---- site side --------------------------------------------------------------------------------
# A site's part of a round: from the global adapter, the server's broadcast state (SCAFFOLD's
# control), its own state and its batches, train locally and produce what it sends and what
# it keeps. `site_update` is one site in plain form (what a deployed site runs);
# `train_clients` runs its two pieces (`_site_train` over the client axis, then `_controls`
# vmapped) over the round's stacked sites in one program.

def initial_global(spec: RoundSpec, model_config, seed: int) -> dict:
  """The server's round-0 global adapter (PEFT's init from the run's seed)."""
  g_key = jax.random.split(jax.random.key(seed))[0]  # [1] initialises local adapters
  return lora.init_adapter(model_config, spec.global_spec, g_key).params


def initial_site_state(spec: RoundSpec, model_config, global_params, seed: int) -> dict:
  """What one site holds before its first round: its own copy of the factors it keeps
  (from the initial global adapter), its local adapter (the same seeded init at every
  site), a zero control variate and fresh optimizer moments, as the algorithm needs."""
  alg = spec.algorithm
  l_key = jax.random.split(jax.random.key(seed))[1]  # [0] initialises the global adapter
  own = {}
  if alg.personal_factors:
    own["personal"] = select_factors(global_params, alg.personal_factors)
  if alg.local_adapter:
    own["local"] = lora.init_adapter(model_config, spec.local_spec, l_key).params
  if alg.scaffold:
    own["control"] = jax.tree.map(jnp.zeros_like, global_params)
  if spec.keep_optimizer_state:
    trainable = {"global": global_params}
    if alg.local_adapter:
      trainable["local"] = own["local"]
    own["opt"] = optimizer(spec.client).init(trainable)
  return own


def site_state(sites: dict, idx) -> dict:
  """The round's sites' own state (personal factors, local adapter, control, optimizer
  state), taken from the state of all N sites: what each site holds on its own machine."""
  return _take(sites, idx)


def _site_train(spec: RoundSpec, graphdef, base, global_params, server, own: dict, batches,
                step_mask, rng, rank_mask=None):
  """Local training of one site: (trained adapters, optimizer state, metrics)."""
  alg = spec.algorithm
  start = global_params
  if alg.personal_factors:  # fedsa_lora: the site trains with its own B
    start = overlay_factors(global_params, own["personal"])
  trainable, specs = {"global": start}, {"global": spec.global_spec}
  if alg.local_adapter:
    trainable["local"], specs["local"] = own["local"], spec.local_spec
  control = (server["control"], own["control"]) if alg.scaffold else None
  return client_update(graphdef, base, trainable, specs, batches, step_mask, rng, spec.client,
                       anchor=global_params, control=control, rank_mask=rank_mask,
                       opt_state=own.get("opt") if spec.keep_optimizer_state else None)


def _controls(server_control, own_control, global_params, trained_global, lr_sum):
  """SCAFFOLD: the site's new control variate and the change it uploads with its model."""
  new = scaffold_control(server_control, own_control, global_params, trained_global, lr_sum)
  return new, jax.tree.map(jnp.subtract, new, own_control)


def site_update(spec: RoundSpec, graphdef, base, global_params, server, own: dict, batches,
                step_mask, rng, rank_mask=None):
  """One site's local update, unbatched: (out, metrics). out["trained"]["global"] is its
  upload (the server takes the factors the algorithm sends), ["local"] its local adapter;
  out["controls"] / ["control_delta"] its new SCAFFOLD control and the change it uploads;
  out["opt"] its optimizer state (config.keep_optimizer_state)."""
  base = effective_base(spec, base, server)
  trained, new_opt, metrics = _site_train(spec, graphdef, base, global_params, server, own,
                                          batches, step_mask, rng, rank_mask)
  out = {"trained": trained, "opt": new_opt if spec.keep_optimizer_state else None,
         "controls": None, "control_delta": None}
  if spec.algorithm.scaffold:
    out["controls"], out["control_delta"] = _controls(
        server["control"], own["control"], global_params, trained["global"], metrics["lr_sum"])
  return out, metrics


def site_accept(spec: RoundSpec, own: dict, out: dict, accepted) -> dict:
  """The site's state after the server's decision: what it trained if its upload was
  accepted, its old state otherwise."""
  alg = spec.algorithm
  new = dict(own)
  keep = lambda old, fresh: jax.tree.map(lambda o, f: jnp.where(accepted, f, o), old, fresh)
  if alg.personal_factors:
    new["personal"] = keep(own["personal"], select_factors(out["trained"]["global"],
                                                           alg.personal_factors))
  if alg.local_adapter:
    new["local"] = keep(own["local"], out["trained"]["local"])
  if alg.scaffold:
    new["control"] = keep(own["control"], out["controls"])
  if spec.keep_optimizer_state:
    new["opt"] = keep(own["opt"], out["opt"])
  return new


def train_clients(spec: RoundSpec, graphdef, base, state: dict, sites: dict, batches: dict,
                  step_mask, idx, rngs, rank_mask=None, fault: dict | None = None):
  """Site side of a round for every sampled site at once (`site_update`'s two pieces over
  the client axis, as spec.mode says), then the configured upload faults: (out, metrics)."""
  alg = spec.algorithm
  server = state["server"]
  base = effective_base(spec, base, server)
  global_params = state["global"]
  own = site_state(sites, idx)

  def one_client(own_k, batches_k, mask_k, rng_k, rank_k):
    return _site_train(spec, graphdef, base, global_params, server, own_k, batches_k, mask_k,
                       rng_k, rank_k)

  in_axes = (0, 0, 0, 0, None if rank_mask is None else 0)
  run = _client_axis(one_client, spec, in_axes)
  trained, new_opt, client_metrics = run(own, batches, step_mask, rngs, rank_mask)
  out = {"trained": trained, "opt": new_opt if spec.keep_optimizer_state else None,
         "controls": None, "control_delta": None}
  if alg.scaffold:
    out["controls"], out["control_delta"] = jax.vmap(_controls, in_axes=(None, 0, None, 0, 0))(
        server["control"], own["control"], global_params, trained["global"],
        client_metrics["lr_sum"])
  if fault is not None:
    trained["global"] = apply_upload_faults(global_params, trained["global"], fault)
  return out, {"client_" + k: v for k, v in client_metrics.items()}


# ---- server side ------------------------------------------------------------------------------

def quarantine(global_params, uploads, present, max_norm: float = 0.0,
               sends: tuple[str, ...] = ("a", "b")):
  """(accepted [K], uploads, metrics): drops present uploads that are non-finite or whose
  update norm ||y_k − x|| exceeds `max_norm` (0: no bound), judged on the factors the
  aggregator takes (`sends`; fedsa_lora's personal B never reaches the server). A dropped
  upload is replaced by x, so no NaN can reach any later arithmetic."""
  sent_y, sent_x = select_factors(uploads, sends), select_factors(global_params, sends)
  finite = jnp.ones(present.shape, bool)
  for leaf in jax.tree.leaves(sent_y):
    finite &= jnp.all(jnp.isfinite(leaf).reshape(leaf.shape[0], -1), axis=1)
  safe = jax.tree.map(lambda y, x: jnp.where(
      finite.reshape((-1,) + (1,) * (y.ndim - 1)), y, x[None].astype(y.dtype)),
      uploads, global_params)
  norms = agg_base.per_client_norm(agg_base.client_deltas(
      sent_x, select_factors(safe, sends), present))
  too_big = (norms > max_norm) if max_norm > 0 else jnp.zeros(present.shape, bool)
  accepted = present & finite & ~too_big
  metrics = {"client_update_norm": jnp.where(finite, norms, jnp.inf),
             "client_quarantined_nonfinite": present & ~finite,
             "client_quarantined_norm": present & finite & too_big,
             "quarantined": jnp.sum((present & ~accepted).astype(jnp.float32))}
  return accepted, safe, metrics


def server_aggregate(spec: RoundSpec, aggregator: agg_lib.Aggregator, graphdef, base,
                     state: dict, uploads: dict, present, token_counts, val: dict | None,
                     num_sites: int, rank_mask=None, noise_key=None, max_norm: float = 0.0,
                     secure_delta=None):
  """Server side of a round: quarantine, validation weights, aggregation.

  uploads: {"global": the sites' stacked trained global adapters (the aggregator and the
  checks read only the factors it `sends`), "local": their local adapters (only when the
  validation weighting scores the personalised model), "control_delta": SCAFFOLD's control
  changes}. num_sites: N, every site of the federation (SCAFFOLD's 1/N when sites keep
  state), else the round's sampled count. `present` is who
  reported back (and, with signed uploads, whose signature verified). With secure
  aggregation the server never sees the uploads: `secure_delta` is the weighted mean update
  the protocol revealed, aggregated as a single client. Returns (state, accepted, metrics):
  the sites update their own state from `accepted` (`site_accept`).
  """
  alg = spec.algorithm
  server = state["server"]
  base = effective_base(spec, base, server)
  global_params = state["global"]
  sent = uploads["global"]
  metrics = {}
  token_counts = token_counts.astype(jnp.float32)
  if secure_delta is None:
    accepted, sent, q_metrics = quarantine(global_params, sent, present, max_norm,
                                           aggregator.sends)
    metrics.update(q_metrics)
  else:
    accepted = present
  if alg.needs_validation:
    def client_val(g, local):
      adapters = [LoraAdapter(g, spec.global_spec)]
      if local is not None:
        adapters.append(LoraAdapter(local, spec.local_spec))
      return validation_loss(graphdef, base, adapters, val)
    val_axes = (0, 0 if alg.local_adapter else None)
    losses = _client_axis(client_val, spec, val_axes)(sent, uploads.get("local"))
    weights = agg_lib.validation_weights(losses, token_counts, accepted, spec.gamma,
                                         spec.temperature)
    metrics["client_val_loss"] = losses
  else:
    n = token_counts * accepted.astype(jnp.float32)
    weights = n / jnp.maximum(jnp.sum(n), 1.0)
  metrics["weights"] = weights

  extras = {"num_clients": jnp.float32(num_sites)}
  if noise_key is not None:
    extras["noise_key"] = noise_key
  if rank_mask is not None:
    extras["rank_mask"] = rank_mask
  if alg.scaffold:
    extras["control_delta"] = uploads["control_delta"]
  if secure_delta is None:
    new_global, new_server, agg_metrics = aggregator.apply(
        global_params, sent, weights, accepted, server, extras)
  else:
    single = jax.tree.map(lambda x, d: (x.astype(jnp.float32) + d)[None].astype(x.dtype),
                          global_params, secure_delta)
    new_global, new_server, agg_metrics = aggregator.apply(
        global_params, single, jnp.ones((1,), jnp.float32), jnp.any(accepted)[None], server,
        extras)
  metrics.update(agg_metrics)
  metrics["present_clients"] = jnp.sum(accepted.astype(jnp.float32))
  return {**state, "global": new_global, "server": new_server}, accepted, metrics


def aggregate_round(spec: RoundSpec, aggregator: agg_lib.Aggregator, graphdef, base,
                    state: dict, sites: dict, client_out: dict, idx, present, token_counts,
                    val: dict | None, rank_mask=None, noise_key=None, max_norm: float = 0.0,
                    secure_delta=None):
  """The server's aggregation, then every sampled site's own state from its decision."""
  # Aggregators that count all sites (SCAFFOLD's 1/N) see N when sites keep state.
  num_sites = jax.tree.leaves(sites)[0].shape[0] if jax.tree.leaves(sites) else idx.shape[0]
  trained = client_out["trained"]
  uploads = {"global": trained["global"],
             "local": trained.get("local") if spec.algorithm.needs_validation else None,
             "control_delta": client_out.get("control_delta")}
  state, accepted, metrics = server_aggregate(
      spec, aggregator, graphdef, base, state, uploads, present, token_counts, val, num_sites,
      rank_mask, noise_key, max_norm, secure_delta)
  new_own = jax.vmap(functools.partial(site_accept, spec))(site_state(sites, idx), client_out,
                                                           accepted)
  sites = jax.tree.map(lambda full, new: full.at[idx].set(new), sites, new_own)
  return state, sites, metrics


def round_step(spec: RoundSpec, aggregator: agg_lib.Aggregator, graphdef, base, state: dict,
               sites: dict, batches: dict, step_mask, idx, present, token_counts, rngs,
               val: dict | None, rank_mask=None, fault=None, noise_key=None,
               max_norm: float = 0.0):
  """(state, sites, round inputs) -> (state, sites, metrics): clients and server in one program.

  state: {"global", "server"}; sites: per-site persistent state stacked over all N sites
  (local adapters, personal factors, SCAFFOLD controls, optimizer states).
  """
  client_out, metrics = train_clients(spec, graphdef, base, state, sites, batches, step_mask,
                                      idx, rngs, rank_mask, fault)
  state, sites, server_metrics = aggregate_round(
      spec, aggregator, graphdef, base, state, sites, client_out, idx, present, token_counts,
      val, rank_mask, noise_key, max_norm)
  return state, sites, {**metrics, **server_metrics}


def _check(spec: RoundSpec) -> None:
  if spec.mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {spec.mode!r}")
  if spec.mode == "chunked" and spec.chunk < 1:
    raise ValueError(f"mode chunked needs chunk >= 1, got {spec.chunk}")


def compile_round(spec: RoundSpec, aggregator, graphdef, max_norm: float = 0.0):
  """The jitted round. Per-site state (the bulk for dual_lora/fedsa_lora/SCAFFOLD) is donated;
  the global adapter is not, since some aggregators legitimately return buffers they keep
  in their state (FLoRA's shared A)."""
  _check(spec)
  fn = functools.partial(round_step, spec, aggregator, graphdef, max_norm=max_norm)
  return jax.jit(fn, donate_argnames=("sites",))


def compile_round_phases(spec: RoundSpec, aggregator, graphdef, max_norm: float = 0.0):
  """(train, aggregate): the round as two programs, for when the server must check the
  uploads on the host in between (signatures, secure aggregation)."""
  _check(spec)
  train = jax.jit(functools.partial(train_clients, spec, graphdef))
  aggregate = jax.jit(functools.partial(aggregate_round, spec, aggregator, graphdef,
                                        max_norm=max_norm), donate_argnames=("sites",))
  return train, aggregate
