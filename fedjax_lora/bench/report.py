"""The benchmark's ratios, target checks and Markdown table, from the workers' results."""

from __future__ import annotations

# Dense bf16 peaks of accelerators we may be lent (vendor figures, FLOP/s).
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}

FRAMEWORKS = ("jax", "torch_eager", "torch_compile")
LABELS = {"jax": "JAX", "torch_eager": "torch eager", "torch_compile": "torch.compile"}


def nominal_peak(device_kind: str) -> float | None:
  for name, peak in NOMINAL_BF16_PEAK.items():
    if name in device_kind:
      return peak
  return None


def _get(results, framework, task, *keys):
  node = results.get(framework, {}).get(task)
  for k in keys:
    if not isinstance(node, dict) or k not in node:
      return None
    node = node[k]
  return node


def _fmt(x, digits=3):
  if x is None:
    return "—"
  if isinstance(x, float):
    if abs(x) >= 1000:
      return f"{x:,.0f}"
    return f"{x:.{digits}g}"
  return str(x)


def _ratio(num, den):
  return None if not num or not den else num / den


def summarize(doc: dict) -> dict:
  """Adds doc['ratios'] and doc['targets'] (each target: value, goal, met, by how much)."""
  res, c = doc["results"], doc["config"]
  peak = doc["peak_matmul_flops"]["measured_peak"]
  train = {f: _get(res, f, "train", "tokens_per_s") for f in FRAMEWORKS}
  per_token = doc["flops"]["train_per_token"]
  util = {f: (None if not train[f] else train[f] * per_token / peak) for f in FRAMEWORKS}
  doc["utilisation"] = {f: {"achieved_flops": None if not train[f] else train[f] * per_token,
                            "fraction_of_measured_peak": util[f]} for f in FRAMEWORKS}
  nominal = doc.get("nominal_peak_flops")
  if nominal and train["jax"]:
    doc["utilisation"]["jax"]["mfu_vs_nominal_bf16_peak"] = train["jax"] * per_token / nominal
  kmax = max(c["clients"])
  # The JAX round is the faster of its client modes (a run picks one with config.mode).
  by_mode = {m: _get(res, "jax", "rounds", f"{m}/K={kmax}", "median_s") for m in c["modes"]}
  by_mode = {m: t for m, t in by_mode.items() if t}
  best_mode = min(by_mode, key=by_mode.get) if by_mode else None
  round_jax = by_mode.get(best_mode)
  round_eager = _get(res, "torch_eager", "rounds", f"sequential/K={kmax}", "median_s")
  gen_jax = _get(res, "jax", "generate", "new_tokens_per_s")
  gen_hf = _get(res, "torch_eager", "generate", "new_tokens_per_s")
  ratios = {
      "train_jax_over_torch_eager": _ratio(train["jax"], train["torch_eager"]),
      "train_jax_over_torch_compile": _ratio(train["jax"], train["torch_compile"]),
      f"round_K{kmax}_torch_eager_over_jax": _ratio(round_eager, round_jax),
      "generate_jax_over_hf": _ratio(gen_jax, gen_hf),
  }
  doc["ratios"] = ratios
  doc["round_jax_mode"] = best_mode
  on_gpu = doc["device"]["jax"]["platform"] == "gpu"
  goals = [
      ("train tokens/s, JAX / torch eager", ratios["train_jax_over_torch_eager"], 1.5),
      ("train tokens/s, JAX / torch.compile", ratios["train_jax_over_torch_compile"], 1.0),
      (f"round wall time K={kmax}, torch eager / JAX ({best_mode} clients)",
       ratios[f"round_K{kmax}_torch_eager_over_jax"], 2.0),
      (f"generation new tokens/s at batch {c['generate']['batch_size']}, JAX / transformers",
       ratios["generate_jax_over_hf"], 3.0),
  ]
  if on_gpu:
    goals.append(("JAX MFU vs nominal bf16 peak",
                  doc["utilisation"]["jax"].get("mfu_vs_nominal_bf16_peak"), 0.45))
  else:
    goals.append(("JAX train FLOP/s / measured peak matmul FLOP/s", util["jax"], 0.60))
  doc["targets"] = [{"target": name, "value": value, "goal": goal,
                     "met": None if value is None else value >= goal,
                     "shortfall": None if value is None or value >= goal else 1 - value / goal}
                    for name, value, goal in goals]
  return doc


