"""Per-round plots of a federated run, drawn from its metrics rows (metrics.jsonl).

F1 per site (strict solid, lenient dashed), server validation loss per site, aggregation
weights, and cumulative megabytes sent. Matplotlib with the Agg backend: no display needed.
A plot whose data the run did not record (e.g. F1 without the evaluation hook) is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

PLOTS = ("f1_per_round.png", "val_loss_per_round.png", "weights_per_round.png",
         "cumulative_bytes.png")


def read_metrics(path: str | Path) -> list[dict]:
  rows = []
  for i, line in enumerate(Path(path).read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not a JSON metrics row ({e.msg})") from None
  return rows


def _series(rows: Sequence[Mapping], get) -> dict[str, tuple[list[int], list[float]]]:
  """{name: (rounds, values)} from `get(row) -> {name: value}` (missing rounds skipped)."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  for row in rows:
    for name, value in (get(row) or {}).items():
      xs, ys = out.setdefault(name, ([], []))
      xs.append(row["round"])
      ys.append(value)
  return out


def _axes(n: int):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), squeeze=False)
  for ax in axes[0]:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
  return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_round_plots(rows: Sequence[Mapping], out_dir: str | Path, title: str = ""
                      ) -> list[Path]:
  """Writes the PLOTS that `rows` have data for into out_dir; returns their paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = sorted(rows, key=lambda r: r["round"])
  written = []
  prefix = f"{title}: " if title else ""

  tasks = sorted({t for r in rows for site in (r.get("f1") or {}).values() for t in site})
  if tasks:
    plt, fig, axes = _axes(len(tasks))
    for ax, task in zip(axes, tasks):
      for kind, style in (("strict", "-"), ("lenient", "--")):
        series = _series(rows, lambda r: {s: v[task][kind] for s, v in (r.get("f1") or {}).items()
                                          if task in v})
        for i, (site, (xs, ys)) in enumerate(sorted(series.items())):
          ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{site} {kind}")
      ax.set(title=f"{prefix}{task.upper()} F1 per round (test subset)", xlabel="round",
             ylabel="F1", ylim=(-0.02, 1.02))
      ax.legend(fontsize=7)
    written.append(_save(plt, fig, out / PLOTS[0]))

  per_site = _series(rows, lambda r: r.get("val_loss_by_site"))
  per_client = _series(rows, lambda r: r.get("client_val_loss"))
  overall = _series(rows, lambda r: {"global": r["val_loss"]} if "val_loss" in r else {})
  if per_site or per_client or overall:
    plt, fig, axes = _axes(1)
    ax = axes[0]
    for i, (site, (xs, ys)) in enumerate(sorted(per_site.items())):
      ax.plot(xs, ys, "-", marker="o", color=f"C{i}", label=f"global model on {site}")
    for i, (site, (xs, ys)) in enumerate(sorted(per_client.items())):
      ax.plot(xs, ys, ":", marker="x", color=f"C{i}", label=f"{site}'s update, whole set")
    for xs, ys in overall.values():
      ax.plot(xs, ys, "k-", linewidth=2, label="global model, whole set")
    ax.set(title=f"{prefix}server validation loss", xlabel="round", ylabel="mean token CE")
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out / PLOTS[1]))

  weights = _series(rows, lambda r: r.get("weights"))
  if weights:
    plt, fig, axes = _axes(1)
    ax = axes[0]
    for i, (site, (xs, ys)) in enumerate(sorted(weights.items())):
      ax.plot(xs, ys, "-", marker="o", color=f"C{i}", label=site)
    ax.set(title=f"{prefix}aggregation weights", xlabel="round", ylabel="p_k", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out / PLOTS[2]))

  comm_rows = [r for r in rows if "comm" in r]
  if comm_rows:
    plt, fig, axes = _axes(1)
    ax = axes[0]
    xs = [r["round"] for r in comm_rows]
    for key, label in (("total_up_bytes", "uplink"), ("total_down_bytes", "downlink")):
      total, ys = 0.0, []
      for r in comm_rows:
        total += r["comm"].get(key, 0) / 1e6
        ys.append(total)
      ax.plot(xs, ys, marker="o", label=label)
    ax.set(title=f"{prefix}cumulative traffic (all clients)", xlabel="round", ylabel="MB")
    ax.legend(fontsize=7)
    written.append(_save(plt, fig, out / PLOTS[3]))
  return written


def plot_workdir(workdir: str | Path, title: str = "") -> list[Path]:
  """Plots of a run directory's metrics.jsonl into workdir/plots."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  return write_round_plots(read_metrics(path), Path(workdir) / "plots", title)
