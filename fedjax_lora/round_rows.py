"""A round's metrics row and log line, from what the server learned in the round: shared by
the simulator and the deployed server, so both write the same metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from fedjax_lora import comm, files
from fedjax_lora.algorithms import Algorithm
from fedjax_lora.eval.report import f1_line
from fedjax_lora.privacy import accounting


def traffic(algorithm: Algorithm, sends: tuple[str, ...], ranks: list[int], present, shapes,
          full_model_bytes: int) -> dict:
  """What each client really sends and receives this round, by algorithm.

  Uplink: the factors the aggregator takes, at the client's own rank. Downlink: the new
  global factors the client uses (A only for fedsa_lora; plus the server control for
  SCAFFOLD; FLoRA's stacked factors of total rank sum(r_k))."""
  alg = algorithm

  def at_rank(tree, r, factors):
    out = {}
    for t, ab in tree.items():
      out[t] = {}
      for f in factors:
        shape = list(ab[f].shape)
        shape[-1 if f == "a" else -2] = r
        out[t][f] = jax.ShapeDtypeStruct(tuple(shape), ab[f].dtype)
    return out

  up = [at_rank(shapes, r, sends) for r in ranks]
  down_factors = ("a",) if alg.personal_factors else ("a", "b")
  if alg.merge_base:
    stacked = sum(r for r, p in zip(ranks, present) if p)
    down = [at_rank(shapes, stacked, ("a", "b")) for _ in ranks]
  else:
    down = [at_rank(shapes, r, down_factors) for r in ranks]
  if alg.scaffold:
    down = [{"model": d, "control": d} for d in down]
  return comm.round_comm(up, down, np.asarray(present), full_model_bytes,
                         uplink_multiplier=2 if alg.scaffold else 1)


def summarise(r: int, names: list[str], present, metrics: dict, traffic: dict,
              accepted=None) -> dict:
  """Round r's metrics row (what metrics.jsonl holds) from the round's metrics on the host:
  per-site train loss, weights (of the uploads that counted), update norms, validation
  losses, traffic and the token-weighted mean train loss."""
  counted = np.array(present if accepted is None else accepted, bool)
  for key in ("client_quarantined_nonfinite", "client_quarantined_norm"):
    if key in metrics:
      counted &= ~np.asarray(metrics[key], bool)
  row = {"round": r, "clients": names, "present": [bool(p) for p in present],
         "train_loss": {n: float(v) for n, v, p in zip(names, metrics["client_train_loss"],
                                                        present) if p},
         "weights": {n: float(w) for n, w, p in zip(names, metrics["weights"], counted) if p},
         "comm": traffic}
  for key in ("client_quarantined_nonfinite", "client_quarantined_norm"):
    if key in metrics:
      row[key[len("client_"):]] = [n for n, q in zip(names, metrics[key]) if q]
  if "client_update_norm" in metrics:
    row["update_norm"] = {n: float(v) for n, v, p in zip(names, metrics["client_update_norm"],
                                                         present) if p}
  if "client_val_loss" in metrics:
    row["client_val_loss"] = {n: float(v) for n, v, p in
                              zip(names, metrics["client_val_loss"], present) if p}
  for k, v in metrics.items():
    if not k.startswith("client_") and k != "weights" and np.ndim(v) == 0:
      row[k] = float(v)
  n = np.array([metrics["client_train_tokens"][i] for i in range(len(names))]) * present
  losses = np.asarray(metrics["client_train_loss"])
  row["mean_train_loss"] = float((losses * n).sum() / max(n.sum(), 1.0))
  row["train_tokens"] = int(n.sum())  # supervised tokens trained this round
  return row


def format_row(row: dict) -> str:
  """The one log line of a round."""
  weights = " ".join(f"{k}={v:.2f}" for k, v in row["weights"].items())
  val = f" val {row['val_loss']:.4f}" if "val_loss" in row else ""
  dropped = row.get("quarantined_nonfinite", []) + row.get("quarantined_norm", []) + \
      [f"{s} ({why})" for s, why in row.get("rejected", {}).items()]
  if dropped:
    val += f" | quarantined {', '.join(dropped)}"
  if "epsilon" in row:
    val += f" | eps max {max(row['epsilon'].values()):.2f}"
  if "client_epsilon" in row:
    val += f" | client eps {row['client_epsilon']:.2f}"
  if "f1" in row:  # {site: {task: {strict, lenient}}} from the evaluation hook
    val += f" | {f1_line(row['f1'])}"
  up = row["comm"]["total_up_bytes"] / 1e6
  return (f"round {row['round']:3d} | clients {sum(row['present'])}/{len(row['clients'])} | "
          f"loss {row['mean_train_loss']:.4f}{val} | weights {weights} | up {up:.2f} MB | "
          f"{row.get('seconds', 0):.1f}s")


def privacy(client, client_dp: bool, security, run, r: int, names: list[str], present,
            metrics: dict, dp_steps: dict[str, int], train_sizes: dict[str, int]) -> dict:
  """Round r's per-site DP-SGD epsilon (adding the round's local steps to `dp_steps`, in
  place) and the run's client-level epsilon so far, over all sites of `train_sizes`."""
  out = {}
  if client.dp:
    for i, name in enumerate(names):
      if present[i]:
        dp_steps[name] += int(metrics["client_steps"][i])
    per_step = run.batch_size * run.accumulation
    out["epsilon"] = {
        s: accounting.dp_sgd_epsilon(client.dp_noise_multiplier, min(1.0, per_step / max(n, 1)),
                                     dp_steps[s], security.dp_delta)
        for s, n in train_sizes.items()}
    out["dp_steps"] = dict(dp_steps)
  if client_dp:
    out["client_epsilon"] = accounting.client_level_epsilon(
        security.client_dp_noise, len(names), len(train_sizes), r, security.dp_delta)
  return out


def truncate_metrics(path: Path, round_index: int) -> None:
  """Drops the rows of rounds after `round_index` from a metrics.jsonl (a resumed run
  re-runs them), and a row torn by a kill."""
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]

  def kept(line: str) -> bool:
    try:
      return json.loads(line).get("round", 0) <= round_index
    except json.JSONDecodeError:  # a row torn by a kill: it belongs to a re-run round
      return False
  keep = [l for l in lines if kept(l)]
  if len(keep) != len(lines):
    files.write_atomic(path, "".join(l + "\n" for l in keep))


def append_row(path: Path, row: dict) -> None:
  """One round's row, appended to metrics.jsonl."""
  with open(path, "a") as f:
    f.write(json.dumps(jsonable(row)) + "\n")


def jsonable(row: dict) -> dict:
  return json.loads(json.dumps(row, default=float))
