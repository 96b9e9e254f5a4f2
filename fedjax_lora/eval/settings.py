"""The paper's experiment settings, trained and scored in one run (`launch.evaluate`).

Settings (each a row of the report):
- `zero_shot`: the base model (an adapter with B = 0, which is exactly the base).
- `single_site`: each training site trains alone with the federated budget (same rounds,
  epochs, optimiser) and is scored on its own test split.
- `centralized`: every training site's data pooled into one client (the upper reference).
- `federated/<algorithm>`: a federated run of each algorithm in `eval.algorithms`, with
  the per-round evaluation hook and plots.
- `new_site/<start>/k=<k>`: the new site (role `new_site`, held out of federated
  training) fine-tunes on its first k training examples, starting from the federated
  adapter (`from_federated`) or from a fresh one (`from_scratch`); k = 0 is no training.
Training sites are scored on their test splits (in-domain); sites with role `external`
(never trained on) and the new site on theirs (external validation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from fedjax_lora import experiment, files
from fedjax_lora.data.encoding import SiteArrays
from fedjax_lora.eval import plots, report
from fedjax_lora.compile_meter import CompileMeter
from fedjax_lora.eval.decoding import DecodeConfig, Decoder
from fedjax_lora.eval.evaluator import aggregate_sites, eval_sets, evaluate_sets
from fedjax_lora.eval.hooks import hook_from_config, site_models
from fedjax_lora.simulator import ConfigError, SiteData
from models import lora

SETTINGS = ("zero_shot", "single_site", "centralized", "federated", "new_site")
BASELINE_ALGORITHM = "fedavg"  # one client: FedAvg is plain local training


def decode_config(ev) -> DecodeConfig:
  try:
    return DecodeConfig(batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                        new_tokens_factor=ev.new_tokens_factor,
                        new_tokens_margin=ev.new_tokens_margin, temperature=ev.temperature,
                        seed=ev.seed)
  except ValueError as e:
    raise ConfigError(f"config.eval: {e}") from None


def check_eval_config(config) -> None:
  ev = config.eval
  unknown = set(ev.settings) - set(SETTINGS)
  if unknown:
    raise ConfigError(f"config.eval.settings: unknown {sorted(unknown)}; choose from {SETTINGS}")
  for alg in ev.algorithms:
    c = copy.deepcopy(config)
    c.algorithm = alg
    experiment.check_config(c)  # names the field on failure
  if "federated" in ev.settings and not ev.algorithms:
    raise ConfigError("config.eval.algorithms is empty but the federated setting is on")
  if any(int(k) < -1 for k in ev.adapt_k):
    raise ConfigError(f"config.eval.adapt_k: use k >= 0, or -1 for all, got {tuple(ev.adapt_k)}")
  if ev.adapt_from and ev.adapt_from not in ev.algorithms:
    raise ConfigError(f"config.eval.adapt_from={ev.adapt_from!r} is not in config.eval."
                      f"algorithms={tuple(ev.algorithms)}")
  if ev.max_examples_per_task < 0 or ev.round_examples_per_task < 0:
    raise ConfigError("config.eval.max_examples_per_task and round_examples_per_task must "
                      "be >= 0 (0 = all / off)")
  decode_config(ev)


def take_rows(arrays: SiteArrays, n: int) -> SiteArrays:
  """The first n examples (training splits are already shuffled when built)."""
  return dataclasses.replace(arrays, tokens=arrays.tokens[:n],
                             attention_mask=arrays.attention_mask[:n],
                             loss_mask=arrays.loss_mask[:n],
                             prompt_lengths=arrays.prompt_lengths[:n],
                             truncated=0, without_targets=0)  # not tracked per row


def pool(arrays: list[SiteArrays]) -> SiteArrays:
  """All rows of several sites, padded to the longest length (centralized training)."""
  length = max(a.tokens.shape[1] for a in arrays)

  def pad(x, fill=0):
    return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=fill)
  return SiteArrays(np.concatenate([pad(a.tokens) for a in arrays]),
                    np.concatenate([pad(a.attention_mask) for a in arrays]),
                    np.concatenate([pad(a.loss_mask) for a in arrays]),
                    np.concatenate([a.prompt_lengths for a in arrays]),
                    sum(a.truncated for a in arrays), sum(a.without_targets for a in arrays))


class SettingsRun:
  """Prepares data and the base model once, then trains and scores each setting."""

  def __init__(self, config, workdir: str | Path, log: Callable[[str], None] = print):
    check_eval_config(config)
    self.config, self.ev, self.log = config, config.eval, log
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.data = experiment.prepare_data(config, self.workdir / "data", log)
    tok = self.data.tokenizer
    self.model = experiment.load_model(config, len(tok), self.workdir, tok, log)
    model_cfg, graphdef, _ = self.model
    self.decoder = Decoder(model_cfg, graphdef, self.data.renderer, decode_config(self.ev),
                           log=log)
    roles = {n: s.role for n, s in self.data.sites.items()}
    self.train = [n for n, r in roles.items() if r == "train"]
    self.external = [n for n, r in roles.items() if r == "external"]
    self.new_sites = [n for n, r in roles.items() if r == "new_site"]
    if not self.train:
      raise ConfigError("config.data has no site with role 'train'")
    self.sets = {n: eval_sets(n, s.examples["test"], self.ev.max_examples_per_task)
                 for n, s in self.data.sites.items() if s.examples.get("test")}
    missing = [n for n in self.train + self.external + self.new_sites if n not in self.sets]
    if missing:
      raise ConfigError(f"sites {missing} have no test split to evaluate on (config.data."
                        "sites.<name>.test_split)")
    self.results: dict[str, Any] = {
        "config": json.loads(config.to_json_best_effort()), "roles": roles,
        "evaluated": {n: {t: {"scored": len(es.examples), "available": es.available}
                          for t, es in by.items()} for n, by in self.sets.items()},
        "settings": {}, "seconds": {}, "runs": {}}
    self.federated_params: dict[str, Any] = {}

  # ---- helpers -----------------------------------------------------------------------------
  def _config(self, algorithm: str, **run):
    c = copy.deepcopy(self.config)
    c.algorithm = algorithm
    for k, v in run.items():
      c.run[k] = v
    return c

  def _site(self, name: str, rows: int = -1) -> SiteData:
    arrays = self.data.arrays[name]
    train = arrays["train"] if rows < 0 else take_rows(arrays["train"], rows)
    return SiteData(name, train, arrays.get("dev"))

  def _train(self, config, sites: list[SiteData], workdir: Path | None = None, hooks=(),
             start=None, base=None):
    """Trains `sites` under `config`; `start` replaces the initial global adapter and
    `base` the base weights (FLoRA's merged base, to continue from its federated model)."""
    if any(s.dev is None or not len(s.dev) for s in sites):
      config.run.val_examples_per_site = 0  # a site without dev: no server validation set
    model = self.model if base is None else (self.model[0], self.model[1], base)
    fed = experiment.build(config, workdir, log=self.log, data=self.data, model=model,
                           sites=sites, hooks=hooks)
    if start is not None:
      fed.set_global(start)
    fed.run_rounds()
    return fed

  def _score(self, name: str, base, adapters_for, sites: list[str]) -> dict:
    res = evaluate_sets(self.decoder, base, adapters_for, {s: self.sets[s] for s in sites},
                        label=name)
    self.results["settings"][name] = res
    self.log(report.summary_line(name, res))
    self.save()
    return res

  def _zero_adapter(self):
    lc = self.config.lora
    spec = lora.LoraSpec(rank=lc.rank, alpha=lc.alpha, targets=lc.targets,
                         layers=tuple(lc.layers) or None)
    return [lora.init_adapter(self.model[0], spec, jax.random.key(0))]  # B = 0: the base

  # ---- settings ----------------------------------------------------------------------------
  def zero_shot(self):
    zero = self._zero_adapter()
    self._score("zero_shot", self.model[2], lambda s: zero,
                self.train + self.external + self.new_sites)

  def single_site(self):
    per_site = {}
    for name in self.train:
      self.log(f"== single_site: {name} trains alone")
      fed = self._train(self._config(BASELINE_ALGORITHM), [self._site(name)])
      res = evaluate_sets(self.decoder, fed.effective_base(), site_models(fed),
                          {name: self.sets[name]}, label=f"single_site {name}")
      per_site[name] = res["sites"][name]
    res = {"sites": per_site, "aggregate": aggregate_sites(per_site)}
    self.results["settings"]["single_site"] = res
    self.log(report.summary_line("single_site", res))
    self.save()

  def centralized(self):
    self.log("== centralized: all training sites pooled into one client")
    arrays = [self.data.arrays[n] for n in self.train]
    devs = [a["dev"] for a in arrays if a.get("dev") is not None]
    site = SiteData("centralized", pool([a["train"] for a in arrays]),
                    pool(devs) if devs else None)
    fed = self._train(self._config(BASELINE_ALGORITHM), [site])
    self._score("centralized", fed.effective_base(), lambda s: fed.global_adapters(),
                self.train + self.external + self.new_sites)

  def federated(self):
    for alg in self.ev.algorithms:
      self.log(f"== federated: {alg}")
      run_dir = self.workdir / "runs" / alg
      if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)  # a rerun of launch.evaluate starts this run afresh
      run_dir.mkdir(parents=True)
      hook = hook_from_config(self.config, self.data, self.decoder, self.train)
      fed = self._train(self._config(alg), [self._site(n) for n in self.train], run_dir,
                        hooks=[hook])
      self.results["runs"][alg] = {"history": fed.history,
                                   "plots": [str(p) for p in plots.plot_workdir(run_dir, alg)]}
      self._score(f"federated/{alg}", fed.effective_base(), site_models(fed),
                  self.train + self.external + self.new_sites)
      self.federated_params[alg] = (fed.global_adapters()[0].params, fed.effective_base())

  def new_site(self):
    if not self.new_sites:
      self.log("== new_site: no site has role 'new_site'; skipped")
      return
    source = self.ev.adapt_from or (self.ev.algorithms[0] if self.ev.algorithms else "")
    starts = {"from_scratch": None}
    if source in self.federated_params:
      starts = {"from_federated": self.federated_params[source], **starts}
    else:
      self.log("== new_site: no federated adapter to start from (run the federated setting); "
               "only from_scratch")
    zero = self._zero_adapter()
    rounds = self.ev.adapt_rounds or self.config.run.rounds
    for name in self.new_sites:
      available = len(self.data.arrays[name]["train"])
      for start, state in starts.items():
        params, base = state if state else (None, self.model[2])
        for k in self.ev.adapt_k:
          k = int(k)
          rows = available if k < 0 or k > available else k
          tag = f"new_site/{start}/k={'all' if k < 0 else k}"
          if k > available:
            self.log(f"{tag}: only {available} training examples at {name}; using all")
          if rows == 0:
            adapters = zero if params is None else [lora.LoraAdapter(params, zero[0].spec)]
            self._score(tag, base, lambda s, a=adapters: a, [name])
          else:
            self.log(f"== {tag}: {name} fine-tunes on {rows} examples")
            fed = self._train(self._config(BASELINE_ALGORITHM, rounds=rounds),
                              [self._site(name, rows)], start=params,
                              base=None if params is None else base)
            self._score(tag, fed.effective_base(), lambda s, f=fed: f.global_adapters(), [name])
          self.results["settings"][tag]["train_examples"] = rows

  # ---- driver ------------------------------------------------------------------------------
  def run(self) -> dict:
    order = [s for s in ("zero_shot", "federated", "single_site", "centralized", "new_site")
             if s in self.ev.settings]
    meter, start = CompileMeter(), time.perf_counter()
    for setting in order:
      t0 = time.perf_counter()
      getattr(self, setting)()
      self.results["seconds"][setting] = round(time.perf_counter() - t0, 2)
    wall = time.perf_counter() - start
    self.results["compile"] = {"seconds": round(meter.seconds, 2),
                               "compilations": meter.compilations,
                               "wall_seconds": round(wall, 2),
                               "fraction_of_wall": round(meter.seconds / max(wall, 1e-9), 4)}
    self.log(f"compiling took {meter.seconds:.1f} s of {wall:.1f} s "
             f"({100 * meter.seconds / max(wall, 1e-9):.1f}%, {meter.compilations} programs)")
    self.results["generation"] = self.decoder.total.to_dict()
    self.save()
    return self.results

  def save(self) -> None:
    """results.json and results.md, rewritten after every setting (a crash keeps them)."""
    files.write_atomic(self.workdir / "results.json",
                       json.dumps(self.results, indent=1, default=_json_default))
    (self.workdir / "results.md").write_text(
        report.markdown(self.results, self.train, self.external, self.new_sites))


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, set):
    return sorted(x)
  return str(x)
