r"""Federated LoRA fine-tuning: all clients of a round in one compiled program.

  python -m launch.federate --workdir=/tmp/fedjax_run                    # synthetic default
  python -m launch.federate --workdir=DIR --config.algorithm=fedmedlora_plus --config.run.rounds=5
  python -m launch.federate --workdir=DIR --resume                       # continue the last run

Prints one line per round (clients, train loss, server validation loss, aggregation
weights, bytes sent, seconds) and, every run.eval_every rounds, F1 on a few test examples
per site (config.eval.round_examples_per_task; 0 turns it off); writes Orbax checkpoints
of every round, metrics.jsonl, per-round plots (workdir/plots) and, at the end, the
global adapter in PEFT format (workdir/adapter).
"""

import json
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from fedjax_lora import experiment
from fedjax_lora.eval import hooks, plots, report, settings
from fedjax_lora.eval.decoding import Decoder
from launch import errors
from models import hf_checkpoint, peft_io

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "federate.py"),
    "Federation config (ml_collections); override fields as --config.a.b=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: data cache, checkpoints, metrics, "
                               "adapter.", required=True)
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-host TPU/GPU; coordinator from the environment).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  log = lambda s: print(s, file=sys.stderr, flush=True)
  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  config = _CONFIG.value
  fed = experiment.build(config, workdir, log=log)
  hook = None
  if config.get("eval") is not None:  # configs written before the eval group have none
    decoder = Decoder(fed.model_config, fed.graphdef, fed.data.renderer,
                      settings.decode_config(config.eval), log=log)
    hook = hooks.hook_from_config(config, fed.data, decoder, [s.name for s in fed.sites])
    fed.hooks.append(hook)
  if _RESUME.value:
    fed.resume()
  elif fed.checkpointer is not None and fed.checkpointer.latest_round() is not None:
    raise app.UsageError(f"{workdir} already holds checkpoints; pass --resume to continue or use "
                         "a fresh --workdir")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  zero_shot = hooks.zero_shot_f1(fed, hook, workdir / "zero_shot.json", log)
  fed.run_rounds()  # appends one line per round to workdir/metrics.jsonl as it goes
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  final = next((row["f1"] for row in reversed(rows) if "f1" in row), None)
  if zero_shot and final:
    print(f"F1 on the per-round evaluation slice ({config.eval.round_examples_per_task} test "
          "examples per site and task), zero-shot -> final round:\n"
          + report.f1_change_table(zero_shot, final))
  written = plots.plot_workdir(workdir, config.algorithm)
  if written:
    print(f"per-round plots: {', '.join(str(p) for p in written)}")
  out = peft_io.export_adapter(workdir / "adapter", fed.global_adapters()[0],
                               fed.model_config.num_layers, str(workdir / "base_model"))
  print(f"final global adapter (PEFT format): {out}")
  if fed.algorithm.merge_base:  # FLoRA folds every round's products into the base weights
    merged = hf_checkpoint.save_params(workdir / "merged_model", fed.model_config,
                                       jax.device_get(fed.effective_base()))
    print(f"FLoRA base with the aggregated updates merged in (HF format): {merged}")


if __name__ == "__main__":
  errors.run(main)
