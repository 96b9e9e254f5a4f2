"""From a federate config to a ready `Federation` (data, model, adapters, aggregator, mesh).

Every setting is checked here, before anything is trained, so a bad config fails in
seconds with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable

import jax

from fedjax_lora import client_modes
from fedjax_lora import faults as faults_lib
from fedjax_lora import mesh as mesh_lib
from fedjax_lora.aggregators import Aggregator
from fedjax_lora.algorithms import ALGORITHMS, Algorithm, get_algorithm
from fedjax_lora.client import ClientConfig, steps_per_round
from fedjax_lora.data import prepare, sites as sites_lib
from fedjax_lora.privacy import accounting, secagg
from fedjax_lora.translate import group, lora_spec, run_config, tiny_model_config
from fedjax_lora.errors import ConfigError
from fedjax_lora.security.config import SecurityConfig
from fedjax_lora.simulator import Federation, RunConfig, SiteData
from models import bases, checkpoints, hf_checkpoint, llama, quant
from models.config import LlamaConfig
from models.lora import LoraSpec

BEST_METRICS = ("val_loss", "mean_train_loss")


def secagg_compatible(alg_name: str) -> bool:
  """The aggregator combines by a weighted mean, and nothing else looks at single uploads."""
  return not get_algorithm(alg_name).secagg_obstacle()


def _check_privacy(config, alg_name: str) -> None:
  pv = group(config, "privacy")
  if not 0.0 < pv["delta"] < 1.0:
    raise ConfigError(f"config.privacy.delta must be in (0, 1), got {pv['delta']}")
  for prefix in ("example", "client"):
    for field in ("clip", "noise", "target_epsilon"):
      value = pv[f"{prefix}_{field}"]
      if not value >= 0 or value == float("inf"):
        raise ConfigError(f"config.privacy.{prefix}_{field} must be a finite number >= 0, "
                          f"got {value}")
    noise, target = pv[f"{prefix}_noise"], pv[f"{prefix}_target_epsilon"]
    if noise > 0 and target > 0:
      raise ConfigError(f"config.privacy: set {prefix}_noise or {prefix}_target_epsilon, not "
                        "both (the target decides the noise)")
  if (pv["example_noise"] > 0 or pv["example_target_epsilon"] > 0) and not pv["example_clip"]:
    raise ConfigError("config.privacy.example_clip must be > 0 for DP-SGD noise (it sets the "
                      "sensitivity)")
  client_dp = pv["client_noise"] > 0 or pv["client_target_epsilon"] > 0
  if client_dp and not get_algorithm(alg_name).client_dp:
    raise ConfigError("config.privacy.client_noise / client_target_epsilon apply to "
                      f"config.algorithm="
                      f"{'/'.join(n for n, a in ALGORITHMS.items() if a.client_dp)} only, "
                      f"not {alg_name}")
  if get_algorithm(alg_name).client_dp and not pv["client_clip"] > 0:
    raise ConfigError(f"config.algorithm={alg_name} needs config.privacy.client_clip > 0")


def _check_security(config, alg_name: str, sites: list[str]) -> None:
  sec, ft = group(config, "security"), group(config, "faults")
  if sec["max_update_norm"] < 0:
    raise ConfigError(f"config.security.max_update_norm must be >= 0, got "
                      f"{sec['max_update_norm']}")
  if not 0.5 <= sec["secagg_threshold"] < 1.0:
    raise ConfigError(f"config.security.secagg_threshold must be in [0.5, 1), got "
                      f"{sec['secagg_threshold']}: below a majority, two disjoint groups of "
                      "share holders could unmask one site")
  if not 8 <= sec["secagg_frac_bits"] <= 40:
    raise ConfigError("config.security.secagg_frac_bits must be in [8, 40]")
  if sec["keep_uploads"] and not sec["ledger"]:
    raise ConfigError("config.security.keep_uploads needs config.security.ledger=True (the "
                      "ledger's hashes are what the stored uploads are checked against)")
  if sec["secure_aggregation"]:
    why = get_algorithm(alg_name).secagg_obstacle()
    if why:
      raise ConfigError(
          f"config.security.secure_aggregation cannot be combined with config.algorithm="
          f"{alg_name}: {why}, and "
          "the server never sees one under secure aggregation. Compatible: "
          f"{', '.join(a for a in sorted(ALGORITHMS) if secagg_compatible(a))}")
    if config.run.clients_per_round == 1 or len(sites) < secagg.MIN_SURVIVORS:
      raise ConfigError(f"config.security.secure_aggregation needs at least "
                        f"{secagg.MIN_SURVIVORS} clients per round: the sum of one update is "
                        "that update")
    if sec["max_update_norm"] > 0:
      raise ConfigError("config.security.max_update_norm cannot be checked under "
                        "secure_aggregation (the server never sees an individual update); "
                        "bound updates on the sites instead (config.privacy.example_clip)")
  try:
    plan = faults_lib.parse_faults(ft["sites"], sites, ft["scale"], ft["start_round"])
  except ValueError as e:
    raise ConfigError(str(e)) from None
  kinds = plan.kinds()
  if kinds & set(faults_lib.SIGNING_KINDS) and not sec["ledger"]:
    raise ConfigError(f"config.faults.sites: {sorted(kinds & set(faults_lib.SIGNING_KINDS))} "
                      "need config.security.ledger=True (uploads are only signed then)")
  if "drop_after_masking" in kinds and not sec["secure_aggregation"]:
    raise ConfigError("config.faults.sites: drop_after_masking needs "
                      "config.security.secure_aggregation=True")


def check_config(config) -> None:
  """Fails fast on settings that cannot work, naming the config field."""
  if config.algorithm not in ALGORITHMS:
    raise ConfigError(f"config.algorithm: unknown algorithm {config.algorithm!r}; choose one of "
                      f"{', '.join(sorted(ALGORITHMS))}")
  alg = get_algorithm(config.algorithm)
  run = config.run
  if run.rounds < 1 or run.epochs < 1 or run.batch_size < 1 or run.accumulation < 1:
    raise ConfigError("config.run.rounds, epochs, batch_size and accumulation must be >= 1")
  if alg.needs_validation and run.val_examples_per_site < 1:
    raise ConfigError(f"config.algorithm={config.algorithm} weights clients by their server "
                      "validation loss: config.run.val_examples_per_site must be >= 1")
  ranks = tuple(config.lora.site_ranks or ())
  if ranks and not alg.hetero_ranks and set(ranks) != {config.lora.rank}:
    raise ConfigError(f"config.lora.site_ranks={ranks} differ from config.lora.rank="
                      f"{config.lora.rank}, but {config.algorithm} averages factors of one "
                      "shape; use flora, flexlora or hetlora, or drop site_ranks")
  if ranks and alg.hetero_ranks and max(ranks) != config.lora.rank:
    raise ConfigError(f"config.lora.rank={config.lora.rank} must equal the largest of "
                      f"config.lora.site_ranks={ranks} (the global rank)")
  try:
    client_modes.parse(config.mode)
  except ValueError as e:
    raise ConfigError(f"config.mode {e}") from None
  if run.clients_per_round < 0 or not 0.0 <= run.client_fraction <= 1.0:
    raise ConfigError("config.run.clients_per_round must be >= 0 and client_fraction in [0, 1]")
  if not 0.0 < run.availability <= 1.0:
    raise ConfigError(f"config.run.availability must be in (0, 1], got {run.availability}")
  if run.keep_last < 1:
    raise ConfigError(f"config.run.keep_last must be >= 1, got {run.keep_last}")
  if run.best_metric and run.best_metric not in BEST_METRICS:
    raise ConfigError(f"config.run.best_metric must be one of {BEST_METRICS} or '' (none), "
                      f"got {run.best_metric!r}")
  if run.best_mode not in ("min", "max"):
    raise ConfigError(f"config.run.best_mode must be 'min' or 'max', got {run.best_mode!r}")
  site_names = sites_lib.training_site_names(config.data)
  n_sites = len(site_names)
  if run.clients_per_round > n_sites:
    raise ConfigError(f"config.run.clients_per_round={run.clients_per_round} but the data "
                      f"config has only {n_sites} training sites")
  if ranks and len(ranks) != n_sites:
    raise ConfigError(f"config.lora.site_ranks has {len(ranks)} entries for {n_sites} sites")
  _check_privacy(config, config.algorithm)
  _check_security(config, config.algorithm, site_names)
  qc = quant_config(config)
  if qc.active and alg.merge_base:
    raise ConfigError(f"config.model.quantize={qc.mode!r}: {config.algorithm} adds every "
                      "round's update into the base weights, which a quantized base cannot "
                      "hold; use quantize='none' (or another algorithm)")
  if qc.mode == "keep" and not config.model.path:
    raise ConfigError("config.model.quantize='keep' holds a GGUF base's blocks as stored; "
                      "config.model.path is empty (a random tiny model): give a .gguf file "
                      "or a named base, or use nf4 / int8")


def quant_config(config) -> quant.QuantConfig:
  """config.model's quantize, quant_block_size and quant_double_quant, checked."""
  try:
    return quant.QuantConfig.from_settings(config.model)
  except ValueError as e:
    raise ConfigError(f"config.model.{e}") from None


