r"""The PyTorch reference run: transformers + peft, clients one after another on one model,
FedAvg of the adapters, on exactly the data, base weights, adapter init and schedule that
`launch.federate` uses for the same config.

  python -m launch.torch_baseline --workdir=/tmp/torch_run                 # synthetic default
  python -m launch.torch_baseline --workdir=DIR --config.model.path=/path/to/Llama-3.2-1B \
      --config.model.dtype=bfloat16 --compile --device=cuda

Prints one line per round (per-site training loss, seconds), appends them to
workdir/metrics.jsonl and writes the final global adapter in PEFT format (workdir/adapter).
Only `fedavg` is implemented here: it is the baseline the peer frameworks run.
"""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from fedjax_lora import experiment
from launch import errors
from models import peft_io
from models.lora import LoraAdapter

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "federate.py"),
    "Federation config, as for launch.federate (algorithm must be fedavg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: data cache, metrics, adapter.",
                               required=True)
_COMPILE = flags.DEFINE_bool("compile", False, "Wrap the model in torch.compile.")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device: cpu or cuda.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from fedjax_lora import torch_baseline  # needs the [torch] extra; fails with how to install
  config = _CONFIG.value
  if config.algorithm != "fedavg":
    raise app.UsageError(f"--config.algorithm={config.algorithm}: the PyTorch baseline runs "
                         "fedavg only")
  if config.model.get("quantize", "none") != "none":
    raise app.UsageError(f"--config.model.quantize={config.model.quantize!r}: the PyTorch "
                         "baseline trains a float base (no bitsandbytes 4-bit model); set "
                         "--config.model.quantize=none to compare like with like")
  if config.keep_optimizer_state:
    raise app.UsageError("--config.keep_optimizer_state: the PyTorch baseline starts a fresh "
                         "AdamW every round, as the paper does")
  log = lambda s: print(s, file=sys.stderr, flush=True)
  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  # The JAX side prepares data, base model and round plans; no JAX round is run.
  fed = experiment.build(config, workdir, log=log)
  model_dir = config.model.path or str(workdir / "base_model")
  spec = fed.spec.global_spec
  baseline = torch_baseline.TorchFederation(model_dir, spec, fed.spec.client,
                                            compile=_COMPILE.value, device=_DEVICE.value,
                                            dtype=config.model.dtype)
  global_params = jax.tree.map(np.asarray, fed.state["global"])
  for r in range(1, config.run.rounds + 1):
    idx, present, batches, step_mask, _, _ = fed.round_inputs(r)
    kept = [k for k in range(len(idx)) if present[k]]
    clients = [(jax.tree.map(lambda x: x[k], batches), step_mask[k]) for k in kept]
    t0 = time.perf_counter()
    global_params, metrics = baseline.run_round(global_params, clients,
                                                fed.token_counts[idx][kept])
    names = [fed.sites[idx[k]].name for k in kept]
    row = {"round": r, "train_loss": {n: m["train_loss"] for n, m in zip(names, metrics)},
           "seconds": time.perf_counter() - t0}
    losses = " ".join(f"{n}={v:.4f}" for n, v in row["train_loss"].items())
    print(f"round {r:3d} | clients {len(kept)}/{len(idx)} | loss {losses} | "
          f"{row['seconds']:.1f}s", flush=True)
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(row) + "\n")
  out = peft_io.export_adapter(workdir / "adapter", LoraAdapter(global_params, spec),
                               fed.model_config.num_layers, model_dir)
  print(f"final global adapter (PEFT format): {out}")


if __name__ == "__main__":
  errors.run(main)
