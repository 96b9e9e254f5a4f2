r"""Robust aggregation under faulty and malicious sites: every aggregator against every fault.

  python -m launch.fault_study --out=benchmarks/results --name=robustness_cpu
  python -m launch.fault_study --algorithms=fedavg,median --faults=none,scale --config.run.rounds=2

For each aggregator, one clean run and one run per fault (one site misbehaving from round 1,
fedjax_lora/faults.py). Reported per cell: the final server validation loss and how far the
final global adapter lies from the same aggregator's clean run, relative to how far that
clean run moved from the initial adapter (0 = unaffected, 1 = as far off as the whole
training signal). A row "fedavg+quarantine" adds the server's norm bound
(`security.max_update_norm`, by default 3x the largest update norm of the clean FedAvg run).
All runs share one data preparation and one base model.
"""

import json
import platform
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from fedjax_lora import experiment
from launch import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "federate.py") + ":tiny",
    "Federation config (default: the tiny smoke model, as the committed study); the study "
    "overrides algorithm, faults and security per run.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["fedavg", "median", "trimmed_mean", "norm_clip",
                                               "fedmedlora_plus"], "Aggregators to compare.")
_FAULTS = flags.DEFINE_list("faults", ["none", "nan", "scale", "sign_flip", "label_flip",
                                       "dropout"], "Faults to inject ('none' = clean run).")
_SITE = flags.DEFINE_string("site", "", "The faulty site ('' = the first training site).")
_NORM_BOUND = flags.DEFINE_float("norm_bound", 0.0, "Quarantine bound for the "
                                 "fedavg+quarantine row (0: 3x the clean FedAvg max norm).")
_OUT = flags.DEFINE_string("out", None, "Directory for NAME.json and NAME.md (none: print).")
_NAME = flags.DEFINE_string("name", "robustness_cpu", "Result file stem.")


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  base_config = _CONFIG.value
  base_config.security.ledger = False  # the study needs no workdir
  data = experiment.prepare_data(base_config, None, log)
  sites = [n for n, s in data.sites.items() if s.role == "train"]
  site = _SITE.value or sites[0]
  model = experiment.load_model(base_config, len(data.tokenizer), None, data.tokenizer, log)
  quiet = lambda s: None

  def run(algorithm, fault, bound=0.0):
    c = base_config.copy_and_resolve_references()
    c.algorithm = algorithm
    c.faults.sites = "" if fault == "none" else f"{site}:{fault}"
    c.security.max_update_norm = bound
    c.aggregator.trim = max(c.aggregator.trim, 1.0 / len(sites) + 1e-3)  # trim one each side
    fed = experiment.build(c, None, log=quiet, data=data, model=model)
    start = _flat(fed.state["global"])
    fed.run_rounds()
    last = fed.history[-1]
    quarantined = sum(len(r.get("quarantined_nonfinite", [])) + len(r.get("quarantined_norm", []))
                      for r in fed.history)
    log(f"{algorithm:>18} {fault:>10}: val {last.get('val_loss', float('nan')):.4f}, "
        f"quarantined {quarantined}")
    return {"val_loss": last.get("val_loss"), "final": _flat(fed.state["global"]),
            "start": start, "quarantined": quarantined,
            "max_update_norm": max(max(r.get("update_norm", {0: 0.0}).values())
                                   for r in fed.history)}

  results = {}
  rows = [(a, 0.0) for a in _ALGORITHMS.value]
  if "fedavg" in _ALGORITHMS.value:
    rows.append(("fedavg+quarantine", None))
  clean_norm = None
  for label, bound in rows:
    algorithm = label.split("+")[0]
    if bound is None:
      bound = _NORM_BOUND.value or 3.0 * clean_norm
    clean = run(algorithm, "none", bound)
    if label == "fedavg":
      clean_norm = clean["max_update_norm"]
    scale = np.linalg.norm(clean["final"] - clean["start"])
    results[label] = {"norm_bound": bound or None}
    for fault in _FAULTS.value:
      out = clean if fault == "none" else run(algorithm, fault, bound)
      finite = np.isfinite(out["final"]).all()
      dist = float(np.linalg.norm(out["final"] - clean["final"]) / scale) if finite else None
      results[label][fault] = {"val_loss": out["val_loss"] if finite else None,
                               "relative_distance": dist, "quarantined": out["quarantined"]}

  table = ["| aggregator | " + " | ".join(_FAULTS.value) + " |",
           "|---|" + "---|" * len(_FAULTS.value)]
  for label, cells in results.items():
    shown = []
    for fault in _FAULTS.value:
      cell = cells[fault]
      if cell["val_loss"] is None:
        shown.append("diverged (NaN)")
      else:
        shown.append(f"{cell['val_loss']:.3f} / {cell['relative_distance']:.2f}" +
                     (f" (q {cell['quarantined']})" if cell["quarantined"] else ""))
    table.append(f"| {label} | " + " | ".join(shown) + " |")
  c = base_config
  header = (f"# Robust aggregation under one faulty site ({site}, from round 1)\n\n"
            f"Command: `python -m launch.fault_study {' '.join(sys.argv[1:])}`. "
            f"{len(sites)} synthetic sites, {c.run.rounds} rounds, tiny random LLaMA "
            f"(hidden {c.model.hidden_size}), LoRA r={c.lora.rank}; {platform.processor() or 'cpu'}, "
            f"jax {jax.__version__}.\n\nEach cell: final server validation loss / distance of "
            "the final global adapter from the same aggregator's clean run, relative to the "
            "clean run's distance from the initial adapter; (q N) = uploads quarantined over "
            f"the run. scale = x{c.faults.scale:g}. trimmed_mean trims one site per side; "
            f"fedavg+quarantine bounds ||y_k - x|| at {results.get('fedavg+quarantine', {}).get('norm_bound') or 0:.3g} "
            "(3x the clean FedAvg maximum).\n\n")
  text = header + "\n".join(table) + "\n"
  print(text)
  if _OUT.value:
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{_NAME.value}.json").write_text(json.dumps(
        {"site": site, "sites": sites, "rounds": c.run.rounds, "results": results}, indent=1))
    (out / f"{_NAME.value}.md").write_text(text)


if __name__ == "__main__":
  errors.run(main)
