"""The federated run's evaluation hook: per-round F1 and server validation loss per site.

Called by `Federation.step` every `run.eval_every` rounds. F1 is measured on a small,
fixed subset of each training site's *test* split, for monitoring only: nothing selects
checkpoints or tunes anything on it (best checkpoints use the server validation loss).
Personalised algorithms (dual_lora, fedsa_lora) are scored with each site's own model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from fedjax_lora.eval.decoding import Decoder
from fedjax_lora.eval.report import f1_line
from fedjax_lora.eval.evaluator import EvalSet, eval_sets, evaluate_sets, f1_summary
from fedjax_lora.simulator import server_validation_set


def is_personalised(fed) -> bool:
  return bool(fed.algorithm.personal_factors or fed.algorithm.local_adapter)


def site_models(fed) -> Callable[[str], Any]:
  """site name -> adapters: the site's own model for training sites of a personalised
  algorithm, the global model otherwise (held-out sites always get the global model)."""
  index = {s.name: k for k, s in enumerate(fed.sites)}
  personal = is_personalised(fed)

  def adapters_for(site: str):
    if personal and site in index:
      return fed.site_adapters(index[site])
    return fed.global_adapters()
  return adapters_for


def hook_from_config(config, data, decoder: Decoder, site_names):
  """The hook `config.eval` asks for: F1 on `round_examples_per_task` test examples of each
  named site (0: F1 off) and per-site validation loss (with `run.val_examples_per_site`)."""
  k = config.eval.round_examples_per_task
  sets = {n: eval_sets(n, data.sites[n].examples["test"], k) for n in site_names
          if k and data.sites[n].examples.get("test")}
  return round_eval_hook(decoder if sets else None, sets, config.run.val_examples_per_site,
                         config.run.val_chunk)


def round_eval_hook(decoder: Decoder | None, sets: Mapping[str, Mapping[str, EvalSet]],
                    val_per_site: int = 0, val_chunk: int = 8):
  """A Federation hook adding `f1` {site: {task: {strict, lenient}}}, `f1_sample` (the
  first scored example's gold and predicted answer per site and task), `f1_generation` and
  `val_loss_by_site` (the global, or site's own, model on that site's part of the server
  validation set) to the round's metrics."""
  val_sets: dict = {}

  def hook(fed, round_index: int) -> dict:
    row: dict[str, Any] = {}
    adapters_for = site_models(fed)
    base = fed.effective_base()
    if decoder is not None and sets:
      result = evaluate_sets(decoder, base, adapters_for, sets, samples=1,
                             label=f"round {round_index}")
      row["f1"] = f1_summary(result)
      row["f1_sample"] = {site: {task: r["samples"][0] for task, r in by_task.items()
                                 if r["samples"]}
                          for site, by_task in result["sites"].items()}
      row["f1_generation"] = result["generation"]
    if val_per_site:
      if not val_sets:
        for s in fed.sites:
          if s.dev is not None and len(s.dev):
            val_sets[s.name] = jax.tree.map(jnp.asarray, server_validation_set(
                [s], val_per_site, val_chunk, fed.length))
      row["val_loss_by_site"] = {name: float(fed.val_fn(base, adapters_for(name), v))
                                 for name, v in val_sets.items()}
    return row
  return hook


def zero_shot_f1(fed, hook, path: Path, log: Callable[[str], None]) -> dict | None:
  """F1 of the untrained model (the initial adapter has B = 0: exactly the base) on the
  hook's evaluation slice, measured before round 1 and kept in `path`, so a resumed run
  still compares against it. None when the hook scores no F1."""
  if path.is_file():
    return json.loads(path.read_text())
  if hook is None or int(fed.state["round"]) > 0:
    return None
  row = hook(fed, 0)
  if "f1" not in row:
    return None
  log(f"zero-shot (before round 1) | {f1_line(row['f1'])}")
  path.write_text(json.dumps(row["f1"], indent=1))
  return row["f1"]
