"""The coordinator of a deployed federation: handshake, rounds, aggregation, ledger, checkpoints.

It runs the server's role of the simulator's round (`rounds.server_aggregate`, the
`security.guard` checks and ledger) over a `wire.Transport`, so Flower and the in-process
loopback drive exactly the same code. Randomness is the simulator's: which sites a round
samples, each site's batch order and training key and the server's noise key all derive
from (seed, round, site index), so a deployed run equals the simulated one (to float
rounding of vmapped against single-site programs).

The coordinator's workdir holds what the coordinator owns and nothing of a site's:
  deploy.json                  the run: config (JSON), the planned sites in order, timeouts
  identity/registry.json       the sites' public keys (site -> client id, key)
  validation/<site>.jsonl      Fed-MedLoRA+'s server validation examples
and it writes what `launch.federate` writes: checkpoints/, metrics.jsonl, ledger.jsonl,
config.json and the PEFT adapter under adapter/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_lora import checkpointing, comm, experiment, files, round_rows
from fedjax_lora.algorithms import overlay_factors, select_factors
from fedjax_lora.client import steps_per_round
from fedjax_lora.data import arrays as arrays_lib, prepare, templates
from fedjax_lora.deploy import protocol, records, secagg_wire, wire
from fedjax_lora.errors import ConfigError, DeployError, ResumeError, WireError
from fedjax_lora.privacy import secagg
from fedjax_lora.rounds import (RoundSpec, effective_base, initial_global, server_aggregate,
                                validation_loss)
from fedjax_lora.security import guard as guard_lib, identity
from fedjax_lora.security.site_side import Outgoing
from fedjax_lora.simulator import sample_clients
from models import checkpoints, hf_checkpoint, peft_io
from models.lora import LoraAdapter

DEPLOY_FILE = "deploy.json"
RUN_FILE = "run.json"
VALIDATION_DIR = "validation"


@dataclasses.dataclass(frozen=True)
class Timeouts:
  """Seconds the coordinator waits: for the planned sites to connect, for a handshake, for
  a round's uploads (a site that misses it is absent that round; the first round a
  coordinator process runs waits at least `hello`, as it includes the sites' compile), for
  the last decisions' acks."""
  connect: float = 120.0
  hello: float = 300.0
  round: float = 600.0
  decision: float = 60.0


def write_deploy_file(workdir: Path, config, sites: list[str], timeouts: Timeouts) -> Path:
  """The coordinator's run description (what `run_server` reads)."""
  path = Path(workdir) / DEPLOY_FILE
  files.write_atomic(path, json.dumps({"config": config.to_json_best_effort(),
                                       "sites": list(sites),
                                       "timeouts": dataclasses.asdict(timeouts)}, indent=1))
  return path


@dataclasses.dataclass
class _Site:
  """A site that passed the handshake."""
  name: str
  node: int
  client_id: str
  token_count: float
  examples: int
  lengths: dict


def refuse_unsupported(config) -> None:
  """Settings a deployment does not run, refused before anyone connects."""
  sec, ft, pv = config.security, config.faults, config.privacy
  if sec.secure_aggregation and not sec.ledger:
    raise ConfigError("config.security.secure_aggregation: a deployment needs "
                      "config.security.ledger=True with it (masked uploads are signed and the "
                      "coordinator verifies them before unmasking)")
  if ft.sites:
    raise ConfigError(f"config.faults.sites={ft.sites!r}: injected faults are a simulation "
                      "feature; a deployment's sites misbehave on their own")
  if pv.example_target_epsilon > 0:
    raise ConfigError("config.privacy.example_target_epsilon: a deployment cannot calibrate "
                      "DP-SGD noise before the sites report their sizes; set "
                      "config.privacy.example_noise instead")


