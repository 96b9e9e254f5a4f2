r"""Throughput of the JAX simulator against transformers + peft, in one invocation.

  python -m launch.benchmark                                    # small shape, this machine
  python -m launch.benchmark --config=configs/benchmark.py:tiny --out=/tmp/bench   # smoke
  python -m launch.benchmark --config=configs/benchmark.py:llama3_2_1b             # on a GPU

Each (framework, task) runs in its own worker process, so peak memory is per task and
neither framework's threads or allocator disturb the other. Writes NAME.json (device,
versions, every time) and NAME.md (the table with JAX/torch ratios and target checks).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from fedjax_lora import client_modes
from launch import errors
from models import quant

REPO = Path(__file__).resolve().parent.parent
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO / "configs" / "benchmark.py"),
    "Benchmark config; `configs/benchmark.py:SHAPE` with SHAPE in tiny, small, smollm2_135m, "
    "llama3_2_1b, llama3_8b. Fields are overridable: --config.repeats=5.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory for the random checkpoint "
                               "and worker outputs (default: a new temporary directory).")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"),
                           "Directory for NAME.json and NAME.md (a worker: its JSON file).")
_NAME = flags.DEFINE_string("name", None, "Result file stem (default: SHAPE_DEVICE).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: FRAMEWORK/TASK to run in this process.")
_RESUME = flags.DEFINE_bool("resume", False, "Reuse the results of workers that finished in "
                            "--workdir under the same config (frameworks, tasks, modes and "
                            "skip may differ; delete a worker's JSON there to run it again); the rest "
                            "run.")

TASKS = ("train", "rounds", "generate")
SELECTION = ("frameworks", "tasks", "modes", "skip")  # config fields that only pick workers
CONFIG_FILE = "config.json"  # the resolved config, in the workdir, for the workers


# ---- worker side ---------------------------------------------------------------------------
def run_worker(spec: str, c, workdir: Path) -> dict:
  framework, task, *mode = spec.split("/", 2)  # jax/rounds/MODE: one client mode
  if framework == "jax":
    from fedjax_lora.bench import jax_side as side
    out = {"device": side.device_description()}
    if task == "setup":
      from fedjax_lora.bench import workload
      from models import checkpoints, hf_checkpoint, llama
      cfg = workload.model_config(c)
      if c.get("checkpoint"):  # real weights (HF dir, .gguf or named base), as HF for torch
        cfg, _, base = checkpoints.load_params(checkpoints.resolve(c.checkpoint), cfg)
      else:
        _, base = llama.init_model(cfg, seed=c.seed)
      hf_checkpoint.save_params(workload.checkpoint_dir(workdir), cfg, base)
      return out
    if task == "train":
      out["peak_matmul_flops"] = side.peak_matmul(c.peak_matmul_size, c.dtype)
    if task == "rounds" and not mode:
      raise app.UsageError(f"--worker={spec}: JAX rounds run one mode, e.g. jax/rounds/vmap")
    out.update(side.rounds(c, workdir, mode[0]) if task == "rounds" else
               getattr(side, task)(c, workdir))
    return out
  from fedjax_lora.bench import torch_side as side
  compiled = framework == "torch_compile"
  out = {"device": side.device_description(c)}
  if task == "train":
    out["peak_matmul_flops"] = side.peak_matmul(c, c.peak_matmul_size)
  if task == "generate":
    out.update(side.generate(c, workdir))
  else:
    out.update(getattr(side, task)(c, workdir, compiled))
  return out


# ---- orchestration -------------------------------------------------------------------------
def _versions() -> dict:
  import importlib.metadata as md
  out = {"python": platform.python_version(), "platform": platform.platform()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def _worker_env(spec: str, scratch: Path) -> dict:
  env = dict(os.environ)
  if spec.startswith("torch"):
    # Torch workers use JAX only on the host (configs, the adapter init): keep it off the
    # accelerator so that it neither takes memory from torch nor preallocates a pool.
    env["JAX_PLATFORMS"] = "cpu"
  # Cold compilation in every worker, on both sides: no persistent JAX cache (a test
  # session may set one), and a fresh torch.compile cache.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor_cache")
  env["TRITON_CACHE_DIR"] = str(scratch / "triton_cache")
  # One device per worker: drop a forced host device count (e.g. from the test setup).
  flags_value = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = flags_value
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  env.setdefault("HF_HUB_OFFLINE", "1")
  return env


def _spawn(spec: str, workdir: Path) -> tuple[dict | None, str | None]:
  out = workdir / "workers" / (re.sub(r"[^A-Za-z0-9_.-]", "_", spec.replace("/", "__"))
                               + ".json")
  log = out.with_suffix(".stderr")
  out.parent.mkdir(parents=True, exist_ok=True)
  if _RESUME.value and out.is_file():
    print(f"[{spec}] reused from {out}", flush=True)
    return json.loads(out.read_text()), None
  print(f"[{spec}] running", flush=True)
  # The worker reads the resolved config from workdir/config.json.
  cmd = [sys.executable, "-m", "launch.benchmark", f"--worker={spec}", f"--workdir={workdir}",
         f"--out={out}"]
  with open(log, "w") as err:
    proc = subprocess.run(cmd, cwd=REPO, env=_worker_env(spec, out.with_suffix("")),
                          stderr=err)
  if proc.returncode != 0 or not out.is_file():
    tail = [l for l in log.read_text().splitlines() if l.strip()][-3:]
    return None, " | ".join(tail) or f"exit status {proc.returncode}"
  return json.loads(out.read_text()), None


def _device_slug(device: dict) -> str:
  if device.get("platform") == "cpu":
    return "cpu"
  return re.sub(r"[^a-z0-9]+", "-", device.get("device_kind", "device").lower()).strip("-")


def _worker_specs(c) -> list[str]:
  """FRAMEWORK/TASK for each worker process; JAX rounds run one process per client mode, so
  each mode's peak memory is its own."""
  specs = []
  for framework in c.frameworks:
    for task in c.get("tasks", TASKS):
      if task == "generate" and framework == "torch_compile":
        continue  # generation is compared against transformers' own generate
      if task == "rounds" and framework == "jax":
        specs += [f"jax/rounds/{mode}" for mode in c.modes]
      else:
        specs.append(f"{framework}/{task}")
  return [s for s in specs if s not in c.get("skip", ())]


