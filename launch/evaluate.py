r"""The paper's evaluation settings in one run: train each baseline, generate, score, report.

  python -m launch.evaluate --workdir=/tmp/fedjax_eval                     # synthetic default
  python -m launch.evaluate --config=configs/evaluate_five_sites.py --workdir=DIR   # real sites
  python -m launch.evaluate --workdir=DIR --config.eval.settings=zero_shot,federated \
      --config.eval.algorithms=fedavg,fedmedlora_plus,fedsa_lora
  python -m launch.evaluate --config=configs/evidence.py --workdir=DIR   # the claims matrix

Writes workdir/results.json (every score: strict/lenient/per-type/seqeval, per-example
counts, problem counts, sample outputs, generation throughput, per-round histories, the
claim table with paired bootstrap intervals, communication), workdir/results.md (rows =
settings, columns = sites x strict/lenient F1; claims; size and time per setting),
workdir/plots/ (F1 per setting and site, per round, against k, against validation size)
and per-round plots of every federated run under workdir/runs/<setting>/plots/.
Resumable: each finished setting is saved at once, and rerunning the same command with the
same workdir skips finished settings (a different config in that workdir is refused).
"""

import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from fedjax_lora.eval.settings import SettingsRun
from launch import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "evaluate.py"),
    "Evaluation config (ml_collections): a federate config with an `eval` group; override "
    "fields as --config.a.b=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory: data cache, base model, "
                               "federated runs, results.json, results.md, plots.", required=True)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing: recompute the claim table, communication and plots "
    "from the settings already in --workdir's results.json (e.g. of a run still going, or "
    "with other --config.eval.bootstrap_* values) and rewrite results.json and results.md.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  log(f"devices: {jax.devices()}")
  out = Path(_WORKDIR.value)
  if _REPORT_ONLY.value and not (out / "results.json").is_file():
    raise app.UsageError(f"--report_only: no results.json in {out} to report on")
  runner = SettingsRun(_CONFIG.value, _WORKDIR.value, log=log, report_only=_REPORT_ONLY.value)
  runner.report() if _REPORT_ONLY.value else runner.run()
  print((out / "results.md").read_text())
  print(f"results: {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
  errors.run(main)