def base_path(config, log=print) -> Path | None:
  """config.model.path resolved (a named base is fetched on first use); None = tiny model."""
  if not config.model.path:
    return None
  return checkpoints.resolve(config.model.path, log, gguf=quant_config(config).reads_gguf)


def base_tokenizer(config, path: Path | None):
  """The tokenizer the data is prepared with when config.data.tokenizer is "auto" and a base
  checkpoint is given: the base's own. None otherwise (the data config names one)."""
  if path is None or config.data.get("tokenizer", prepare.AUTO) != prepare.AUTO:
    return None
  if not checkpoints.has_tokenizer(path):
    raise ConfigError(f"config.model.path={config.model.path}: the checkpoint ships no "
                      "tokenizer; name one in config.data.tokenizer")
  return checkpoints.load_tokenizer(path)


def prepare_data(config, data_dir: Path | None, log=print) -> prepare.PreparedData:
  """config.data tokenized with the base's own tokenizer (config.data.tokenizer "auto")."""
  return prepare.prepare(config.data, data_dir,
                         tokenizer=base_tokenizer(config, base_path(config, log)), log=log)


def check_tokenizer(config, path: Path, model_cfg: LlamaConfig, tokenizer) -> None:
  """A tokenizer named in the data config must be the base's (vocabulary and specials)."""
  named = config.data.get("tokenizer", prepare.AUTO)
  what = (f"config.data.tokenizer={named!r} ({len(tokenizer)} tokens) does not match the base "
          f"config.model.path={config.model.path}")
  fix = "; set config.data.tokenizer='auto' to use the base's own tokenizer"
  if len(tokenizer) > model_cfg.vocab_size:
    raise ConfigError(f"{what} (vocabulary {model_cfg.vocab_size}){fix}")
  if named == prepare.AUTO or not checkpoints.has_tokenizer(path):
    return
  own = checkpoints.load_tokenizer(path)
  specials = lambda t: (t.bos_token, t.eos_token, t.bos_token_id, t.eos_token_id)
  if own.get_vocab() != tokenizer.get_vocab():
    raise ConfigError(f"{what} (its own has {len(own)} tokens, another vocabulary){fix}")
  if specials(own) != specials(tokenizer):
    raise ConfigError(f"{what}: special tokens (bos, eos) {specials(tokenizer)} against the "
                      f"base's {specials(own)}{fix}")