class Coordinator:
  """The server side of one deployed run (state in its workdir)."""

  def __init__(self, workdir: str | Path, log: Callable[[str], None] = print):
    self.workdir = Path(workdir).resolve()
    self.log = log
    path = self.workdir / DEPLOY_FILE
    try:
      raw = json.loads(path.read_text())
    except FileNotFoundError:
      raise DeployError(f"{path}: missing (launch.deploy_local writes it; see README "
                        "'Deploying')") from None
    self.config = ml_collections.ConfigDict(json.loads(raw["config"]))
    self.planned = list(raw["sites"])
    self.timeouts = Timeouts(**raw.get("timeouts", {}))
    experiment.check_config(self.config)
    refuse_unsupported(self.config)
    if not self.config.model.path:
      raise ConfigError("config.model.path: a deployment needs a base every site installs "
                        "(a named base, an HF directory or a .gguf file)")
    self.registry = identity.read_registry(self.workdir / "identity")
    self.checkpointer = None
    self.nonce = self._nonce()
    self.sites: list[_Site] = []
    self.decided: dict[str, dict] = {}  # site -> its last upload's decision
    self.wire_bytes = {"down": 0, "up": 0}

  def _nonce(self) -> str:
    """This run's nonce: new for a fresh workdir, the same when the coordinator restarts."""
    path = self.workdir / RUN_FILE
    if path.exists():
      return json.loads(path.read_text())["nonce"]
    nonce = secrets.token_hex(16)
    files.write_atomic(path, json.dumps({"nonce": nonce}))
    return nonce

  # ---- handshake --------------------------------------------------------------------------------
  def connect(self, transport: wire.Transport) -> None:
    """Handshakes with every node until each planned site has joined or the connect timeout
    passes; refuses nodes whose key is not the one registered for the site they claim."""
    deadline = time.monotonic() + self.timeouts.connect
    config_json = self.config.to_json_best_effort()
    joined: dict[str, _Site] = {}
    seen: set[int] = set()
    while len(joined) < len(self.planned):
      left = deadline - time.monotonic()
      if left <= 0:
        break
      nodes = [n for n in transport.nodes(len(self.planned), left) if n not in seen]
      if not nodes:
        time.sleep(min(1.0, max(left, 0)))
        continue
      seen.update(nodes)
      challenges = {n: secrets.token_hex(16) for n in nodes}
      frames = {n: wire.pack(protocol.HELLO, {
          "nonce": self.nonce, "config": config_json, "challenge": challenges[n],
          "example_noise": float(self.config.privacy.example_noise)}) for n in nodes}
      replies = transport.exchange(frames, self.timeouts.hello)
      for n in nodes:
        reply = replies.get(n, "no reply")
        if isinstance(reply, str):
          self.log(f"node {n}: no handshake ({reply[:300]})")
          continue
        try:
          meta = wire.unpack(reply).meta
          why = protocol.check_hello(self.registry, meta, self.nonce, challenges[n])
          info = (float(meta["token_count"]), int(meta["examples"]),
                  {k: int(v) for k, v in meta["lengths"].items()})
        except (WireError, KeyError, TypeError, ValueError, AttributeError) as e:
          why = f"malformed handshake ({type(e).__name__}: {e})"
        if why is None and meta["site"] not in self.planned:
          why = f"site {meta['site']!r} is registered but not planned for this run"
        if why is None and meta["site"] in joined:
          why = f"site {meta['site']!r} already joined from node {joined[meta['site']].node}"
        if why is not None:
          self.log(f"refused node {n}: {why}")
          continue
        joined[meta["site"]] = _Site(meta["site"], n, meta["client_id"], *info)
        self.log(f"node {n} is site {meta['site']} ({meta['examples']} examples, "
                 f"{meta['token_count']} tokens; client {meta['client_id'][:12]})")
    self.sites = [joined[s] for s in self.planned if s in joined]
    missing = [s for s in self.planned if s not in joined]
    if missing:
      self.log(f"WARNING: planned site(s) {', '.join(missing)} did not join; the run goes on "
               f"with {len(self.sites)}")
    if not self.sites:
      raise DeployError(f"no site joined within {self.timeouts.connect:.0f} s "
                        f"(planned: {', '.join(self.planned)})")
    self._build()

  # ---- the run's pieces (once the sites are known) ----------------------------------------------
  def _build(self) -> None:
    config = self.config
    path = checkpoints.resolve(config.model.path, self.log)
    tokenizer = checkpoints.load_tokenizer(path)
    self.model_cfg, self.graphdef, self.base = experiment.load_model(
        config, len(tokenizer), None, tokenizer, self.log)
    names = [s.name for s in self.sites]
    self.parts = experiment.federation_parts(config, self.model_cfg,
                                             [s.examples for s in self.sites], names, True,
                                             self.log)
    p = self.parts
    self.spec = RoundSpec(p.algorithm, p.client, p.spec, p.local_spec, "vmap", 0,
                          config.aggregator.gamma, config.aggregator.temperature,
                          config.keep_optimizer_state)
    run = p.run
    self.length = max(max(s.lengths.values()) for s in self.sites)
    self.max_steps = max(steps_per_round(s.examples, run.batch_size, run.accumulation,
                                         run.epochs) for s in self.sites)
    self.token_counts = np.array([s.token_count for s in self.sites], np.float32)
    self.val = self._validation_set(tokenizer, names)
    self.rank_masks = None
    if p.site_ranks:
      planned = dict(zip(self.planned, p.site_ranks))
      ranks = np.array([planned[n] for n in names])
      self.rank_masks = (np.arange(p.spec.rank)[None, :] < ranks[:, None]).astype(np.float32)
    own_state = (p.algorithm.site_state or self.spec.keep_optimizer_state)
    # SCAFFOLD's 1/N counts every site when sites keep state (rounds.aggregate_round)
    num_sites = len(self.sites) if own_state else p.clients_per_round
    self.aggregate = jax.jit(functools.partial(
        server_aggregate, self.spec, p.aggregator, self.graphdef, num_sites=num_sites,
        max_norm=p.security.max_update_norm))
    self.val_fn = jax.jit(lambda base, adapters, val: validation_loss(self.graphdef, base,
                                                                       adapters, val))
    self.guard = guard_lib.RoundGuard(self.workdir, p.aggregator, p.security, self.log,
                                      run_nonce=self.nonce) if p.security.ledger else None
    self.checkpointer = checkpointing.RoundCheckpointer(
        self.workdir / "checkpoints", keep_last=run.keep_last,
        best_metric=run.best_metric or None, best_mode=run.best_mode)
    self.dp_steps = {s.name: 0 for s in self.sites}
    self.full_model_bytes = comm.model_bytes(self.base)
    (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  def _validation_set(self, tokenizer, names: list[str]):
    """The server's own validation examples (validation/<site>.jsonl), tokenized here and
    cut like the simulator's (first val_examples_per_site of each site)."""
    run = self.parts.run
    if not (self.parts.algorithm.needs_validation or run.val_examples_per_site):
      return None
    d = self.config.data
    renderer = templates.make_renderer(tokenizer, d.get("prompt_format", "paper"))
    devs = [prepare.split_arrays(records.read_examples(
        self.workdir / VALIDATION_DIR / f"{name}.jsonl"), renderer, d) for name in names]
    self.length = max(self.length, *(a.tokens.shape[1] for a in devs))
    return jax.tree.map(jnp.asarray, arrays_lib.validation_chunks(
        devs, run.val_examples_per_site, run.val_chunk, self.length))

  # ---- state ------------------------------------------------------------------------------------
  def initial_state(self) -> dict:
    global_params = initial_global(self.spec, self.model_cfg, self.parts.run.seed)
    self._template = global_params  # what every upload is checked against
    return {"global": global_params, "server": self.parts.aggregator.init(global_params),
            "round": jnp.int32(0)}

  def resume_or_start(self) -> dict:
    """The last good checkpoint (checked against the ledger), or the initial state."""
    state = self.initial_state()
    initial_global = state["global"]
    latest = self.checkpointer.latest_round()
    if latest is None:
      round_rows.truncate_metrics(self.workdir / "metrics.jsonl", 0)
      if self.guard is not None:
        self.guard.start(initial_global, None)
      return state
    if self.guard is not None:
      self.guard.check_resumable()
    for r in sorted(self.checkpointer.all_rounds(), reverse=True):
      try:
        restored, saved_row = self.checkpointer.restore(r, target=state)
        problem = self.guard.check_checkpoint(r, restored) if self.guard else None
      except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is set aside
        problem = f"cannot be restored ({type(e).__name__}: {str(e)[:200]})"
      if problem is None:
        break
      aside = self.checkpointer.set_aside(r, self.workdir / "checkpoints_rejected")
      self.log(f"WARNING: checkpoint of round {r} {problem}; moved to {aside}")
    else:
      raise ResumeError(f"no usable checkpoint in {self.workdir / 'checkpoints'}")
    r = int(restored["round"])
    self.decided = dict(saved_row.get("decided", {}))
    self.dp_steps.update(saved_row.get("dp_steps", {}))
    round_rows.truncate_metrics(self.workdir / "metrics.jsonl", r)
    if self.guard is not None:
      self.guard.start(initial_global, r)
    self.log(f"coordinator resumed from round {r}")
    return dict(restored)

  # ---- a round ----------------------------------------------------------------------------------
  def _broadcast(self, state: dict) -> dict:
    """The part of the server state a site's update reads (SCAFFOLD's control, FLoRA's
    merged delta)."""
    server = state["server"]
    return {k: server[k] for k in ("control", "base_delta") if k in server}

  def _train_frames(self, r: int, state: dict, idx, present, shares: dict | None = None
                    ) -> dict:
    seed = self.parts.run.seed
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), r), len(idx))
    bcast = jax.device_get(self._broadcast(state))
    global_params = jax.device_get(state["global"])
    frames = {}
    for i, k in enumerate(idx):
      if not present[i]:
        continue
      site = self.sites[k]
      meta = {"nonce": self.nonce, "round": r, "site": site.name,
              "batch_seed": [seed, 2, r, int(k)], "length": self.length,
              "max_steps": self.max_steps,
              "decided": [self.decided[site.name]] if site.name in self.decided else []}
      if shares is not None:  # the sealed shares the other sites dealt to this one
        meta["shares"] = shares[site.name]
      rank = None if self.rank_masks is None else {"mask": self.rank_masks[k]}
      frames[site.node] = wire.pack(protocol.TRAIN, meta, **{
          "global": global_params, "server": bcast or None,
          "key": {"data": np.asarray(jax.random.key_data(keys[i]))}, "rank_mask": rank})
    return frames

  def _check_shapes(self, upload: dict) -> dict:
    """An upload's trees as the global adapter's factors it should hold (WireError or
    ValueError when a target, factor or shape is missing or wrong)."""
    g = jax.device_get(self._template)
    out = {"update": _shaped_like(select_factors(g, self.parts.aggregator.sends),
                                  upload["update"])}
    alg = self.spec.algorithm
    if alg.scaffold:
      out["control_delta"] = _shaped_like(g, upload["control_delta"])
    if alg.needs_validation and alg.local_adapter:
      out["local"] = upload["local"]  # scored on the validation set; non-finite is handled
    return out

  def _collect(self, r: int, idx, present, replies: dict) -> tuple:
    """(responded [M], uploads by site, Outgoing, site metrics, timings) from the replies."""
    alg = self.spec.algorithm
    extras = alg.scaffold or (alg.needs_validation and alg.local_adapter)
    responded = np.zeros(len(idx), bool)
    out = Outgoing({}, {}, {})
    uploads, metrics, timings = {}, {}, {}
    for i, k in enumerate(idx):
      site = self.sites[k]
      if not present[i]:
        continue
      reply = replies.get(site.node, "no reply")
      if isinstance(reply, str):
        self.log(f"round {r}: {site.name} is absent ({reply[:300]})")
        continue
      try:
        msg = wire.unpack(reply)
        meta = msg.meta
        if msg.kind != protocol.UPLOAD or meta.get("site") != site.name or \
            meta.get("round") != r:
          raise WireError(f"expected {site.name}'s upload of round {r}, got {msg.kind} "
                          f"{meta.get('site')!r} round {meta.get('round')}")
        payload = bytes(reply[protocol.PAYLOAD])
        upload = None
        if not self.parts.security.secure_aggregation:
          upload = protocol.parse_upload(payload, extras, f"{site.name}'s upload of round {r}")
          upload = self._check_shapes(upload)
        sig = meta.get("signature")
        signed = identity.SignedUpload(
            r, str(meta.get("client_id", "")), str(meta.get("update_hash", "")),
            bytes.fromhex(sig) if sig else None, str(meta.get("run", "")))
        site_metrics = {k: float(v) for k, v in dict(meta.get("metrics", {})).items()}
        if not all(np.isfinite(site_metrics.get(k, 0.0)) for k in ("steps", "train_tokens")):
          raise WireError("non-finite step or token count")
      except (WireError, KeyError, ValueError, TypeError, AttributeError) as e:
        self.log(f"round {r}: {site.name}'s reply is malformed ({e}); absent")
        continue
      responded[i] = True
      uploads[site.name] = upload
      metrics[site.name] = site_metrics
      timings[site.name] = meta.get("timings", {})
      out.payloads[site.name] = payload
      out.signed[site.name] = signed
    return responded, uploads, out, metrics, timings

  def _stack(self, idx, state, uploads: dict, accepted) -> dict:
    """The round's uploads stacked over its M sites; an absent or rejected site holds the
    global values (the aggregator never counts it)."""
    g = jax.device_get(state["global"])
    alg = self.spec.algorithm
    rows, deltas, locals_ = [], [], []
    for i, k in enumerate(idx):
      up = uploads.get(self.sites[k].name) if accepted[i] else None  # None: secure agg.
      rows.append(overlay_factors(g, up["update"]) if up else g)
      if alg.scaffold:
        deltas.append(up["control_delta"] if up else jax.tree.map(np.zeros_like, g))
      if alg.needs_validation and alg.local_adapter:
        locals_.append(up["local"] if up else None)
    stack = lambda trees: jax.tree.map(lambda *x: np.stack(x), *trees)
    return {"global": stack(rows), "local": stack(locals_) if locals_ else None,
            "control_delta": stack(deltas) if deltas else None}

  def step(self, transport: wire.Transport, state: dict) -> tuple[dict, dict]:
    r = int(state["round"]) + 1
    t0 = time.perf_counter()
    run = self.parts.run
    n = len(self.sites)
    idx, present = sample_clients(n, run, r)
    names = [self.sites[k].name for k in idx]
    secagg_round, shares = None, None
    if self.parts.security.secure_aggregation:
      secagg_round, shares = self._secagg_setup(transport, r, idx, present)
    frames = self._train_frames(r, state, idx, present, shares)
    down = sum(wire.frame_bytes(f) for f in frames.values())
    t_send = time.perf_counter()
    # The sites compile their program in the first round this coordinator runs.
    first = r == self._first_round
    replies = transport.exchange(frames, max(self.timeouts.round, self.timeouts.hello)
                                 if first else self.timeouts.round)
    t_back = time.perf_counter()
    up = sum(wire.frame_bytes(f) for f in replies.values() if not isinstance(f, str))
    responded, uploads, out, site_metrics, timings = self._collect(r, idx, present, replies)
    global_params = state["global"]
    report = {"row": {}}
    accepted, secure_delta = responded.copy(), None
    out.secagg = secagg_round
    if self.guard is not None:
      accepted, secure_delta, report = self.guard.receive(r, names, responded, out,
                                                          global_params)
    stacked = self._stack(idx, state, uploads, accepted)
    noise_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(run.seed), r), 0x5EC)
    rank = None if self.rank_masks is None else self.rank_masks[idx]
    core = {"global": state["global"], "server": state["server"]}
    t_agg = time.perf_counter()
    core, accepted, metrics = self.aggregate(self.base, core, stacked, accepted,
                                             self.token_counts[idx], self.val, rank_mask=rank,
                                             noise_key=noise_key, secure_delta=secure_delta)
    metrics = jax.device_get(metrics)
    accepted = np.asarray(jax.device_get(accepted))
    t_done = time.perf_counter()
    for i, name in enumerate(names):
      if responded[i]:  # travels with the site's next message (see `_send_decisions`)
        self.decided[name] = {"round": r, "accepted": bool(accepted[i])}
    new_state = {**core, "round": jnp.int32(r)}
    for key in ("train_loss", "train_tokens", "steps"):
      metrics["client_" + key] = np.array([site_metrics.get(nm, {}).get(key, 0.0)
                                           for nm in names], np.float32)
    ranks = ([int(self.rank_masks[k].sum()) for k in idx] if self.rank_masks is not None
             else [self.spec.global_spec.rank] * len(idx))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), global_params)
    traffic = round_rows.traffic(self.spec.algorithm, self.parts.aggregator.sends, ranks,
                                 responded, shapes, self.full_model_bytes)
    row = round_rows.summarise(r, names, responded, metrics, traffic, accepted)
    row.update(report.get("row", {}))
    row.update(round_rows.privacy(
        self.spec.client, self.spec.algorithm.client_dp, self.parts.security, run, r, names,
        responded, metrics, self.dp_steps, {s.name: s.examples for s in self.sites}))
    if run.eval_every and r % run.eval_every == 0 and self.val is not None:
      base = effective_base(self.spec, self.base, core["server"])
      row["val_loss"] = float(self.val_fn(base, [LoraAdapter(core["global"],
                                                             self.spec.global_spec)], self.val))
    row["wire"] = {"down_bytes": down, "up_bytes": up}
    row["deploy_seconds"] = {"send_and_train": t_back - t_send, "aggregate": t_done - t_agg,
                             "sites": timings}
    row["seconds"] = time.perf_counter() - t0
    self.wire_bytes["down"] += down
    self.wire_bytes["up"] += up
    self.log(round_rows.format_row(row))
    round_rows.append_row(self.workdir / "metrics.jsonl", row)
    if self.guard is not None:
      self.guard.record_round(r, names, responded, metrics, report, row, new_state["global"],
                              new_state)
    # The decisions not yet delivered belong to the state: a restarted coordinator resends them.
    # (the row carries dp_steps under DP-SGD, as the simulator's does)
    self.checkpointer.save(r, new_state, {**round_rows.jsonable(row),
                                          "decided": dict(self.decided)})
    return new_state, row

  def _secagg_setup(self, transport, r: int, idx, present):
    """Secure aggregation's first two steps among the round's sites: their public keys, then
    their shares, sealed for each recipient, which the coordinator only routes. Returns (the
    round as `guard` unmasks it, {site: the sealed shares dealt to it}); a site that misses
    a step is absent this round (present is updated)."""
    sites = {self.sites[k].name: self.sites[k].node for i, k in enumerate(idx) if present[i]}

    def ask(kind, metas, field):
      frames = {sites[s]: wire.pack(kind, {"nonce": self.nonce, "round": r, **m})
                for s, m in metas.items()}
      replies = transport.exchange(frames, self.timeouts.round)
      got = {}
      for s, node in sites.items():
        reply = replies.get(node, "no reply") if s in metas else None
        if reply is None:
          continue
        try:
          if isinstance(reply, str):
            raise WireError(reply[:200])
          msg = wire.unpack(reply)
          if msg.kind != protocol.SECAGG_REPLY or msg.meta.get("site") != s or \
              msg.meta.get("round") != r or field not in msg.meta:
            raise WireError(f"expected {s}'s {field} of round {r}")
        except WireError as e:
          self.log(f"round {r}: {s} is absent from secure aggregation ({e})")
          continue
        got[s] = msg.meta[field]
      return got
    if len(sites) < secagg.MIN_SURVIVORS:
      self.log(f"round {r}: secure aggregation needs at least {secagg.MIN_SURVIVORS} sites; "
               "nobody trains this round")
      present[:] = False
      return None, None
    sa = secagg_wire.ServerSecAgg(sorted(sites), self.guard.secagg_threshold(len(sites)),
                                  self.parts.security.secagg_frac_bits, round=r)
    try:
      for s, advertised in ask(protocol.SECAGG_KEYS, {s: {} for s in sites}, "keys").items():
        sa.add_keys(s, advertised)
      public = sa.public_keys()
      deals = ask(protocol.SECAGG_DEAL, {s: {"public": public, "threshold": sa.threshold}
                                         for s in public}, "deal")
      routed = sa.route({s: {k: bytes.fromhex(v) for k, v in d.items()}
                         for s, d in deals.items()})
    except (secagg.SecAggError, ValueError, TypeError, AttributeError) as e:
      self.log(f"round {r}: secure aggregation could not start ({e}); nobody trains this "
               "round and the global adapter stays")
      present[:] = False
      return None, None
    for i, k in enumerate(idx):
      if present[i] and self.sites[k].name not in routed:
        present[i] = False  # no shares dealt to it: its masks could not be removed
    shares = {s: {sender: c.hex() for sender, c in got.items()} for s, got in routed.items()}

    def reveal(request):
      asked = {s: request for s in request["survivors"]}
      return ask(protocol.SECAGG_REVEAL, asked, "shares")
    return _WireSecAgg(sa, reveal), shares

  def _send_decisions(self, transport) -> None:
    """Tells every site whether its last upload counted (it keeps its pending state only if
    so). During the run a decision rides on the site's next train message, which saves a
    message round per round (a Flower exchange costs seconds); this sends the last ones."""
    frames = {s.node: wire.pack(protocol.DECISION, {"nonce": self.nonce, **self.decided[s.name]})
              for s in self.sites if s.name in self.decided}
    if not frames:
      return
    for node, reply in transport.exchange(frames, self.timeouts.decision).items():
      if isinstance(reply, str):
        self.log(f"node {node} did not take its last decision ({reply[:200]}); it keeps that "
                 "round's state pending")

  # ---- the whole run ----------------------------------------------------------------------------
  def run(self, transport: wire.Transport) -> dict:
    self.connect(transport)
    state = self.resume_or_start()
    self._first_round = int(state["round"]) + 1
    rounds = self.parts.run.rounds
    self.log(f"deployed run {self.nonce[:12]}: {len(self.sites)} sites, algorithm "
             f"{self.config.algorithm}, rounds {int(state['round']) + 1}..{rounds}")
    while int(state["round"]) < rounds:
      state, _ = self.step(transport, state)
    self._send_decisions(transport)
    self.checkpointer.wait()
    self.finish(state)
    return state

  def finish(self, state: dict) -> None:
    """The final global adapter in PEFT format (and FLoRA's merged base)."""
    path = checkpoints.resolve(self.config.model.path, self.log)
    out = peft_io.export_adapter(self.workdir / "adapter",
                                 LoraAdapter(state["global"], self.spec.global_spec),
                                 self.model_cfg.num_layers, str(path))
    alg = self.spec.algorithm
    note = ""
    if alg.personal_factors or alg.local_adapter:
      note = (" (the shared part only: each site keeps its own "
              f"{'B' if alg.personal_factors else 'local adapter'})")
    self.log(f"final global adapter (PEFT format): {out}{note}")
    if alg.merge_base:
      merged = hf_checkpoint.save_params(self.workdir / "merged_model", self.model_cfg,
                                         jax.device_get(effective_base(
                                             self.spec, self.base, state["server"])))
      self.log(f"FLoRA base with the aggregated updates merged in (HF format): {merged}")


