"""From a federate config to a ready `Federation` (data, model, adapters, aggregator, mesh).

Every setting is checked here, before anything is trained, so a bad config fails in
seconds with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_lora import aggregators as agg_lib
from fedjax_lora import mesh as mesh_lib
from fedjax_lora.algorithms import ALGORITHMS, get_algorithm
from fedjax_lora.client import ClientConfig
from fedjax_lora.data import prepare
from fedjax_lora.simulator import ConfigError, Federation, RunConfig, SiteData
from models import hf_checkpoint, llama
from models.config import LlamaConfig
from models.lora import LoraSpec

# Which config.aggregator fields each aggregator takes.
AGGREGATOR_OPTIONS = {
    "fedavgm": ("server_lr", "momentum"),
    "fedadam": ("server_lr", "beta1", "beta2", "tau"),
    "fedyogi": ("server_lr", "beta1", "beta2", "tau"),
    "fedadagrad": ("server_lr", "beta1", "tau"),
    "scaffold": ("server_lr",),
    "trimmed_mean": ("trim",),
    "norm_clip": ("max_norm",),
}


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
  if ranks and len(set(ranks)) > 1 and not alg.hetero_ranks:
    raise ConfigError(f"config.lora.site_ranks={ranks} differ, but {config.algorithm} averages "
                      "factors of one shape; use flora, flexlora or hetlora")
  if config.mode not in ("vmap", "sequential"):
    raise ConfigError(f"config.mode must be 'vmap' or 'sequential', got {config.mode!r}")


def _model(config, vocab_size: int, workdir: Path | None, tokenizer, log):
  m = config.model
  dtype = m.dtype
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype must be float32 or bfloat16, got {dtype!r}")
  if m.path:
    cfg, graphdef, base = hf_checkpoint.load_params(m.path, log=log)
    if cfg.vocab_size < vocab_size:
      raise ConfigError(f"config.model.path: vocabulary {cfg.vocab_size} is smaller than the "
                        f"tokenizer's {vocab_size}; use the checkpoint's tokenizer")
    return cfg, graphdef, base
  padded = int(math.ceil(vocab_size / 64) * 64)
  cfg = LlamaConfig(vocab_size=padded, hidden_size=m.hidden_size,
                    intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                    num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                    head_dim=m.hidden_size // m.num_heads, max_position_embeddings=4096,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id or 0, param_dtype=dtype, dtype=dtype,
                    remat=m.remat, attention_impl=m.attention_impl or None)
  graphdef, base = llama.init_model(cfg, seed=config.run.seed)
  if workdir is not None:  # keep the base so the exported adapter has something to load onto
    out = hf_checkpoint.save_params(workdir / "base_model", cfg, base)
    tokenizer.save_pretrained(str(out))
  log(f"created a tiny random LLaMA: {cfg.num_params() / 1e6:.2f}M parameters, vocab {padded}")
  return cfg, graphdef, base


def _aggregator(config) -> agg_lib.Aggregator:
  name = get_algorithm(config.algorithm).aggregator
  options = {k: config.aggregator[k] for k in AGGREGATOR_OPTIONS.get(name, ())}
  return agg_lib.get_aggregator(name, **options)


def build(config, workdir: str | None = None, log: Callable[[str], None] = print,
          mesh=None, data: prepare.PreparedData | None = None) -> Federation:
  """A Federation for `config`; `data` reuses already prepared sites (tests, sweeps)."""
  check_config(config)
  workdir = Path(workdir) if workdir else None
  alg = get_algorithm(config.algorithm)
  if data is None:
    data = prepare.prepare(config.data, workdir / "data" if workdir else None, log=log)
  tokenizer = data.tokenizer
  train_sites = [n for n, s in data.sites.items() if s.role == "train"]
  sites = [SiteData(n, data.arrays[n]["train"], data.arrays[n].get("dev")) for n in train_sites]
  model_cfg, graphdef, base = _model(config, len(tokenizer), workdir, tokenizer, log)
  lc = config.lora
  layers = tuple(lc.layers) or None
  ranks = list(lc.site_ranks or ())
  rank = max(ranks) if ranks else lc.rank
  try:
    spec = LoraSpec(rank=rank, alpha=lc.alpha, targets=lc.targets, layers=layers)
    local_spec = (LoraSpec(rank=lc.local_rank, alpha=lc.local_alpha, targets=lc.targets,
                           layers=layers) if alg.local_adapter else None)
    spec.layer_indices(model_cfg.num_layers)
    client = ClientConfig(learning_rate=config.client.learning_rate,
                          warmup_fraction=config.client.warmup_fraction,
                          schedule=config.client.schedule,
                          weight_decay=config.client.weight_decay,
                          grad_clip=config.client.grad_clip, train_factors=alg.train_factors,
                          prox_mu=config.client.prox_mu if alg.prox else 0.0,
                          scaffold=alg.scaffold)
    aggregator = _aggregator(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  run = RunConfig(**config.run.to_dict())
  if mesh is None:
    mesh = mesh_lib.make_mesh(config.mesh.clients, config.mesh.fsdp,
                              num_clients=run.clients_per_round or len(sites))
  base = mesh_lib.shard_base(base, mesh)
  log(f"{len(sites)} training sites ({', '.join(train_sites)}); algorithm {config.algorithm}; "
      f"mesh {dict(mesh.shape)} on {jax.devices()[0].platform}")
  return Federation(graphdef, base, model_cfg, sites, alg, aggregator, client, spec, run,
                    local_spec=local_spec, site_ranks=ranks or None, mode=config.mode,
                    gamma=config.aggregator.gamma, temperature=config.aggregator.temperature,
                    keep_optimizer_state=config.keep_optimizer_state,
                    workdir=str(workdir) if workdir else None, log=log,
                    place=mesh_lib.client_placer(mesh))