def _run_workers(c, workdir: Path):
  """(results by framework and task, errors by worker, devices, peak matmul FLOP/s)."""
  results, failed, devices, peaks = {}, {}, {}, {}
  for spec in _worker_specs(c):
    framework, task = spec.split("/")[:2]
    result, error = _spawn(spec, workdir)
    if error:
      failed[spec] = error
      print(f"[{spec}] FAILED: {error}", flush=True)
      continue
    device = result.pop("device")
    peak = result.pop("peak_matmul_flops", None)
    results.setdefault(framework, {}).setdefault(task, {}).update(result)
    devices["jax" if framework == "jax" else "torch"] = device
    if peak:
      side = "jax" if framework == "jax" else "torch"
      peaks[side] = max(peaks.get(side, 0.0), peak)
  return results, failed, devices, peaks


def _same_device(devices: dict) -> str | None:
  """Why the two frameworks' figures are not comparable, or None."""
  jax_platform = devices.get("jax", {}).get("platform")
  torch_device = devices.get("torch", {}).get("device")
  if jax_platform and torch_device and (jax_platform == "cpu") != (torch_device == "cpu"):
    return (f"JAX ran on {jax_platform} but torch on {torch_device}; install both for the "
            "same device or set --config.device")
  return None


def orchestrate(c, workdir: Path, out_dir: Path, name: str | None) -> dict:
  from fedjax_lora.bench import flops, report, workload
  resolved = c.to_json_best_effort(indent=2)
  if _RESUME.value and (workdir / CONFIG_FILE).is_file():
    # Which workers run may change; what each one measures may not.
    what = lambda cfg: {k: v for k, v in cfg.items() if k not in SELECTION}
    if what(json.loads((workdir / CONFIG_FILE).read_text())) != what(json.loads(resolved)):
      raise app.UsageError(f"--resume: {workdir / CONFIG_FILE} measured another config; use "
                           "a new --workdir, or change only frameworks, tasks, modes or skip")
  (workdir / CONFIG_FILE).write_text(resolved)
  setup, error = _spawn("jax/setup", workdir)
  if error:
    print(f"error: could not create the benchmark checkpoint: {error}", file=sys.stderr)
    sys.exit(1)
  results, failed, devices, peaks = _run_workers(c, workdir)
  devices.setdefault("jax", setup["device"])
  mismatch = _same_device(devices)
  if mismatch:
    failed["device"] = mismatch
  cfg, spec = workload.model_config(c), workload.lora_spec(c)
  g = c.generate
  doc = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "config": c.to_dict(),
      "device": devices,
      "cpu_model": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "software": _versions(),
      "flops": {
          "train_per_token": flops.train_flops_per_token(cfg, spec, c.seq_len),
          "decode_per_token": flops.decode_flops_per_token(
              cfg, spec, g.prompt_len + g.new_tokens / 2),
          "train_formula": flops.TRAIN_FORMULA, "decode_formula": flops.DECODE_FORMULA,
          "matmul_params": flops.matmul_params(cfg), "lora_params": flops.lora_params(cfg, spec)},
      "peak_matmul_flops": {**peaks, "measured_peak": max(peaks.values()) if peaks else None},
      "nominal_peak_flops": report.nominal_peak(devices["jax"].get("device_kind", ""), c.dtype),
      "results": results,
      "errors": failed,
  }
  if doc["peak_matmul_flops"]["measured_peak"] and not mismatch:
    report.summarize(doc)
  name = name or f"{c.shape}_{_device_slug(devices['jax'])}"
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
  table = report.markdown(doc) if "targets" in doc else "no comparable figures; see the JSON\n"
  (out_dir / f"{name}.md").write_text(table)
  print(table)
  print(f"wrote {out_dir / name}.json and .md", flush=True)
  return doc