def load_model(config, vocab_size: int, workdir: Path | None, tokenizer, log):
  """(LlamaConfig, graphdef, base): config.model.path, or a tiny random LLaMA (saved to
  workdir/base_model so exported adapters have a base to load onto)."""
  m = config.model
  dtype, qc = m.dtype, quant_config(config)
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype must be float32 or bfloat16, got {dtype!r}")
  if m.path:
    path = base_path(config, log)
    cfg = checkpoints.load_config(path, param_dtype=dtype, dtype=dtype, remat=m.remat,
                                  attention_impl=m.attention_impl or None)
    check_tokenizer(config, path, cfg, tokenizer)
    cfg, graphdef, base = checkpoints.load_params(path, cfg, log=log, quantize=qc)
    # the exported adapter's base_model_name_or_path: an HF directory (a named base read as
    # its GGUF for quantize=keep still has its converted one)
    hf_dir = path if path.is_dir() else (
        checkpoints.resolve(m.path, log) if bases.is_named(m.path) else None)
    if workdir is not None and hf_dir is not None:
      link = workdir / "base_model"
      if not link.exists():
        link.symlink_to(hf_dir.resolve(), target_is_directory=True)
    return cfg, graphdef, base
  cfg = tiny_model_config(m, vocab_size, tokenizer)
  graphdef, base = llama.init_model(cfg, seed=config.run.seed)
  if workdir is not None:  # keep the base so the exported adapter has something to load onto
    out = hf_checkpoint.save_params(workdir / "base_model", cfg, base)
    tokenizer.save_pretrained(str(out))
  base = quant.quantize_base(base, qc)
  log(f"created a tiny random LLaMA: {cfg.num_params() / 1e6:.2f}M parameters, "
      f"vocab {cfg.vocab_size}" + (f", projections {qc.describe()}" if qc.active else ""))
  return cfg, graphdef, base