class _WireSecAgg:
  """A deployed secure-aggregation round as `guard` unmasks it (the calls of
  `secagg.SecAggRound`): masked vectors go to the coordinator's `ServerSecAgg`, and the
  shares it needs are asked of the surviving sites over the transport."""

  def __init__(self, sa: secagg_wire.ServerSecAgg, reveal: Callable[[dict], dict]):
    self.sa, self._reveal = sa, reveal
    self.server = self  # guard reads rnd.server.{require_quorum, survivors, dropped}

  @property
  def ids(self) -> tuple[str, ...]:
    return self.sa.dealers

  def receive(self, site: str, vector: np.ndarray) -> None:
    self.sa.add_masked(site, vector)

  def require_quorum(self) -> None:
    self.sa.reveal_request()  # SecAggError below the threshold

  @property
  def survivors(self) -> tuple[str, ...]:
    return tuple(self.sa.reveal_request()["survivors"])

  @property
  def dropped(self) -> tuple[str, ...]:
    return tuple(self.sa.reveal_request()["dropped"])

  def unmask(self) -> tuple[np.ndarray, float]:
    return self.sa.aggregate(self._reveal(self.sa.reveal_request()))


def _shaped_like(template, tree):
  """`tree` (decoded from the wire) as arrays of `template`'s structure, shapes and dtypes."""
  if jax.tree.structure(template) != jax.tree.structure(tree):
    raise WireError("an upload's targets or factors differ from the global adapter's")

  def one(t, x):
    x = np.asarray(x)
    if x.shape != t.shape:
      raise WireError(f"an upload leaf has shape {x.shape}, expected {t.shape}")
    return x.astype(t.dtype)
  return jax.tree.map(one, template, tree)


def run_server(workdir: str | Path, transport: wire.Transport,
               log: Callable[[str], None] = print) -> dict:
  """Runs the deployed federation described by `<workdir>/deploy.json` to its last round."""
  return Coordinator(workdir, log).run(transport)
