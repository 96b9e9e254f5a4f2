"""Markdown report of an evaluation run: the paper's table layout, one table per task.

Rows are settings (zero-shot, single-site, centralized, each federated algorithm, each
new-site adaptation), columns are sites × strict/lenient F1 (training sites in-domain,
then external and new sites), then the micro average over the training sites.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedjax_lora.eval.metrics import prf

TASK_TITLES = {"ner": "NER", "re": "RE"}


def _f1(result: Mapping[str, Any] | None, site: str, task: str, kind: str) -> str:
  if not result:
    return "—"
  r = result.get("sites", {}).get(site, {}).get(task)
  return "—" if r is None else f"{100 * r[kind]['f1']:.1f}"


def _micro(result: Mapping[str, Any], task: str, kind: str, sites: Sequence[str]) -> str:
  """Micro F1 (pooled counts) over the training sites this setting was scored on."""
  rows = [result["sites"][s][task] for s in sites
          if task in result.get("sites", {}).get(s, {})]
  if not rows:
    return "—"
  pooled = prf(*(sum(r[kind][k] for r in rows) for k in ("tp", "n_pred", "n_gold")))
  return f"{100 * pooled['f1']:.1f}"


def summary_line(name: str, result: Mapping[str, Any]) -> str:
  parts = []
  for task, agg in result.get("aggregate", {}).items():
    m = agg["micro"]
    parts.append(f"{TASK_TITLES.get(task, task)} strict {100 * m['strict']['f1']:.1f} / "
                 f"lenient {100 * m['lenient']['f1']:.1f}")
  return f"{name}: micro F1 over its sites: " + ("; ".join(parts) or "nothing scored")


def markdown(results: Mapping[str, Any], train: Sequence[str], external: Sequence[str],
             new_sites: Sequence[str]) -> str:
  settings = results.get("settings", {})
  sites = list(train) + list(external) + list(new_sites)
  role = {**{s: "in-domain" for s in train}, **{s: "external" for s in external},
          **{s: "new site" for s in new_sites}}
  lines = ["# Evaluation report", "",
           "F1 in percent, type-collapsed, micro-averaged per test set (method.md §7); "
           "S = strict (exact boundaries), L = lenient (overlap). — = not evaluated "
           "(single-site models are scored on their own site only; new-site rows on the new "
           "site only). Per-type and seqeval scores, problem counts and sample outputs are "
           "in results.json.", ""]
  evaluated = results.get("evaluated", {})
  sizes = ", ".join(f"{s} ({role[s]}): " + ", ".join(
      f"{t} {v['scored']}/{v['available']}" for t, v in evaluated.get(s, {}).items())
      for s in sites)
  lines += [f"Test examples scored/available: {sizes}.", ""]
  for task, title in TASK_TITLES.items():
    if not any(task in by for r in settings.values() for by in r.get("sites", {}).values()):
      continue
    head = ["setting"] + [f"{s} {k}" for s in sites for k in ("S", "L")] + \
        ["micro in-domain S", "micro in-domain L"]
    lines += [f"## {title}", "", "| " + " | ".join(head) + " |",
              "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, result in settings.items():
      cells = [name] + [_f1(result, s, task, k) for s in sites for k in ("strict", "lenient")]
      cells += [_micro(result, task, k, train) for k in ("strict", "lenient")]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  gen = results.get("generation")
  if gen:
    lines += [f"Generation: {gen['prompts']} answers, {gen['new_tokens']} new tokens, "
              f"{gen['tokens_per_second']:.0f} tokens/s after compilation, "
              f"{gen['distinct_shapes']} compiled shapes, {gen['hit_budget']} answers cut by "
              "their token budget.", ""]
  comp = results.get("compile")
  if comp:
    lines += [f"Compilation: {comp['seconds']:.0f} s of {comp['wall_seconds']:.0f} s wall "
              f"({100 * comp['fraction_of_wall']:.1f}%), {comp['compilations']} programs.", ""]
  seconds = results.get("seconds")
  if seconds:
    lines += ["Seconds per setting (training + evaluation): " +
              ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".", ""]
  for alg, run in results.get("runs", {}).items():
    if run.get("plots"):
      lines.append(f"Per-round plots of federated/{alg}: " +
                   ", ".join(f"`{p}`" for p in run["plots"]))
  return "\n".join(lines).rstrip() + "\n"


def f1_change_table(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
  """Markdown table of {site: {task: {strict, lenient}}} F1 before -> after (e.g. zero-shot
  -> final round of a federated run), one row per site and task."""
  rows = ["| site | task | strict F1 | lenient F1 |", "|---|---|---|---|"]
  for site, by_task in after.items():
    for task, now in by_task.items():
      was = before.get(site, {}).get(task)
      cell = lambda kind: (f"{100 * was[kind]:.1f} → {100 * now[kind]:.1f}" if was
                           else f"— → {100 * now[kind]:.1f}")
      rows.append(f"| {site} | {TASK_TITLES.get(task, task)} | {cell('strict')} | "
                  f"{cell('lenient')} |")
  return "\n".join(rows)


def f1_line(f1: Mapping[str, Any]) -> str:
  """One-line strict F1 per site and task, for round lines."""
  return "strict F1 " + " ".join(f"{site}/{task} {scores['strict']:.2f}"
                                 for site, by_task in f1.items()
                                 for task, scores in by_task.items())
