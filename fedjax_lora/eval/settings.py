"""The paper's experiment settings, trained and scored in one run (`launch.evaluate`).

Settings (each a row of the report; a setting's tag is its key in results.json):
- `zero_shot`: the base model (an adapter with B = 0, which is exactly the base).
- `federated/<algorithm>`: a federated run of each algorithm in `eval.algorithms`, with
  the per-round evaluation hook and plots.
- `faulty/<algorithm>`: the same with the faulty sites of `eval.fault_sites` (e.g. one
  `label_flip` site), for each of `eval.fault_algorithms`; scored in-domain.
- `val_size/<n>`: Fed-MedLoRA+ with n server validation records per site (with the
  faults of `eval.fault_sites`), for each n of `eval.val_sizes`; scored in-domain (the n
  of `run.val_examples_per_site` reuses `faulty/fedmedlora_plus`, the same run).
- `single_site/<site>`: each training site trains alone with the federated budget (same
  rounds, epochs, optimiser), scored on its own test split (`eval.single_site_scope`
  "own"), also on the external and new sites ("own_and_held_out"), or on every site
  ("all", for generalization to the other training sites); the `single_site` row
  gathers each site's own model on its own test split.
- `centralized`: every training site's data pooled into one client (the upper reference).
- `new_site/<start>/k=<k>`: the new site (role `new_site`, held out of federated
  training) fine-tunes on its first k training examples, starting from the federated
  adapter (`from_federated`) or from a fresh one (`from_scratch`); k = 0 is no training.
Training sites are scored on their test splits (in-domain); sites with role `external`
(never trained on) and the new site on theirs (external validation). Every setting is
scored on the same test examples of a site, so comparisons are paired; `claims()` turns
them into the claim table with bootstrap intervals (eval/claims.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from fedjax_lora import comm, experiment, files
from fedjax_lora.data.arrays import pool, take_rows
from fedjax_lora.eval import bootstrap, plots, report
from fedjax_lora.eval import claims as claims_lib
from fedjax_lora.eval import summary_plots
from fedjax_lora.eval.claims import CONTRADICTED, SUPPORTED
from fedjax_lora.compile_meter import CompileMeter
from fedjax_lora.eval.decoding import DecodeConfig, Decoder
from fedjax_lora.eval.evaluator import TASK_NAMES, aggregate_sites, eval_sets, evaluate_sets
from fedjax_lora.eval.hooks import hook_from_config, site_models
from fedjax_lora.errors import ConfigError
from fedjax_lora.simulator import SiteData
from fedjax_lora.translate import lora_spec
from models import lora
from models.config import LlamaConfig

SETTINGS = ("zero_shot", "single_site", "centralized", "federated", "faulty", "val_size",
            "new_site")
SINGLE_SITE_SCOPES = ("own", "own_and_held_out", "all")
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
  if ev.single_site_scope not in SINGLE_SITE_SCOPES:
    raise ConfigError(f"config.eval.single_site_scope must be one of {SINGLE_SITE_SCOPES}, "
                      f"got {ev.single_site_scope!r}")
  if any(int(n) < 1 for n in ev.val_sizes):
    raise ConfigError(f"config.eval.val_sizes: use sizes >= 1, got {tuple(ev.val_sizes)}")
  if "faulty" in ev.settings and not (ev.fault_sites and ev.fault_algorithms):
    raise ConfigError("config.eval.settings has 'faulty' but config.eval.fault_sites or "
                      "fault_algorithms is empty")
  checked = list(ev.fault_algorithms) if "faulty" in ev.settings else []
  checked += ["fedmedlora_plus"] if "val_size" in ev.settings and ev.val_sizes else []
  for alg in checked:
    c = copy.deepcopy(config)
    c.algorithm, c.faults.sites = alg, ev.fault_sites
    experiment.check_config(c)  # names the faulty site or kind on failure
  new_sites = [n for n, site in config.data.sites.items() if site.get("role") == "new_site"]
  if "new_site" in ev.settings and len(new_sites) > 1:
    raise ConfigError(f"config.data.sites: {new_sites} all have role 'new_site'; the new_site "
                      "setting adapts one held-out site (give the others role 'external')")
  if ev.bootstrap_replicates < 1:
    raise ConfigError(f"config.eval.bootstrap_replicates must be >= 1, got "
                      f"{ev.bootstrap_replicates}")
  if not 0 <= ev.close_margin < 1:
    raise ConfigError(f"config.eval.close_margin is in F1 units (0.05 = 5 points), got "
                      f"{ev.close_margin}")
  if ev.max_examples_per_task < 0 or ev.round_examples_per_task < 0:
    raise ConfigError("config.eval.max_examples_per_task and round_examples_per_task must "
                      "be >= 0 (0 = all / off)")
  decode_config(ev)


class SettingsRun:
  """Prepares data and the base model once, then trains and scores each setting.

  Resumable: every finished setting is written to workdir/results.json at once (with the
  global adapter of each federated run in workdir/adapters/, which later settings start
  from), and a rerun with the same workdir and config skips what is done. A workdir holding
  results of another config is refused, naming the fields that differ.
  """

  def __init__(self, config, workdir: str | Path, log: Callable[[str], None] = print,
               report_only: bool = False):
    """`report_only`: this process only rewrites the summaries (`report`), so it is not
    counted as a part of the run."""
    check_eval_config(config)
    self.report_only = report_only
    self.config, self.ev, self.log = config, config.eval, log
    self._trained, self._started = None, time.perf_counter()  # the setting being run
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    config_json = json.loads(config.to_json_best_effort())
    previous = self._previous(config_json)
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
        "config": config_json, "roles": roles,
        "evaluated": {n: {t: {"scored": len(es.examples), "available": es.available,
                              "documents": [e.document or e.doc_id for e in es.examples]}
                          for t, es in by.items()} for n, by in self.sets.items()},
        "settings": {}, "seconds": {}, "runs": {}}
    self.results["parts"] = []
    if previous:
      for key in ("settings", "seconds", "runs"):
        self.results[key] = previous.get(key, {})
      self.results["parts"] = previous.get("parts", [])
      log(f"resuming {self.workdir / 'results.json'}: {len(self.results['settings'])} "
          "settings already done are skipped")
    if not report_only:
      self.results["parts"].append({})
    self.meter, self._begun = CompileMeter(), time.perf_counter()

  def _previous(self, config_json: dict) -> dict | None:
    """The results of an earlier run in this workdir, if its config is this one."""
    path = self.workdir / "results.json"
    if not path.is_file():
      return None
    try:
      previous = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not readable JSON ({e.msg}, line {e.lineno}); move it away "
                        "to start afresh") from None
    old, new = (_trained_part(c) for c in (previous.get("config", {}), config_json))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
      raise ConfigError(f"{path} holds results of another config (fields {differ} differ); "
                        "use a new --workdir, or the same config to resume")
    return previous

  # ---- helpers -----------------------------------------------------------------------------
  def _config(self, algorithm: str, faults: str = "", **run):
    c = copy.deepcopy(self.config)
    c.algorithm = algorithm
    c.faults.sites = faults
    for k, v in run.items():
      c.run[k] = v
    return c

  def _site(self, name: str, rows: int = -1) -> SiteData:
    arrays = self.data.arrays[name]
    train = arrays["train"] if rows < 0 else take_rows(arrays["train"], rows)
    return SiteData(name, train, arrays.get("dev"))

  def _train(self, config, sites: list[SiteData], workdir: Path | None = None, hooks=(),
             start=None):
    """Trains `sites` under `config`; `start` replaces the initial global adapter."""
    if any(s.dev is None or not len(s.dev) for s in sites):
      config.run.val_examples_per_site = 0  # a site without dev: no server validation set
    t0 = time.perf_counter()
    fed = experiment.build(config, workdir, log=self.log, data=self.data, model=self.model,
                           sites=sites, hooks=hooks)
    if start is not None:
      fed.set_global(start)
    fed.run_rounds()
    self._trained = training_summary(config, sites, fed.history, time.perf_counter() - t0)
    return fed

  def _done(self, tag: str) -> bool:
    """True (and says so) when an earlier run finished `tag`; otherwise starts its clock."""
    if tag in self.results["settings"]:
      self.log(f"== {tag}: done in an earlier run; skipped")
      return True
    self._trained = None
    self._started = time.perf_counter()
    return False

  def _score(self, name: str, base, adapters_for, sites: list[str]) -> dict:
    res = evaluate_sets(self.decoder, base, adapters_for, {s: self.sets[s] for s in sites},
                        label=name)
    if self._trained:
      res["training"] = self._trained
    res["seconds"] = round(time.perf_counter() - self._started, 2)
    self.results["settings"][name] = res
    self.log(report.summary_line(name, res) + f" ({res['seconds']:.0f} s)")
    self.save()
    return res

  def _reuse(self, tag: str, source: str, sites: list[str]) -> dict:
    """`source`'s scores on `sites` under the name `tag`: the same model on the same examples
    (greedy decoding is deterministic), so decoding them again would only cost time."""
    per_site = {s: self.results["settings"][source]["sites"][s] for s in sites}
    res = {"sites": per_site, "aggregate": aggregate_sites(per_site), "reused_from": source,
           "seconds": 0.0}
    self.results["settings"][tag] = res
    self.log(report.summary_line(tag, res) + f" (the scores of {source})")
    return res

  def _zero_adapter(self):
    spec = lora_spec(self.config.lora)
    return [lora.init_adapter(self.model[0], spec, jax.random.key(0))]  # B = 0: the base

  def _everywhere(self) -> list[str]:
    return self.train + self.external + self.new_sites

  def _federated(self, tag: str, alg: str, faults: str = "", hooks: bool = True,
                 scored: list[str] | None = None, **run) -> None:
    """One federated run of `alg` over the training sites, scored; its global adapter is
    kept in workdir/adapters/<tag>.msgpack for the settings that start from it."""
    if self._done(tag):
      return
    self.log(f"== {tag}: {alg}" + (f" with faults {faults}" if faults else ""))
    run_dir = self.workdir / "runs" / tag
    if run_dir.exists():
      shutil.rmtree(run_dir)  # a run cut short: start it afresh
    run_dir.mkdir(parents=True)
    config = self._config(alg, faults, **run)
    hook = [hook_from_config(config, self.data, self.decoder, self.train)] if hooks else []
    fed = self._train(config, [self._site(n) for n in self.train], run_dir, hooks=hook)
    self.results["runs"][tag] = {
        "history": fed.history,
        "plots": [str(p) for p in plots.plot_workdir(run_dir, tag)] if hooks else []}
    if not fed.algorithm.merge_base:  # the stored adapter alone reproduces the model
      save_adapter(self.workdir / "adapters" / f"{_file_name(tag)}.msgpack",
                   fed.global_adapters()[0].params)
    self._score(tag, fed.effective_base(), site_models(fed), scored or self._everywhere())

  # ---- settings ----------------------------------------------------------------------------
  def zero_shot(self):
    if self._done("zero_shot"):
      return
    zero = self._zero_adapter()
    self._score("zero_shot", self.model[2], lambda s: zero, self._everywhere())

  def federated(self):
    for alg in self.ev.algorithms:
      self._federated(f"federated/{alg}", alg)

  def faulty(self):
    """Each of eval.fault_algorithms with the faulty sites of eval.fault_sites (in-domain)."""
    for alg in self.ev.fault_algorithms:
      self._federated(f"faulty/{alg}", alg, self.ev.fault_sites, hooks=False,
                      scored=self.train)

  def val_size(self):
    """Fed-MedLoRA+ with n server validation records per site, for n in eval.val_sizes
    (with eval.fault_sites' faults, where the weighting has something to do)."""
    same = "faulty/fedmedlora_plus"  # the run with the config's own validation size
    for n in self.ev.val_sizes:
      tag = f"val_size/{int(n)}"
      if (int(n) == self.config.run.val_examples_per_site and same in self.results["settings"]
          and tag not in self.results["settings"]):
        self._reuse(tag, same, list(self.results["settings"][same]["sites"]))
        self.save()
        continue
      self._federated(tag, "fedmedlora_plus", self.ev.fault_sites, hooks=False,
                      scored=self.train, val_examples_per_site=int(n))

  def single_site(self):
    held_out = self.external + self.new_sites
    for name in self.train:
      tag = f"single_site/{name}"
      if self._done(tag):
        continue
      scope = {"own": [name], "own_and_held_out": [name] + held_out,
               "all": self._everywhere()}[self.ev.single_site_scope]
      self.log(f"== {tag}: {name} trains alone")
      fed = self._train(self._config(BASELINE_ALGORITHM), [self._site(name)])
      self._score(tag, fed.effective_base(), site_models(fed), scope)
    # The table row: each site's own model on its own test split.
    per_site = {n: self.results["settings"][f"single_site/{n}"]["sites"][n] for n in self.train}
    self.results["settings"]["single_site"] = {"sites": per_site,
                                               "aggregate": aggregate_sites(per_site)}
    self.save()

  def centralized(self):
    if self._done("centralized"):
      return
    self.log("== centralized: all training sites pooled into one client")
    arrays = [self.data.arrays[n] for n in self.train]
    devs = [a["dev"] for a in arrays if a.get("dev") is not None]
    site = SiteData("centralized", pool([a["train"] for a in arrays]),
                    pool(devs) if devs else None)
    fed = self._train(self._config(BASELINE_ALGORITHM), [site])
    self._score("centralized", fed.effective_base(), lambda s: fed.global_adapters(),
                self._everywhere())

  def new_site(self):
    if not self.new_sites:
      self.log("== new_site: no site has role 'new_site'; skipped")
      return
    source = "federated/" + (self.ev.adapt_from or
                             (self.ev.algorithms[0] if self.ev.algorithms else ""))
    path = self.workdir / "adapters" / f"{_file_name(source)}.msgpack"
    starts = {"from_scratch": None}
    zero = self._zero_adapter()
    if path.is_file():
      starts = {"from_federated": load_adapter(path, zero[0].params), **starts}
    else:
      self.log(f"== new_site: no federated adapter at {path} (run the federated setting of "
               f"{source}; algorithms that merge into the base are not kept); only "
               "from_scratch")
    rounds = self.ev.adapt_rounds or self.config.run.rounds
    for name in self.new_sites:
      available = len(self.data.arrays[name]["train"])
      for start, params in starts.items():
        for k in self.ev.adapt_k:
          k = int(k)
          rows = available if k < 0 or k > available else k
          tag = f"new_site/{start}/k={'all' if k < 0 else k}"
          if self._done(tag):
            continue
          if k > available:
            self.log(f"{tag}: only {available} training examples at {name}; using all")
          same = "zero_shot" if params is None else source  # k = 0: that setting's model
          if rows == 0 and name in self.results["settings"].get(same, {}).get("sites", {}):
            res = self._reuse(tag, same, [name])
          elif rows == 0:
            adapters = zero if params is None else [lora.LoraAdapter(params, zero[0].spec)]
            res = self._score(tag, self.model[2], lambda s, a=adapters: a, [name])
          else:
            self.log(f"== {tag}: {name} fine-tunes on {rows} examples")
            fed = self._train(self._config(BASELINE_ALGORITHM, rounds=rounds),
                              [self._site(name, rows)], start=params)
            res = self._score(tag, fed.effective_base(), lambda s, f=fed: f.global_adapters(),
                              [name])
          res["train_examples"] = rows
          self.save()

  # ---- driver ------------------------------------------------------------------------------
  def run(self) -> dict:
    """Runs every setting not yet done, then the summaries (`report`)."""
    for setting in [s for s in ORDER if s in self.ev.settings]:
      t0 = time.perf_counter()
      getattr(self, setting)()
      self.results["seconds"][setting] = round(
          self.results["seconds"].get(setting, 0.0) + time.perf_counter() - t0, 2)
    part = self._part()
    self.log(f"compiling took {part['compile_seconds']:.1f} s of {part['wall_seconds']:.1f} s "
             f"({100 * part['compile_seconds'] / max(part['wall_seconds'], 1e-9):.1f}%, "
             f"{part['compilations']} programs)")
    return self.report()

  def report(self) -> dict:
    """Claims, communication and plots from the settings done so far; results written.
    (`launch.evaluate --report_only` calls this alone: nothing is trained.)"""
    self.results["claims"] = self.claims()
    self.results["communication"] = self.communication()
    self.results["plots"] = [str(p) for p in summary_plots.write_summary_plots(
        self.results, self.train, self.external, self.new_sites, self.workdir / "plots")]
    self.save()
    return self.results

  def _part(self) -> dict:
    """This process's share of the run (a resumed run has several): wall time, compile
    time from JAX's compile events, generation throughput; totals over parts beside."""
    wall = time.perf_counter() - self._begun
    self.results["parts"][-1] = part = {
        "wall_seconds": round(wall, 2), "compile_seconds": round(self.meter.seconds, 2),
        "compilations": self.meter.compilations, "generation": self.decoder.total.to_dict()}
    parts = self.results["parts"]
    total_wall = sum(p["wall_seconds"] for p in parts)
    total_compile = sum(p["compile_seconds"] for p in parts)
    self.results["compile"] = {"seconds": round(total_compile, 2),
                               "compilations": sum(p["compilations"] for p in parts),
                               "wall_seconds": round(total_wall, 2),
                               "fraction_of_wall": round(total_compile / max(total_wall, 1e-9), 4),
                               "parts": len(parts)}
    gen = [p["generation"] for p in parts]
    seconds = sum(g["seconds"] for g in gen)
    self.results["generation"] = {
        "prompts": sum(g["prompts"] for g in gen), "new_tokens": sum(g["new_tokens"] for g in gen),
        "seconds": round(seconds, 3), "batches": sum(g["batches"] for g in gen),
        "hit_budget": sum(g["hit_budget"] for g in gen),
        "distinct_shapes": max((g["distinct_shapes"] for g in gen), default=0),
        "tokens_per_second": round(sum(g["tokens_per_second"] * g["seconds"] for g in gen)
                                   / max(seconds, 1e-9), 1)}
    return part

  def communication(self) -> dict:
    """Claim 9: one site's adapter against the full model per round and direction, for this
    base (float32 adapters, as sent here) and, by arithmetic, for eval.comm_shapes at rank
    eval.comm_rank in eval.comm_dtype_bytes bytes; plus the bytes measured in the first
    federated run."""
    lc, ev = self.config.lora, self.ev
    spec = lora_spec(lc)
    arithmetic = {"this base": {**comm.adapter_traffic(self.model[0], spec, 4),
                                "lora": f"r={lc.rank}, {lc.targets}, float32"}}
    wide = lora.LoraSpec(rank=ev.comm_rank, alpha=2.0 * ev.comm_rank, targets=lc.targets)
    for name, shape in ev.comm_shapes.items():
      cfg = LlamaConfig(**dict(shape))
      arithmetic[name] = {**comm.adapter_traffic(cfg, wide, ev.comm_dtype_bytes),
                          "lora": f"r={ev.comm_rank}, {lc.targets}, {ev.comm_dtype_bytes} bytes"}
    out: dict[str, Any] = {"arithmetic": arithmetic}
    for tag, run in self.results["runs"].items():
      rows = [r for r in run.get("history", []) if r.get("comm", {}).get("present_clients")]
      if rows:
        c = rows[0]["comm"]
        out["measured"] = {"setting": tag,
                           "up_bytes": c["total_up_bytes"] // c["present_clients"],
                           "down_bytes": c["total_down_bytes"] // c["present_clients"]}
        break
    if ev.comm_shapes and ev.comm_paper_reduction:
      name = next(iter(ev.comm_shapes))
      got, paper = arithmetic[name]["reduction"], ev.comm_paper_reduction
      out.update(paper=f"{100 * paper:.1f}% reduction", verdict=SUPPORTED if got >= paper
                 else CONTRADICTED,
                 why=f"{name}: {100 * got:.2f}% by arithmetic against the paper's "
                     f"{100 * paper:.1f}%")
    return out

  def claims(self) -> list[dict]:
    """The claim table (eval/claims.py) over whatever settings this run has, per task."""
    k_tags = ["all" if int(k) < 0 else str(int(k)) for k in self.ev.adapt_k]
    table = claims_lib.paper_claims(self.train, self.external, self.new_sites,
                                    adapt_k=k_tags, val_sizes=[int(n) for n in self.ev.val_sizes],
                                    close_margin=self.ev.close_margin)
    rows = []
    for task in TASK_NAMES:
      groups = {s: by[task]["documents"] for s, by in self.results["evaluated"].items()
                if task in by}
      if not groups:
        continue
      resampler = bootstrap.Resampler(groups, self.ev.bootstrap_replicates,
                                      self.ev.bootstrap_seed)
      rows += [{"task": task, **row} for row in
               claims_lib.evaluate(table, self.results["settings"], resampler, task=task)]
    return rows

  def save(self) -> None:
    """results.json and results.md, rewritten after every setting (a crash keeps them)."""
    if self.results["parts"] and not self.report_only:
      self._part()
    files.write_atomic(self.workdir / "results.json",
                       json.dumps(self.results, indent=1, default=_json_default))
    (self.workdir / "results.md").write_text(
        report.markdown(self.results, self.train, self.external, self.new_sites))


# The claims' main comparisons first, so a run stopped early has the most to show.
ORDER = ("zero_shot", "federated", "single_site", "centralized", "faulty", "new_site",
         "val_size")


# Fields that only change how finished settings are summarised: a rerun may change them.
REPORT_ONLY = ("bootstrap_replicates", "bootstrap_seed", "close_margin", "comm_shapes",
               "comm_rank", "comm_dtype_bytes", "comm_paper_reduction")


def _trained_part(config_json: dict) -> dict:
  """The config without REPORT_ONLY eval fields: what decides the trained settings."""
  ev = {k: v for k, v in config_json.get("eval", {}).items() if k not in REPORT_ONLY}
  return {**config_json, "eval": ev}


def training_summary(config, sites: list[SiteData], history: list[dict], seconds: float
                     ) -> dict[str, Any]:
  """What one setting trained over all its rounds: examples and tokens (real and padded) of
  the sites present in each round (from the run's history), times the epochs."""
  by_name = {s.name: s.train for s in sites}
  trained = [by_name[n] for row in history
             for n, present in zip(row["clients"], row["present"]) if present]
  epochs = config.run.epochs
  return {"rounds": config.run.rounds, "epochs": epochs,
          "examples_per_pass": sum(len(a) for a in by_name.values()),
          "example_passes": sum(len(a) for a in trained) * epochs,
          "tokens": int(sum(a.attention_mask.sum() for a in trained)) * epochs,
          "padded_tokens": sum(a.tokens.size for a in trained) * epochs,
          "supervised_tokens": int(sum(row.get("train_tokens", 0) for row in history)),
          "seconds": round(seconds, 2)}


def _file_name(tag: str) -> str:
  return tag.replace("/", "__").replace("=", "_")


def save_adapter(path: Path, params) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, serialization.msgpack_serialize(jax.device_get(params)))


def load_adapter(path: Path, like):
  """Adapter params saved by `save_adapter`, checked against the structure of `like`."""
  try:
    restored = serialization.from_bytes(jax.device_get(like), path.read_bytes())
  except Exception as e:  # msgpack or structure mismatch: name the file
    raise ConfigError(f"{path}: not an adapter of this config ({e}); delete it and rerun "
                      "the federated setting") from None
  return jax.tree.map(jnp.asarray, restored)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, set):
    return sorted(x)
  return str(x)
