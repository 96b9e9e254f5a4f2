"""The federated round loop: sampling, availability, compiled rounds, logging, checkpoints.

All randomness is derived from (seed, round, site), so a run resumed from the checkpoint
of round t continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lora import aggregators as agg_lib
from fedjax_lora import batching, checkpointing, client_modes, comm, faults, round_rows, rounds
from fedjax_lora.algorithms import Algorithm, overlay_factors
from fedjax_lora.client import ClientConfig, steps_per_round
from fedjax_lora.data.arrays import SiteArrays, common_length, validation_chunks
from fedjax_lora.errors import ConfigError, ResumeError
from fedjax_lora.rounds import (RoundSpec, compile_round, compile_round_phases, initial_global,
                                initial_site_state, validation_loss)
from fedjax_lora.security import guard, site_side
from fedjax_lora.security.config import SecurityConfig
from models.lora import LoraAdapter, LoraSpec


@dataclasses.dataclass
class SiteData:
  name: str
  train: SiteArrays
  dev: SiteArrays | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """config.run, typed (fedjax_lora.translate.run_config); its defaults are in configs/."""
  rounds: int
  epochs: int
  batch_size: int
  accumulation: int
  clients_per_round: int      # 0: every site (or client_fraction of them)
  client_fraction: float      # used when clients_per_round is 0 and this is > 0
  availability: float         # probability that a sampled client reports back
  seed: int
  val_examples_per_site: int
  val_chunk: int
  eval_every: int
  keep_last: int
  best_metric: str
  best_mode: str


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed, *keys])


def sample_clients(num_sites: int, run: RunConfig, round_index: int):
  """(indices [M], present [M]): seeded sampling, then availability per sampled client."""
  m = run.clients_per_round or (max(1, round(run.client_fraction * num_sites))
                                if run.client_fraction > 0 else num_sites)
  rng = _rng(run.seed, 1, round_index)
  idx = np.sort(rng.choice(num_sites, size=m, replace=False)) if m < num_sites \
      else np.arange(num_sites)
  present = rng.random(m) < run.availability
  if not present.any():  # a round with nobody back changes nothing; keep one to progress
    present[rng.integers(m)] = True
  return idx, present


def server_validation_set(sites: list[SiteData], per_site: int, chunk: int, length: int):
  """The first `per_site` dev examples of every training site, chunked [C, chunk, L]."""
  for s in sites:
    if s.dev is None or len(s.dev) == 0:
      raise ConfigError(f"site {s.name} has no dev split for the server validation set")
  return validation_chunks([s.dev for s in sites], per_site, chunk, length)


class Federation:
  """Holds the compiled round and the state; `run()` executes rounds with logging."""

  def __init__(self, graphdef, base: dict, model_config, sites: list[SiteData], algorithm: Algorithm,
               aggregator: agg_lib.Aggregator, client: ClientConfig, lora_spec: LoraSpec,
               run: RunConfig, *, local_spec: LoraSpec | None = None,
               site_ranks: list[int] | None = None, mode: str = "vmap", gamma: float = 0.0,
               temperature: float = 1.0, keep_optimizer_state: bool = False,
               workdir: str | None = None, log: Callable[[str], None] = print,
               place: Callable | None = None,
               hooks: list[Callable[["Federation", int], dict]] = (),
               security: SecurityConfig, special_token_ids=(),
               vocab_size: int | None = None):
    self.graphdef, self.base, self.model_config = graphdef, base, model_config
    self.sites, self.algorithm, self.aggregator, self.run = sites, algorithm, aggregator, run
    self.log, self.workdir = log, Path(workdir) if workdir else None
    self.hooks = list(hooks)  # called every eval_every rounds; their dicts join the metrics
    self.place = place or (lambda tree, client_axis: tree)
    n = len(sites)
    if run.clients_per_round > n:
      raise ConfigError(f"clients_per_round={run.clients_per_round} but only {n} sites")
    if not 0.0 <= run.client_fraction <= 1.0:
      raise ConfigError(f"client_fraction must be in [0, 1], got {run.client_fraction}")
    if not 0.0 < run.availability <= 1.0:
      raise ConfigError(f"availability must be in (0, 1], got {run.availability}")
    if site_ranks and not algorithm.hetero_ranks:
      if len(set(site_ranks)) > 1:
        raise ConfigError(f"per-site ranks {site_ranks} need a heterogeneous-rank aggregator "
                          "(flora, flexlora, hetlora)")
    if site_ranks and len(site_ranks) != n:
      raise ConfigError(f"site_ranks has {len(site_ranks)} entries for {n} sites")
    if site_ranks and max(site_ranks) != lora_spec.rank:
      raise ConfigError(f"the global rank ({lora_spec.rank}) must equal the largest site rank "
                        f"({max(site_ranks)})")
    if algorithm.local_adapter and local_spec is None:
      raise ConfigError("dual_lora needs a local adapter spec (config.lora.local_rank)")
    self.length = common_length([s.train for s in sites] + [s.dev for s in sites if s.dev])
    self.val = None
    if algorithm.needs_validation or run.val_examples_per_site:
      if algorithm.needs_validation and not run.val_examples_per_site:
        raise ConfigError(f"{aggregator.name} needs a server validation set; set "
                          "val_examples_per_site > 0")
      self.val = jax.tree.map(jnp.asarray, server_validation_set(
          sites, run.val_examples_per_site, run.val_chunk, self.length))
    self.site_val = None
    if (algorithm.local_adapter or algorithm.personal_factors) and run.val_examples_per_site:
      # Personalised models are scored per site on that site's own validation examples.
      self.site_val = [jax.tree.map(jnp.asarray, server_validation_set(
          [s], run.val_examples_per_site, run.val_chunk, self.length)) for s in sites]
    self.token_counts = np.array([s.train.token_count for s in sites], np.float32)
    self.rank_masks = None
    if site_ranks:
      self.rank_masks = (np.arange(lora_spec.rank)[None, :] <
                         np.array(site_ranks)[:, None]).astype(np.float32)
    try:
      clients, why = client_modes.choose(
          mode, len(sample_clients(len(sites), run, 0)[0]), model_config, run.batch_size,
          self.length, jax.devices()[0])
    except ValueError as e:
      raise ConfigError(f"config.mode {e}") from None
    if mode != clients.describe():  # resolved here (auto, or a chunk lowered): say so
      log(f"config.mode {mode}: running {clients.describe()} ({why})")
    self.spec = RoundSpec(algorithm, client, lora_spec, local_spec, clients.mode, clients.chunk,
                          gamma, temperature, keep_optimizer_state)
    self.security = security
    self.round_fn = compile_round(self.spec, aggregator, graphdef, security.max_update_norm)
    self.train_fn = self.aggregate_fn = None
    if security.split_round:
      self.train_fn, self.aggregate_fn = compile_round_phases(self.spec, aggregator, graphdef,
                                                              security.max_update_norm)
    self.label_perm = None
    if "label_flip" in security.faults.kinds():
      self.label_perm = faults.label_permutation(vocab_size or model_config.vocab_size,
                                                 special_token_ids, run.seed)
    self.val_fn = jax.jit(lambda base, adapters, val: validation_loss(graphdef, base, adapters,
                                                                       val))
    self.full_model_bytes = comm.model_bytes(base)
    # Placed on the mesh like the round's outputs, so round 2 reuses round 1's executable.
    self.state = self.place(self.initial_state(), False)
    self.history: list[dict] = []
    self.checkpointer = None
    if self.workdir is not None:
      self.checkpointer = checkpointing.RoundCheckpointer(
          self.workdir / "checkpoints", keep_last=run.keep_last,
          best_metric=run.best_metric or None, best_mode=run.best_mode)
    if security.ledger and self.workdir is None:
      raise ConfigError("security.ledger needs a workdir (the ledger and keys live there)")
    self.guard = self.site_side = None
    if security.split_round:
      names = [s.name for s in sites]
      self.site_side = site_side.SimulatedSites(
          names, aggregator.sends, security, dict(zip(names, self.token_counts.tolist())), log)
      self.guard = guard.RoundGuard(self.workdir, aggregator, security, log)
    self.dp_steps = {s.name: 0 for s in sites}  # local DP-SGD steps taken so far, per site

  # ---- state -------------------------------------------------------------------------------
  def initial_state(self) -> dict:
    """Round-0 state: one shared global adapter (the server's init, sent to every site)."""
    global_params = initial_global(self.spec, self.model_config, self.run.seed)
    n = len(self.sites)
    own = initial_site_state(self.spec, self.model_config, global_params, self.run.seed)
    sites = jax.tree.map(lambda x: jnp.stack([x] * n), own)
    return {"global": global_params, "server": self.aggregator.init(global_params),
            "sites": sites, "round": jnp.int32(0)}

  def set_global(self, params) -> None:
    """Starts from `params` (e.g. a federated adapter to adapt at a new site) instead of
    the random init; the aggregator state restarts from it. Only before the first round."""
    if int(self.state["round"]) != 0:
      raise ValueError("set_global is only allowed before the first round")
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), self.state["global"])
    given = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    if shapes != given:
      raise ValueError("the starting adapter does not match this federation's adapter "
                       "(targets, layers, rank or dtype differ)")
    state = dict(self.state)
    state["global"] = params
    state["server"] = self.aggregator.init(params)
    self.state = self.place(jax.tree.map(jnp.asarray, state), False)

  def effective_base(self):
    return rounds.effective_base(self.spec, self.base, self.state["server"])

  def global_adapters(self) -> list[LoraAdapter]:
    """The global model: for fedsa_lora, B is the token-weighted mean of the sites' B."""
    params = self.state["global"]
    if self.algorithm.personal_factors:
      w = jnp.asarray(self.token_counts / self.token_counts.sum())
      mean = jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1), self.state["sites"]["personal"])
      params = overlay_factors(params, mean)
    return [LoraAdapter(params, self.spec.global_spec)]

  def site_adapters(self, k: int) -> list[LoraAdapter]:
    """Site k's own model: global + its local adapter (dual_lora) or its own B (fedsa_lora)."""
    params = self.state["global"]
    sites = self.state["sites"]
    if self.algorithm.personal_factors:
      params = overlay_factors(params, jax.tree.map(lambda x: x[k], sites["personal"]))
    adapters = [LoraAdapter(params, self.spec.global_spec)]
    if self.algorithm.local_adapter:
      adapters.append(LoraAdapter(jax.tree.map(lambda x: x[k], sites["local"]),
                                  self.spec.local_spec))
    return adapters

  # ---- rounds ------------------------------------------------------------------------------
  def round_inputs(self, r: int):
    """(indices, present, batches [K, S, A, B, L], step mask, keys, rank masks) of round r:
    seeded, so the PyTorch baseline and resumed runs see exactly the same data."""
    idx, present = sample_clients(len(self.sites), self.run, r)
    rngs = [_rng(self.run.seed, 2, r, int(k)) for k in idx]
    batches, step_mask = batching.round_batches(
        [self.sites[k].train for k in idx], self.run.batch_size, self.run.accumulation,
        self.run.epochs, rngs, self.length, self.max_steps)
    plan = self.security.faults
    names = [self.sites[k].name for k in idx]
    for i, name in enumerate(names):
      kind = plan.kind(name, r)
      if kind == "dropout":
        present[i] = False
      elif kind == "label_flip":
        one = faults.flip_labels({k: v[i] for k, v in batches.items()}, self.label_perm)
        batches["tokens"][i] = one["tokens"]
    keys = jax.random.split(jax.random.fold_in(jax.random.key(self.run.seed), r), len(idx))
    rank = None if self.rank_masks is None else self.rank_masks[idx]
    return idx, present, batches, step_mask, keys, rank

  def round_extras(self, r: int, idx) -> tuple:
    """(upload faults, server noise key) of round r, both derived from the seed."""
    plan = self.security.faults
    fault = None
    if any(k in faults.UPLOAD_KINDS for k in plan.kinds()):
      fault = faults.upload_faults(plan, [self.sites[k].name for k in idx], r)
    noise_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.run.seed), r), 0x5EC)
    return fault, noise_key

  @functools.cached_property
  def max_steps(self) -> int:
    """Every round pads clients to the largest site's step count: one compiled shape."""
    return max(steps_per_round(len(s.train), self.run.batch_size, self.run.accumulation,
                               self.run.epochs) for s in self.sites)

  def step(self) -> dict:
    """Runs the next round; returns its metrics (also appended to `history`)."""
    if self.guard is not None and not self.guard.started:
      self._start_guard(int(self.state["round"]) or None)
    r = int(self.state["round"]) + 1
    t0 = time.perf_counter()
    idx, present, batches, step_mask, keys, rank = self.round_inputs(r)
    placed = self.place({"batches": batches, "step_mask": step_mask, "idx": idx,
                         "present": present, "counts": self.token_counts[idx], "keys": keys,
                         "rank": rank}, True)
    uplink_example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  self.state["global"])
    fault, noise_key = self.round_extras(r, idx)
    core = {"global": self.state["global"], "server": self.state["server"]}
    if self.train_fn is None:
      core, sites, metrics = self.round_fn(
          self.base, core, self.state["sites"], placed["batches"], placed["step_mask"],
          placed["idx"], placed["present"], placed["counts"], placed["keys"], self.val,
          placed["rank"], fault, noise_key)
      report, accepted = {}, present
    else:
      client_out, client_metrics = self.train_fn(
          self.base, core, self.state["sites"], placed["batches"], placed["step_mask"],
          placed["idx"], placed["keys"], placed["rank"], fault)
      accepted, secure_delta, report = self._check_uploads(r, idx, present, core["global"],
                                                           client_out)
      if secure_delta is not None:
        client_out = self.guard.server_view(client_out, core["global"])
      core, sites, metrics = self.aggregate_fn(
          self.base, core, self.state["sites"], client_out, placed["idx"],
          self.place(accepted, True), placed["counts"], self.val, placed["rank"], noise_key,
          secure_delta=secure_delta)
      metrics = {**client_metrics, **metrics}
    self.state = {**core, "sites": sites, "round": jnp.int32(r)}
    metrics = jax.device_get(metrics)
    row = self._summarise(r, idx, present, metrics, uplink_example, accepted)
    row.update(report.get("row", {}))
    row.update(self._privacy(idx, present, metrics))
    if self.run.eval_every and r % self.run.eval_every == 0:
      if self.val is not None:
        row["val_loss"] = float(self.val_fn(self.effective_base(), self.global_adapters(),
                                            self.val))
      if self.site_val is not None:
        row["site_val_loss"] = {
            s.name: float(self.val_fn(self.effective_base(), self.site_adapters(k),
                                      self.site_val[k]))
            for k, s in enumerate(self.sites)}
      for hook in self.hooks:
        row.update(hook(self, r))
    row["seconds"] = time.perf_counter() - t0
    self.history.append(row)
    self.log(self.format_row(row))
    if self.workdir is not None:
      round_rows.append_row(self.workdir / "metrics.jsonl", row)
    if self.guard is not None and self.security.ledger:
      # Before the checkpoint: a checkpoint with no block is treated as unverifiable.
      self.guard.record_round(r, [self.sites[k].name for k in idx], present, metrics, report,
                              row, self.state["global"], self.checkpoint_state())
    if self.checkpointer is not None:
      self.checkpointer.save(r, self.checkpoint_state(), round_rows.jsonable(row))
    return row

  def _start_guard(self, resumed_round: int | None = None) -> None:
    """The sites' keys (their side), then the server's registry and ledger."""
    if self.workdir is not None:
      self.site_side.start(self.workdir / "identity")
    initial = self.initial_state()["global"] if self.security.ledger else None  # genesis
    self.guard.start(initial, resumed_round)

  def _check_uploads(self, r, idx, present, global_params, client_out):
    """The wire between training and aggregation: the server opens the protocol round, the
    sites select, mask and sign their uploads, the server checks what arrives."""
    names = [self.sites[k].name for k in idx]
    rnd = (self.guard.open_secagg(r, names, present) if self.security.secure_aggregation
           else None)
    out = self.site_side.send(r, names, present, jax.device_get(global_params),
                              jax.device_get(client_out["trained"]["global"]), rnd,
                              self.guard.published(r))
    return self.guard.receive(r, names, present, out, global_params)

  def _privacy(self, idx, present, metrics) -> dict:
    """Per-site epsilon of example-level DP-SGD and the run's client-level epsilon so far."""
    return round_rows.privacy(self.spec.client, self.algorithm.client_dp, self.security,
                              self.run, int(self.state["round"]),
                              [self.sites[k].name for k in idx], present, metrics,
                              self.dp_steps, {s.name: len(s.train) for s in self.sites})

  def _summarise(self, r, idx, present, metrics, uplink_example, accepted=None) -> dict:
    ranks = ([int(self.rank_masks[k].sum()) for k in idx] if self.rank_masks is not None
             else [self.spec.global_spec.rank] * len(idx))
    traffic = round_rows.traffic(self.algorithm, self.aggregator.sends, ranks, present,
                                 uplink_example, self.full_model_bytes)
    return round_rows.summarise(r, [self.sites[k].name for k in idx], present, metrics,
                                traffic, accepted)

  format_row = staticmethod(round_rows.format_row)

  # ---- checkpoints -------------------------------------------------------------------------
  def checkpoint_state(self) -> dict:
    return {"global": self.state["global"], "server": self.state["server"],
            "sites": self.state["sites"], "round": self.state["round"]}

  def resume(self) -> int:
    """Restores the latest complete checkpoint whose hash matches the ledger (with a ledger);
    a corrupted or partial one is set aside with a warning and the one before is used.
    Metrics and ledger entries of rounds after it are dropped: they will be re-run."""
    if self.checkpointer is None or self.checkpointer.latest_round() is None:
      if self.workdir is not None:
        self._truncate_metrics(0)  # killed during round 1: nothing of it was kept
      if self.guard is not None:
        self._start_guard()
      return 0
    target = self.checkpoint_state()
    if self.guard is not None:
      self.guard.check_resumable()  # a missing or broken ledger stops here, moving nothing
    restored = metrics = None
    for r in sorted(self.checkpointer.all_rounds(), reverse=True):
      try:
        mismatch = self.checkpointer.structure_mismatch(r, target)
      except Exception as e:  # noqa: BLE001 - unreadable metadata is damage, not a config issue
        mismatch, problem = None, f"has unreadable metadata ({type(e).__name__}: {str(e)[:160]})"
      else:
        problem = None
      if mismatch:
        raise ResumeError(f"{self.workdir / 'checkpoints'}: {mismatch}; resume with the config "
                          "the run was started with (its config.json)")
      if problem is None:
        try:
          restored, metrics = self.checkpointer.restore(r, target=target)
        except Exception as e:  # noqa: BLE001 - any failure to read the data means "damaged"
          problem = f"cannot be restored ({type(e).__name__}: {str(e)[:200]})"
      if problem is None and self.guard is not None:
        problem = self.guard.check_checkpoint(r, restored)
      if problem is None:
        break
      aside = self.checkpointer.set_aside(r, self.workdir / "checkpoints_rejected")
      self.log(f"WARNING: checkpoint of round {r} {problem}; moved to {aside}, trying the "
               "previous one")
      restored = None
    if restored is None:
      raise ResumeError(f"no usable checkpoint in {self.workdir / 'checkpoints'}: every one "
                        "failed its check (see the warnings above; they are kept in "
                        "checkpoints_rejected/)")
    self.state = self.place(dict(restored), False)
    r = int(self.state["round"])
    self.dp_steps.update(metrics.get("dp_steps", {}))
    self._truncate_metrics(r)
    if self.guard is not None:
      self._start_guard(r)
    self.log(f"resumed from round {r}")
    return r

  def _truncate_metrics(self, round_index: int) -> None:
    round_rows.truncate_metrics(self.workdir / "metrics.jsonl", round_index)

  def run_rounds(self, until: int | None = None):
    until = until or self.run.rounds
    while int(self.state["round"]) < until:
      self.step()
    if self.checkpointer is not None:
      self.checkpointer.wait()
    return self.history
