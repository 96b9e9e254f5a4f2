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
           "(each setting is scored on the sites its comparisons need; the single_site row is "
           "each site's own model on its own test split). Per-type and seqeval scores, "
           "problem counts and sample outputs are in results.json.", ""]
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
  if results.get("claims"):
    lines += claims_markdown(results["claims"])
  if results.get("communication"):
    lines += communication_markdown(results["communication"])
  sized = {n: r for n, r in settings.items() if "seconds" in r}
  if sized:
    lines += sizes_markdown(sized)
  gen = results.get("generation")
  if gen:
    lines += [f"Generation: {gen['prompts']} answers, {gen['new_tokens']} new tokens, "
              f"{gen['tokens_per_second']:.0f} tokens/s after compilation, "
              f"{gen['distinct_shapes']} compiled shapes, {gen['hit_budget']} answers cut by "
              "their token budget.", ""]
  comp = results.get("compile")
  if comp:
    parts = comp.get("parts", 1)
    lines += [f"Compilation: {comp['seconds']:.0f} s of {comp['wall_seconds']:.0f} s wall "
              f"({100 * comp['fraction_of_wall']:.1f}%), {comp['compilations']} programs"
              + (f", over the {parts} processes of a resumed run" if parts > 1 else "") + ".",
              ""]
  seconds = results.get("seconds")
  if seconds:
    lines += ["Seconds per setting (training + evaluation): " +
              ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".", ""]
  for tag, run in results.get("runs", {}).items():
    if run.get("plots"):
      lines.append(f"Per-round plots of {tag}: " +
                   ", ".join(f"`{p}`" for p in run["plots"]))
  return "\n".join(lines).rstrip() + "\n"


def _ci(row: Mapping[str, Any], kind: str) -> str:
  c = row.get(kind)
  return "—" if not c else f"{c['value']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]"


def claims_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The claim table: each comparison's difference in F1 points with its paired 95%
  bootstrap interval, strict and lenient, and the verdict on strict F1 (eval/claims.py)."""
  lines = ["## Claims", "",
           "Differences in F1 points (claimed − reference), macro-averaged over the sites "
           "named, with paired 95% bootstrap intervals over test documents. Verdict on strict "
           "F1: supported = the interval lies above −margin, contradicted = below it, "
           "inconclusive = it crosses it (margin 0 unless stated).", "",
           "| claim | task | comparison | paper | ours: strict Δ [95% CI] | lenient Δ [95% CI] "
           "| verdict |", "|---|---|---|---|---:|---:|---|"]
  missing = [r for r in rows if r["verdict"] == "not run"]
  for r in rows:
    if r["verdict"] == "not run":
      continue
    comparison = r["comparison"] + (f" (margin {r['margin_points']:.0f} points)"
                                    if r.get("margin_points") else "") + \
        (" (two-sided)" if r.get("two_sided") else "")
    task = TASK_TITLES.get(r.get("task", "ner"), r.get("task", ""))
    lines.append(f"| {r['claim']} | {task} | {comparison} | {r['paper']} | "
                 f"{_ci(r, 'strict')} | {_ci(r, 'lenient')} | **{r['verdict']}** |")
  if missing:
    first: dict[tuple[str, str], str] = {}
    for r in missing:  # one line per claim and task: the first score it lacks
      first.setdefault((TASK_TITLES.get(r.get("task", "ner"), ""), r["claim"]), r["missing"])
    lines += ["", "Not run (this run lacks a setting they compare): " + "; ".join(
        f"claim {claim} {task} ({what})" for (task, claim), what in first.items()) + "."]
  return lines + [""]


def communication_markdown(comm: Mapping[str, Any]) -> list[str]:
  """Claim 9: bytes per site per round and direction, adapter against the full model."""
  lines = ["## Communication per site per round (one direction)", "",
           "| model | LoRA | adapter parameters | adapter bytes | full-model bytes | "
           "adapter / full | reduction |", "|---|---|---:|---:|---:|---:|---:|"]
  for name, c in comm.get("arithmetic", {}).items():
    lines.append(f"| {name} | {c['lora']} | {c['adapter_params']:,} | {c['adapter_bytes']:,} "
                 f"| {c['full_bytes']:,} | {100 * c['fraction']:.2f}% | "
                 f"{100 * c['reduction']:.2f}% |")
  measured = comm.get("measured")
  if measured:
    lines += ["", f"Measured in this run ({measured['setting']}): {measured['up_bytes']:,} "
              f"bytes uploaded per site per round, {measured['down_bytes']:,} downloaded."]
  if comm.get("verdict"):
    lines += ["", f"Claim 9 (the paper's {comm['paper']}): **{comm['verdict']}** "
              f"({comm['why']})."]
  return lines + [""]


def sizes_markdown(settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """What each setting trained and how long it took (training + scoring)."""
  lines = ["## Size and time per setting", "",
           "Tokens over all rounds and epochs of the sites present (padded: as computed, at "
           "the padded length). Training s: building and running the rounds, including the "
           "per-round F1 hook where it is on; total s adds the final scoring.", "",
           "| setting | rounds × epochs | examples per pass | real tokens trained | padded "
           "tokens | supervised tokens | training s | total s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for name, r in settings.items():
    t = r.get("training")
    if r.get("reused_from"):
      lines.append(f"| {name} | the scores of {r['reused_from']} (same model, same examples) "
                   "| — | — | — | — | — | 0 |")
    elif t:
      lines.append(f"| {name} | {t['rounds']} × {t['epochs']} | {t['examples_per_pass']} | "
                   f"{t['tokens']:,} | {t['padded_tokens']:,} | {t['supervised_tokens']:,} | "
                   f"{t['seconds']:.0f} | {r['seconds']:.0f} |")
    else:
      lines.append(f"| {name} | — | — | — | — | — | — | {r['seconds']:.0f} |")
  return lines + [""]


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
