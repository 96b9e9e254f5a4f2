"""The benchmark's ratios, target checks and Markdown table, from the workers' results.

Every ratio is oriented so that > 1 means JAX is better (faster, or less memory), which
keeps the table readable at a glance and the targets one comparison each.
"""

from __future__ import annotations

import re

# Dense bf16 peaks of accelerators we may be lent (vendor figures, FLOP/s).
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}

FRAMEWORKS = ("jax", "torch_eager", "torch_compile")


def nominal_peak(device_kind: str, dtype: str) -> float | None:
  """The vendor's bf16 peak for a bf16 run on a known device (whole-word match)."""
  if dtype != "bfloat16":
    return None
  for name, peak in NOMINAL_BF16_PEAK.items():
    if re.search(rf"\b{name}\b", device_kind):
      return peak
  return None


def _get(results, framework, task, *keys):
  node = results.get(framework, {}).get(task)
  for k in keys:
    if not isinstance(node, dict) or k not in node:
      return None
    node = node[k]
  return node


def _ratio(num, den):
  return None if not num or not den else num / den


def _fmt(x, digits=3):
  if x is None:
    return "—"
  if isinstance(x, float):
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"
  return str(x)


def _times(res, framework, k, mode):
  return _get(res, framework, "rounds", f"{mode}/K={k}", "median_s")


def _round_mb(res, framework, k, mode):
  return _get(res, framework, "rounds", f"{mode}/K={k}", "memory", "peak_mb")


def target_k(clients) -> int:
  """The K of the round targets: 4 (the issue's figure) when measured, else the largest."""
  return 4 if 4 in clients else max(clients)


def summarize(doc: dict) -> dict:
  """Adds utilisation, ratios and targets (value, goal, met, shortfall) to `doc`."""
  res, c = doc["results"], doc["config"]
  peak = doc["peak_matmul_flops"]["measured_peak"]
  per_token = doc["flops"]["train_per_token"]
  train = {f: _get(res, f, "train", "tokens_per_s") for f in FRAMEWORKS}
  doc["utilisation"] = {f: {"achieved_flops": train[f] and train[f] * per_token,
                            "fraction_of_measured_peak": train[f] and train[f] * per_token / peak}
                        for f in FRAMEWORKS}
  nominal = doc.get("nominal_peak_flops")
  if nominal and train["jax"]:
    doc["utilisation"]["jax"]["mfu_vs_nominal_bf16_peak"] = train["jax"] * per_token / nominal
  kt = target_k(c["clients"])
  # The JAX round is the fastest of its client modes at K (a run picks one: config.mode).
  by_mode = {m: _times(res, "jax", kt, m) for m in c["modes"]}
  by_mode = {m: t for m, t in by_mode.items() if t}
  best_mode = min(by_mode, key=by_mode.get) if by_mode else None
  ratios = {
      "train_jax_over_torch_eager": _ratio(train["jax"], train["torch_eager"]),
      "train_jax_over_torch_compile": _ratio(train["jax"], train["torch_compile"]),
      f"round_K{kt}_torch_eager_over_jax": _ratio(_times(res, "torch_eager", kt, "sequential"),
                                                by_mode.get(best_mode)),
      f"round_K{kt}_memory_torch_eager_over_jax": _ratio(
          _round_mb(res, "torch_eager", kt, "sequential"),
          best_mode and _round_mb(res, "jax", kt, best_mode)),
      "generate_jax_over_hf": _ratio(_get(res, "jax", "generate", "new_tokens_per_s"),
                                     _get(res, "torch_eager", "generate", "new_tokens_per_s")),
  }
  doc["ratios"], doc["round_jax_mode"] = ratios, best_mode
  goals = [
      ("train tokens/s, JAX / torch eager", ratios["train_jax_over_torch_eager"], 2.0),
      ("train tokens/s, JAX / torch.compile", ratios["train_jax_over_torch_compile"], 1.5),
      (f"round wall time K={kt}, torch eager / JAX ({best_mode} clients)",
       ratios[f"round_K{kt}_torch_eager_over_jax"], 2.0),
      # JAX's peak at most 1.5x torch's: torch / JAX >= 1 / 1.5.
      (f"round peak memory K={kt}, torch eager / JAX ({best_mode} clients)",
       ratios[f"round_K{kt}_memory_torch_eager_over_jax"], 1 / 1.5),
      (f"generation new tokens/s at batch {c['generate']['batch_size']}, JAX / transformers",
       ratios["generate_jax_over_hf"], 3.0),
  ]
  if doc["device"]["jax"]["platform"] == "gpu":
    goals.append(("JAX MFU vs nominal bf16 peak",
                  doc["utilisation"]["jax"].get("mfu_vs_nominal_bf16_peak"), 0.45))
  else:
    goals.append(("JAX train FLOP/s / measured peak matmul FLOP/s",
                  doc["utilisation"]["jax"]["fraction_of_measured_peak"], 0.60))
  doc["targets"] = [{"target": name, "value": value, "goal": goal,
                     "met": None if value is None else value >= goal,
                     "shortfall": None if value is None or value >= goal else 1 - value / goal}
                    for name, value, goal in goals]
  return doc


def _row(name, values, higher_is_better=True):
  """A table row: JAX, torch eager, torch.compile, then JAX's advantage over each."""
  j, e, k = values
  adv = (lambda other: _ratio(j, other)) if higher_is_better else (lambda other: _ratio(other, j))
  cell = lambda r: "—" if r is None else f"{_fmt(r)}x"
  return f"| {name} | {_fmt(j)} | {_fmt(e)} | {_fmt(k)} | {cell(adv(e))} | {cell(adv(k))} |"


