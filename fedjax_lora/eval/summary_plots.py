"""Plots of a whole evaluation run, drawn from its results.json (`launch.evaluate`).

- `f1_by_setting.png`: strict and lenient F1 per setting (bars) and site (panels);
- `f1_per_round.png`: mean strict F1 over the training sites per round, one line per
  federated run that recorded it (the per-round hook's test slice, monitoring only);
- `new_site_k.png`: the new site's F1 against k training examples, per start;
- `val_size.png`: Fed-MedLoRA+'s in-domain F1 against server validation records per site.
A plot whose settings the run does not have is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedjax_lora.eval.plots import _axes, _save

TASK = "ner"


def _f1(result: Mapping[str, Any], site: str, kind: str) -> float | None:
  r = result.get("sites", {}).get(site, {}).get(TASK)
  return None if r is None else 100 * r[kind]["f1"]


def _mean(result: Mapping[str, Any], sites: Sequence[str], kind: str) -> float | None:
  values = [_f1(result, s, kind) for s in sites]
  return None if not values or any(v is None for v in values) else sum(values) / len(values)


def f1_by_setting(settings: Mapping[str, Mapping], sites: Sequence[str], path: Path
                  ) -> Path | None:
  names = [n for n in settings if not n.startswith("single_site/")]
  sites = [s for s in sites if any(_f1(settings[n], s, "strict") is not None for n in names)]
  if not sites:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, len(sites))
  rows_ = -(-len(sites) // cols)
  fig, grid = plt.subplots(rows_, cols, squeeze=False,
                           figsize=(5.2 * cols, rows_ * (0.3 * len(names) + 1.4)))
  axes = grid.reshape(-1)
  for ax in axes[len(sites):]:
    ax.set_visible(False)
  for ax, site in zip(axes, sites):
    rows = [(n, _f1(settings[n], site, "strict"), _f1(settings[n], site, "lenient"))
            for n in names]
    rows = [r for r in rows if r[1] is not None]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[1] for r in rows], height=0.4, label="strict")
    ax.barh([y - 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="lenient")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_title(site)
    ax.set_xlabel("F1 (%)")
  axes[0].legend(fontsize=7)
  return _save(plt, fig, path)


def f1_per_round(runs: Mapping[str, Mapping], path: Path) -> Path | None:
  series = {}
  for tag, run in runs.items():
    points = []
    for row in run.get("history", []):
      f1 = row.get("f1")
      if f1:
        values = [by[TASK]["strict"] for by in f1.values() if TASK in by]
        if values:
          points.append((row["round"], 100 * sum(values) / len(values)))
    if points:
      series[tag] = points
  if not series:
    return None
  plt, fig, (ax,) = _axes(1)
  for tag, points in series.items():
    ax.plot(*zip(*points), marker="o", label=tag)
  ax.set_xlabel("round")
  ax.set_ylabel("mean strict F1 over training sites (%)")
  ax.legend(fontsize=7)
  return _save(plt, fig, path)


def _curve(settings: Mapping[str, Mapping], pattern: str, sites: Sequence[str]):
  """{group: [(x, strict, lenient)]} from the tags matching `pattern` (groups: group, x)."""
  out: dict[str, list] = {}
  for name, result in settings.items():
    m = re.fullmatch(pattern, name)
    if not m:
      continue
    group, x = m.group("group"), m.group("x")
    strict, lenient = _mean(result, sites, "strict"), _mean(result, sites, "lenient")
    if strict is not None:
      out.setdefault(group, []).append((x, strict, lenient))
  return out


def _plot_curves(curves, xlabel: str, ylabel: str, path: Path, all_last: bool = False):
  if not curves:
    return None
  plt, fig, (ax,) = _axes(1)
  for group, points in curves.items():
    key = lambda p: float("inf") if p[0] == "all" else float(p[0])
    points = sorted(points, key=key)
    xs = list(range(len(points))) if all_last else [float(p[0]) for p in points]
    ax.plot(xs, [p[1] for p in points], marker="o", label=f"{group} strict")
    ax.plot(xs, [p[2] for p in points], marker="x", linestyle="--", label=f"{group} lenient")
    if all_last:
      ax.set_xticks(xs, [p[0] for p in points])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  return _save(plt, fig, path)


def write_summary_plots(results: Mapping[str, Any], train: Sequence[str],
                        external: Sequence[str], new_sites: Sequence[str],
                        out_dir: str | Path) -> list[Path]:
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  settings = results.get("settings", {})
  paths = [
      f1_by_setting(settings, list(train) + list(external) + list(new_sites),
                    out_dir / "f1_by_setting.png"),
      f1_per_round(results.get("runs", {}), out_dir / "f1_per_round.png"),
      _plot_curves(_curve(settings, r"new_site/(?P<group>[^/]+)/k=(?P<x>\w+)", new_sites),
                   "k (training examples at the new site)", "new-site F1 (%)",
                   out_dir / "new_site_k.png", all_last=True),
      _plot_curves(_curve(settings, r"(?P<group>val_size)/(?P<x>\d+)", train),
                   "server validation records per site", "mean in-domain F1 (%)",
                   out_dir / "val_size.png"),
  ]
  return [p for p in paths if p is not None]
