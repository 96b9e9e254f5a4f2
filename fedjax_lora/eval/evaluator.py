"""Generation-based scoring of one model on sites' test examples (method.md §7).

Each site's examples are scored per task (NER, RE) with the labels its own prompts list,
as each `Example` carries them: an NER example's entity types, or an RE example's
relation types, whose anchor entity types are ignored. The model answers the prompt the
site trained on; the answer is parsed, aligned to the gold text and scored by
`metrics.score`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fedjax_lora.data.tasks import Example
from fedjax_lora.eval import metrics
from fedjax_lora.eval.decoding import Decoder, DecodeStats

TASK_NAMES = ("ner", "re")


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One site's examples of one task, with the classes scored and the classes ignored."""
  site: str
  task: str
  examples: tuple[Example, ...]
  labels: frozenset
  ignore: frozenset = frozenset()
  available: int = 0          # examples in the split before any cap


def prompt_labels(example: Example) -> tuple[set[str], set[str]]:
  """(scored classes, ignored anchor classes) of the label lists the example's prompt
  offers, as the example carries them (`Example.entity_labels` / `relation_labels`)."""
  if example.task == "re":
    if not example.relation_labels:
      raise ValueError(f"example {example.doc_id}: RE example without its relation labels")
    modifiers = set(example.relation_labels)
    anchors = set(example.entity_labels) | {a.label for a in example.anchors}
    return modifiers, anchors - modifiers
  return set(example.entity_labels), set()


def spread(n: int, k: int) -> list[int]:
  """k indices spread evenly over range(n) (all of them when k is 0 or >= n)."""
  if k <= 0 or k >= n:
    return list(range(n))
  return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def eval_sets(site: str, examples: Sequence[Example], max_per_task: int = 0
              ) -> dict[str, EvalSet]:
  """Per task, up to `max_per_task` examples spread over the split (0: all)."""
  out = {}
  for task in TASK_NAMES:
    mine = [e for e in examples if e.task == task]
    if not mine:
      continue
    chosen = tuple(mine[i] for i in spread(len(mine), max_per_task))
    labels, ignore = set(), set()
    for e in mine:
      scored, ignored = prompt_labels(e)
      labels |= scored
      ignore |= ignored
    out[task] = EvalSet(site, task, chosen, frozenset(labels), frozenset(ignore - labels),
                        len(mine))
  return out


def score_set(eval_set: EvalSet, predictions: Sequence[str]) -> dict[str, Any]:
  result = metrics.score(eval_set.examples, predictions, labels=eval_set.labels,
                         ignore_labels=eval_set.ignore, use_anchors=eval_set.task == "re")
  result["n_available"] = eval_set.available
  return result


def evaluate_sets(decoder: Decoder, base, adapters_for: Callable[[str], Any],
                  sets: Mapping[str, Mapping[str, EvalSet]], samples: int = 2,
                  label: str = "") -> dict[str, Any]:
  """Scores every site's sets with that site's model; per task, aggregates over sites.

  `adapters_for(site)` gives the adapters to decode that site with (a personalised model
  may differ per site). Returns {"sites": {site: {task: score}}, "aggregate": {task: ...},
  "generation": stats}; each score keeps the first `samples` (gold, predicted) pairs.
  """
  per_site: dict[str, dict[str, Any]] = {}
  stats = DecodeStats()
  for site, by_task in sets.items():
    per_site[site] = {}
    for task, es in by_task.items():
      outputs, st = decoder.generate(base, adapters_for(site), [e.prompt for e in es.examples],
                                     [e.text for e in es.examples],
                                     label=f"{label} {site}/{task}".strip())
      stats.add(st)
      result = score_set(es, outputs)
      result["samples"] = [{"gold": e.target, "predicted": o}
                           for e, o in zip(es.examples[:samples], outputs)]
      result["generation"] = st.to_dict()
      per_site[site][task] = result
  return {"sites": per_site, "aggregate": aggregate_sites(per_site),
          "generation": stats.to_dict()}


def aggregate_sites(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Per task, `metrics.aggregate` over the sites scored on it."""
  out = {}
  for task in TASK_NAMES:
    scored = {s: r[task] for s, r in per_site.items() if task in r}
    if scored:
      out[task] = metrics.aggregate(scored)
  return out


def f1_summary(result: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
  """{site: {task: {"strict": f1, "lenient": f1}}} of an `evaluate_sets` result."""
  return {site: {task: {"strict": r["strict"]["f1"], "lenient": r["lenient"]["f1"]}
                 for task, r in by_task.items()}
          for site, by_task in result["sites"].items()}