def _header(doc) -> list[str]:
  c, m = doc["config"], doc["config"]["model"]
  dev = doc["device"]["jax"]
  return [f"# Benchmark `{c['shape']}` on {dev['device_kind']} ({dev['platform']}), {doc['date']}",
          "",
          (f"Model: `{c['checkpoint']}` (its real weights and shape)"
           if c.get("checkpoint") else
           f"Model: {m['num_layers']} layers, width {m['hidden_size']}, MLP "
           f"{m['intermediate_size']}, {m['num_heads']}/{m['num_kv_heads']} heads, vocab "
           f"{m['vocab_size']}") + f", {c['dtype']} base; LoRA r={c['lora']['rank']}, "
          f"alpha={c['lora']['alpha']} on {c['lora']['targets']}. Batch {c['batch_size']} x "
          f"{c['seq_len']} tokens, {c['steps']} local steps per client, AdamW + cosine. "
          f"Median of {c['repeats']} repetition(s) after a first (compile) call. The last two "
          "columns are JAX's advantage: > 1 means JAX is faster or smaller.", ""]


def _measure_rows(doc) -> list[str]:
  res, c = doc["results"], doc["config"]
  util = doc["utilisation"]
  rows = ["| measure | JAX | torch eager | torch.compile | JAX vs eager | JAX vs compile |",
          "|---|---|---|---|---|---|",
          _row("LoRA training, tokens/s", [_get(res, f, "train", "tokens_per_s") for f in FRAMEWORKS]),
          _row("first call (compile/warm-up), s",
               [_get(res, f, "train", "first_s") for f in FRAMEWORKS], higher_is_better=False),
          _row("achieved GFLOP/s (training)",
               [util[f]["achieved_flops"] and util[f]["achieved_flops"] / 1e9 for f in FRAMEWORKS]),
          _row("fraction of measured peak matmul",
               [util[f]["fraction_of_measured_peak"] for f in FRAMEWORKS])]
  for mode in c["modes"]:
    for k in c["clients"]:
      if _get(res, "jax", "rounds", f"{mode}/K={k}", "skipped"):
        continue  # would not fit in memory (named under the table)
      rows.append(_row(f"round wall time K={k}, s (JAX {mode} clients)",
                       [_times(res, "jax", k, mode), _times(res, "torch_eager", k, "sequential"),
                        _times(res, "torch_compile", k, "sequential")], higher_is_better=False))
      rows.append(_row(f"round peak memory K={k}, MB (JAX {mode} clients)",
                       [_round_mb(res, "jax", k, mode),
                        _round_mb(res, "torch_eager", k, "sequential"),
                        _round_mb(res, "torch_compile", k, "sequential")],
                       higher_is_better=False))
  g = c["generate"]
  rows.append(_row(f"generation new tokens/s (batch {g['batch_size']}, {g['prompt_len']}+"
                   f"{g['new_tokens']}; torch = transformers generate)",
                   [_get(res, "jax", "generate", "new_tokens_per_s"),
                    _get(res, "torch_eager", "generate", "new_tokens_per_s"), None]))
  rows.append(_row("  of which prefill (one-token call), s",
                   [_get(res, f, "generate", "prefill_s") for f in ("jax", "torch_eager")] + [None],
                   higher_is_better=False))
  rows.append(_row("  decoding steps alone, new tokens/s",
                   [_get(res, f, "generate", "decode_tokens_per_s") for f in ("jax", "torch_eager")]
                   + [None]))
  for task in ("train", "generate"):
    rows.append(_row(f"peak memory, MB ({task})",
                     [_get(res, f, task, "memory", "peak_mb") for f in FRAMEWORKS],
                     higher_is_better=False))
  return rows + [""]


def _notes(doc) -> list[str]:
  c, peaks = doc["config"], doc["peak_matmul_flops"]
  kind = _get(doc["results"], "jax", "train", "memory", "kind") or "?"
  gflops = lambda x: _fmt((x or 0.0) / 1e9)
  skipped = [f"{key} ({node['skipped']})"
             for key, node in doc["results"].get("jax", {}).get("rounds", {}).items()
             if isinstance(node, dict) and node.get("skipped")]
  return [f"Memory: {kind}. A round's figure is its worker's running peak after that K (each "
          "JAX client mode runs in its own worker, K ascending)."
          + (f" Not run, for memory: {'; '.join(skipped)}." if skipped else "")
          + (f" Not run (config.skip): {', '.join(c['skip'])}." if c.get("skip") else "")
          + f" Peak matmul ({c['peak_matmul_size']}^3, {c['dtype']}): JAX "
          f"{gflops(peaks.get('jax'))} GFLOP/s, torch {gflops(peaks.get('torch'))} GFLOP/s; "
          "the larger is the device peak used above."
          + (f" CPU: {doc['cpu_model']} ({doc.get('cpu_flags') or 'flags unknown'})."
             if doc.get("cpu_model") else ""), "",
          f"FLOPs: {doc['flops']['train_formula']} = "
          f"{doc['flops']['train_per_token'] / 1e6:.1f} MFLOP/token.", ""]


def _target_rows(doc) -> list[str]:
  rows = ["| target | value | goal | status |", "|---|---|---|---|"]
  for t in doc["targets"]:
    if t["met"] is None:
      status = "not measured"
    elif t["met"]:
      status = "met"
    else:
      status = f"missed by {100 * t['shortfall']:.0f}%"
    rows.append(f"| {t['target']} | {_fmt(t['value'])} | {_fmt(float(t['goal']))} | {status} |")
  return rows


def markdown(doc: dict) -> str:
  lines = _header(doc) + _measure_rows(doc) + _notes(doc) + _target_rows(doc)
  if doc.get("errors"):
    lines += ["", "Failed measurements:"] + [f"- `{k}`: {v}" for k, v in doc["errors"].items()]
  return "\n".join(lines) + "\n"