def aggregator_for(config, alg, client_noise: float, expected_clients: int) -> Aggregator:
  """alg's server rule with the config.aggregator fields its factory takes (server_lr 0:
  the factory's own default) and, for client-level DP, config.privacy.client_*."""
  options = {k: config.aggregator[k] for k in alg.option_names()
             if k in config.aggregator and (k != "server_lr" or config.aggregator[k] > 0)}
  if alg.client_dp:
    options.update(clip=group(config, "privacy")["client_clip"], noise_multiplier=client_noise,
                   expected_clients=float(expected_clients))
  return alg.make_aggregator(**options)


def client_config_for(alg, config, example_clip: float, example_noise: float):
  """alg's client behaviour with config.client's settings and DP-SGD's clip and noise."""
  try:
    return alg.client_config(**group(config, "client"), dp_clip=example_clip,
                             dp_noise_multiplier=example_noise,
                             # DP-SGD bounds each example's influence, so each example
                             # weighs the same (a token-weighted mean would not have that
                             # sensitivity)
                             loss_weighting="examples" if example_clip > 0 else "tokens")
  except TypeError as e:  # a field config.client has that ClientConfig does not
    raise ConfigError(f"config.client: {e}") from None


def dp_noise(config, train_sizes: list[int], clients_per_round: int, log
             ) -> tuple[float, float]:
  """(example-level sigma, client-level sigma): as configured, or calibrated so that the
  planned run (every site, with `train_sizes` training examples each, in every round) ends
  at the target epsilon."""
  pv, run = group(config, "privacy"), config.run
  example, client = pv["example_noise"], pv["client_noise"]
  if pv["example_target_epsilon"] > 0:
    per_step = run.batch_size * run.accumulation
    try:
      example = max(accounting.calibrate_noise(
          pv["example_target_epsilon"], min(1.0, per_step / n),
          steps_per_round(n, run.batch_size, run.accumulation, run.epochs)
          * run.rounds, pv["delta"]) for n in train_sizes)
    except ValueError as e:
      raise ConfigError(f"config.privacy.example_target_epsilon="
                        f"{pv['example_target_epsilon']}: cannot calibrate DP-SGD noise ({e})"
                        ) from None
    log(f"DP-SGD: noise multiplier {example:.4f} gives every site epsilon <= "
        f"{pv['example_target_epsilon']} at delta {pv['delta']} after {run.rounds} rounds")
  if pv["client_target_epsilon"] > 0:
    try:
      client = accounting.calibrate_noise(pv["client_target_epsilon"],
                                          clients_per_round / len(train_sizes), run.rounds,
                                          pv["delta"])
    except ValueError as e:
      raise ConfigError(f"config.privacy.client_target_epsilon="
                        f"{pv['client_target_epsilon']}: cannot calibrate DP-FedAvg noise ({e})"
                        ) from None
    log(f"DP-FedAvg: noise multiplier {client:.4f} gives client-level epsilon <= "
        f"{pv['client_target_epsilon']} at delta {pv['delta']} after {run.rounds} rounds")
  return example, client


@dataclasses.dataclass(frozen=True)
class Parts:
  """What a config makes of a federation besides its data and base: the pieces the
  simulator, the deployed server and every deployed site build the same way."""
  algorithm: Algorithm
  run: RunConfig
  spec: LoraSpec
  local_spec: LoraSpec | None
  client: ClientConfig
  aggregator: Aggregator
  security: SecurityConfig
  site_ranks: list[int]       # per-site ranks (hetero-rank algorithms), else []
  clients_per_round: int      # M, the sites sampled each round
  example_noise: float        # DP-SGD's noise multiplier (as set or calibrated)


def federation_parts(config, model_cfg: LlamaConfig, train_sizes: list[int],
                     site_names: list[str], has_workdir: bool, log=print) -> Parts:
  """config's algorithm, adapters, client and server rules and security settings for a
  federation of `site_names` with `train_sizes` training examples each (ConfigError names
  the field)."""
  alg = get_algorithm(config.algorithm)
  lc = config.lora
  ranks = list(lc.site_ranks or ()) if alg.hetero_ranks else []
  pv, sec, ft = group(config, "privacy"), group(config, "security"), group(config, "faults")
  run = run_config(config)
  n = len(site_names)
  m = run.clients_per_round or (max(1, round(run.client_fraction * n))
                                if run.client_fraction else n)
  example_noise, client_noise = dp_noise(config, train_sizes, m, log)
  try:
    spec = lora_spec(lc)
    local_spec = lora_spec(lc, local=True) if alg.local_adapter else None
    spec.layer_indices(model_cfg.num_layers)
    client = client_config_for(alg, config, pv["example_clip"], example_noise)
    aggregator = aggregator_for(config, alg, client_noise, m)
    plan = faults_lib.parse_faults(ft["sites"], site_names, ft["scale"], ft["start_round"])
  except ValueError as e:
    raise ConfigError(str(e)) from None
  ledger = bool(sec["ledger"]) and has_workdir
  if sec["ledger"] and not has_workdir:
    log("security.ledger is off for this federation: it has no workdir")
  security = SecurityConfig(
      ledger=ledger, keep_uploads=ledger and bool(sec["keep_uploads"]),
      max_update_norm=sec["max_update_norm"],
      secure_aggregation=sec["secure_aggregation"], secagg_frac_bits=sec["secagg_frac_bits"],
      secagg_threshold=sec["secagg_threshold"], faults=plan, dp_delta=pv["delta"],
      client_dp_noise=client_noise, config_hash=config_hash(config))
  return Parts(alg, run, spec, local_spec, client, aggregator, security, ranks, m,
               example_noise)