def markdown(doc: dict) -> str:
  res, c = doc["results"], doc["config"]
  dev = doc["device"]
  lines = [f"# Benchmark `{c['shape']}` on {dev['jax']['device_kind']} "
           f"({dev['jax']['platform']}), {doc['date']}", ""]
  m = c["model"]
  lines += [f"Model: {m['num_layers']} layers, width {m['hidden_size']}, MLP "
            f"{m['intermediate_size']}, {m['num_heads']}/{m['num_kv_heads']} heads, vocab "
            f"{m['vocab_size']}, {c['dtype']} base; LoRA r={c['lora']['rank']}, "
            f"alpha={c['lora']['alpha']} on {c['lora']['targets']}. Batch {c['batch_size']} x "
            f"{c['seq_len']} tokens, {c['steps']} local steps per client, AdamW + cosine. "
            f"Median of {c['repeats']} repetition(s) after a first (compile) call.", ""]
  lines += ["| measure | JAX | torch eager | torch.compile | JAX vs eager | JAX vs compile |",
            "|---|---|---|---|---|---|"]

  def row(name, vals, higher_is_better=True, digits=3):
    j, e, k = vals
    ratio = (lambda a, b: _ratio(a, b)) if higher_is_better else (lambda a, b: _ratio(b, a))
    lines.append(f"| {name} | {_fmt(j, digits)} | {_fmt(e, digits)} | {_fmt(k, digits)} | "
                 f"{_fmt(ratio(j, e))}x | {_fmt(ratio(j, k))}x |")

  row("LoRA training, tokens/s", [_get(res, f, "train", "tokens_per_s") for f in FRAMEWORKS])
  row("first call (compile/warm-up), s",
      [_get(res, f, "train", "first_s") for f in FRAMEWORKS], higher_is_better=False)
  util = doc["utilisation"]
  row("achieved GFLOP/s (training)",
      [None if util[f]["achieved_flops"] is None else util[f]["achieved_flops"] / 1e9
       for f in FRAMEWORKS])
  row("fraction of measured peak matmul",
      [util[f]["fraction_of_measured_peak"] for f in FRAMEWORKS])
  for k in c["clients"]:
    row(f"round wall time K={k}, s (JAX vmap)",
        [_get(res, "jax", "rounds", f"vmap/K={k}", "median_s"),
         _get(res, "torch_eager", "rounds", f"sequential/K={k}", "median_s"),
         _get(res, "torch_compile", "rounds", f"sequential/K={k}", "median_s")],
        higher_is_better=False)
  if "sequential" in c["modes"]:
    for k in c["clients"]:
      row(f"round wall time K={k}, s (JAX sequential clients)",
          [_get(res, "jax", "rounds", f"sequential/K={k}", "median_s"),
           _get(res, "torch_eager", "rounds", f"sequential/K={k}", "median_s"),
           _get(res, "torch_compile", "rounds", f"sequential/K={k}", "median_s")],
          higher_is_better=False)
  g = c["generate"]
  row(f"generation new tokens/s (batch {g['batch_size']}, {g['prompt_len']}+{g['new_tokens']}; "
      "torch = transformers generate)",
      [_get(res, "jax", "generate", "new_tokens_per_s"),
       _get(res, "torch_eager", "generate", "new_tokens_per_s"), None])
  for task in ("train", "rounds", "generate"):
    row(f"peak memory, MB ({task})",
        [_get(res, f, task, "memory", "peak_mb") for f in FRAMEWORKS], higher_is_better=False)
  lines.append("")
  mem_kind = _get(res, "jax", "train", "memory", "kind") or "?"
  peaks = doc["peak_matmul_flops"]
  lines += [f"Memory: {mem_kind}. Peak matmul ({c['peak_matmul_size']}^3, {c['dtype']}): "
            f"JAX {_fmt((peaks.get('jax') or 0) / 1e9)} GFLOP/s, torch "
            f"{_fmt((peaks.get('torch') or 0) / 1e9)} GFLOP/s; the larger is the device peak used "
            "above.", "", f"FLOPs: {doc['flops']['train_formula']} = "
            f"{doc['flops']['train_per_token'] / 1e6:.1f} MFLOP/token.", ""]
  lines += ["| target | value | goal | status |", "|---|---|---|---|"]
  for t in doc["targets"]:
    if t["met"] is None:
      status = "not measured"
    elif t["met"]:
      status = "met"
    else:
      status = f"missed by {100 * t['shortfall']:.0f}%"
    lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {status} |")
  if doc.get("errors"):
    lines += ["", "Failed measurements:"]
    lines += [f"- `{k}`: {v}" for k, v in doc["errors"].items()]
  return "\n".join(lines) + "\n"