def _cpu_model() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def _cpu_flags() -> str | None:
  """The CPU's vector extensions. The model name alone says too little: two machines named
  'AMD EPYC' here gave 494 and 59 GFLOP/s on the same 2048^3 float32 matmul."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return " ".join(sorted(f for f in have if f.startswith(("avx", "fma", "amx")))) or None
  except OSError:
    pass
  return None


def main(argv):
  del argv
  c = _CONFIG.value
  if _WORKER.value:
    workdir = Path(_WORKDIR.value)
    c = ml_collections.ConfigDict(json.loads((workdir / CONFIG_FILE).read_text()))
    result = run_worker(_WORKER.value, c, workdir)
    Path(_OUT.value).write_text(json.dumps(result, indent=2))
    return
  for mode in c.modes:
    try:
      client_modes.parse(mode)
    except ValueError as e:
      raise app.UsageError(f"--config.modes: {e}") from None
  unknown = [f for f in c.frameworks if f not in ("jax", "torch_eager", "torch_compile")]
  if unknown:
    raise app.UsageError(f"--config.frameworks: unknown {unknown}; expected jax, torch_eager, "
                         "torch_compile")
  unknown = [t for t in c.get("tasks", TASKS) if t not in TASKS]
  if unknown:
    raise app.UsageError(f"--config.tasks: unknown {unknown}; expected some of {TASKS}")
  if "jax" not in c.frameworks:
    raise app.UsageError("--config.frameworks must include jax (the ratios are against it)")
  try:
    qc = quant.QuantConfig.from_settings(c.model)
  except ValueError as e:
    raise app.UsageError(f"--config.model.{e}") from None
  if qc.reads_gguf and not c.get("checkpoint"):
    raise app.UsageError("--config.model.quantize=keep holds a GGUF base's blocks: set "
                         "--config.checkpoint to a .gguf file or a named base")
  workdir = Path(_WORKDIR.value or tempfile.mkdtemp(prefix="fedjax_bench_"))
  workdir.mkdir(parents=True, exist_ok=True)
  doc = orchestrate(c, workdir, Path(_OUT.value), _NAME.value)
  if doc["errors"]:
    print(f"error: {len(doc['errors'])} measurement(s) failed: {sorted(doc['errors'])}; "
          f"worker logs in {workdir / 'workers'}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  errors.run(main)