def build(config, workdir: str | None = None, log: Callable[[str], None] = print,
          mesh=None, data: prepare.PreparedData | None = None, model=None,
          sites: list[SiteData] | None = None, hooks=()) -> Federation:
  """A Federation for `config`.

  `data` reuses already prepared sites (tests, sweeps); `model` = (LlamaConfig, graphdef,
  base) reuses a loaded base; `sites` replaces the data's training sites (evaluation
  baselines: one site alone, or all of them pooled); `hooks` run every eval_every rounds.
  """
  check_config(config)
  workdir = Path(workdir) if workdir else None
  alg = get_algorithm(config.algorithm)
  if data is None:
    data = prepare_data(config, workdir / "data" if workdir else None, log)
  tokenizer = data.tokenizer
  if sites is None:
    sites = [SiteData(n, data.arrays[n]["train"], data.arrays[n].get("dev"))
             for n, s in data.sites.items() if s.role == "train"]
  train_sites = [s.name for s in sites]
  model_cfg, graphdef, base = model or load_model(config, len(tokenizer), workdir, tokenizer,
                                                  log)
  parts = federation_parts(config, model_cfg, [len(s.train) for s in sites], train_sites,
                           workdir is not None, log)
  m, security = parts.clients_per_round, parts.security
  if mesh is None:
    try:
      mesh = mesh_lib.make_mesh(config.mesh.clients, config.mesh.fsdp, num_clients=m)
    except ValueError as e:
      raise ConfigError(f"config.mesh: {e}") from None
  base = mesh_lib.shard_base(base, mesh)
  log(f"{len(sites)} training sites ({', '.join(train_sites)}); algorithm {config.algorithm}; "
      f"mesh {dict(mesh.shape)} on {jax.devices()[0].platform}")
  fed = Federation(graphdef, base, model_cfg, sites, alg, parts.aggregator, parts.client,
                   parts.spec, parts.run, local_spec=parts.local_spec,
                   site_ranks=parts.site_ranks or None, mode=config.mode,
                   gamma=config.aggregator.gamma, temperature=config.aggregator.temperature,
                   keep_optimizer_state=config.keep_optimizer_state,
                   workdir=str(workdir) if workdir else None, log=log,
                   place=mesh_lib.client_placer(mesh), hooks=hooks, security=security,
                   special_token_ids=(tokenizer.bos_token_id, tokenizer.eos_token_id,
                                      tokenizer.pad_token_id),
                   vocab_size=len(tokenizer))
  fed.data = data  # the prepared sites (test examples for evaluation hooks)
  return fed


# Fields a resumed run may change without becoming another run: how long it goes on, how
# often and how much it evaluates, how many checkpoints it keeps.
RESUMABLE_FIELDS = (("run", "rounds"), ("run", "eval_every"), ("run", "keep_last"),
                    ("run", "best_metric"), ("run", "best_mode"), ("eval",))


def config_hash(config) -> str:
  """SHA-256 of the config's canonical JSON without RESUMABLE_FIELDS (what the ledger's
  genesis block commits to). run.rounds stays in when a target epsilon is set: it decides
  the calibrated noise, so changing it changes the run."""
  tree = json.loads(config.to_json_best_effort())
  pv = tree.get("privacy", {})
  targets = pv.get("example_target_epsilon", 0) or pv.get("client_target_epsilon", 0)
  for path in RESUMABLE_FIELDS:
    if path == ("run", "rounds") and targets:
      continue
    node = tree
    for key in path[:-1]:
      node = node.get(key, {})
    node.pop(path[-1], None)
  text = json.dumps(tree, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()
