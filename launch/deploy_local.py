r"""A real Flower deployment on this machine: one SuperLink, one SuperNode per hospital.

  python -m launch.deploy_local --workdir=DIR --sites=3 --rounds=2 \
      --config=configs/federate.py:tiny                    # the demo, about 2 minutes
  python -m launch.deploy_local --workdir=DIR --resume     # restart the coordinator

Lays the run out (each site's examples, base and key in DIR/sites/<site>; the coordinator's
config, key registry and validation examples in DIR), starts a SuperLink and N SuperNodes
on 127.0.0.1 (each with a resident worker that keeps its base and compiled programs loaded
across rounds, unless --noresident_workers), runs the federation with `flwr run`, checks
the ServerApp's final status, verifies the audit trail and tears every process down,
whatever happens. DIR then holds what `launch.federate` writes: checkpoints/,
metrics.jsonl, per-round plots, ledger.jsonl, config.json and the PEFT adapter under
DIR/adapter (no per-round F1: the coordinator holds no site's test notes); the
components' logs are in DIR/logs. For a deployment across machines see README
("Deploying across hospitals").
"""

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from fedjax_lora.deploy import layout, server
from fedjax_lora.errors import DeployError
from fedjax_lora.eval import plots
from fedjax_lora.security import audit
from launch import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "federate.py"),
    "Federation config (as for launch.federate); override fields as --config.a.b=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: the coordinator's files, one "
                               "directory per site under sites/, logs/.", required=True)
_SITES = flags.DEFINE_integer("sites", 0, "Deploy the first N training sites of the data "
                              "config (0: all of them).")
_ROUNDS = flags.DEFINE_integer("rounds", 0, "Rounds to run (0: config.run.rounds).")
_RESUME = flags.DEFINE_bool("resume", False, "Restart on an existing --workdir: the sites "
                            "keep their state, the coordinator resumes from its last good "
                            "checkpoint.")
_RESIDENT = flags.DEFINE_bool("resident_workers", True, "Start a resident worker per site "
                              "that keeps the base and compiled programs loaded across "
                              "rounds; without it every message starts a fresh process.")
_ROUND_TIMEOUT = flags.DEFINE_float("round_timeout", 600.0, "Seconds the coordinator waits "
                                    "for a round's uploads; a site that misses it is absent "
                                    "for that round.")
_CONNECT_TIMEOUT = flags.DEFINE_float("connect_timeout", 120.0, "Seconds the coordinator "
                                      "waits for the planned sites to connect.")
_RUN_TIMEOUT = flags.DEFINE_float("run_timeout", 7200.0, "Seconds the whole run may take "
                                  "before it is stopped.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  try:  # before any work: Flower is the `deploy` extra
    from fedjax_lora.deploy import harness  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DeployError(f"launch.deploy_local needs Flower: pip install -e '.[deploy]' "
                      f"(Python >= 3.11) ({e})") from None
  workdir = Path(_WORKDIR.value).resolve()
  deploy_file = workdir / server.DEPLOY_FILE
  if _RESUME.value:
    if not deploy_file.exists():
      raise app.UsageError(f"--resume: {deploy_file} does not exist; start without --resume")
    sites = {s: workdir / layout.SITES_DIR / s for s in json.loads(
        deploy_file.read_text())["sites"]}
  else:
    if deploy_file.exists():
      raise app.UsageError(f"{workdir} already holds a deployment; pass --resume to restart "
                           "it or use a fresh --workdir")
    config = _CONFIG.value
    if _ROUNDS.value:
      config.run.rounds = _ROUNDS.value
    timeouts = server.Timeouts(connect=_CONNECT_TIMEOUT.value, round=_ROUND_TIMEOUT.value)
    sites = layout.lay_out(config, workdir, log, timeouts=timeouts, limit=_SITES.value)
  with harness.LocalDeployment(str(workdir), {n: str(d) for n, d in sites.items()},
                               resident_workers=_RESIDENT.value, log=log) as deployment:
    log(f"SuperLink and {len(sites)} SuperNodes up "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in deployment.timings.items())})")
    status = deployment.run(timeout=_RUN_TIMEOUT.value)
  log(f"federation finished in {status['seconds']:.1f} s; every process stopped")
  report = audit.audit_workdir(workdir)
  problem = report.first_problem() if report.blocks else None
  if problem:
    raise DeployError(f"{workdir}: audit FAILED: {problem}")
  algorithm = json.loads(json.loads(deploy_file.read_text())["config"])["algorithm"]
  written = plots.plot_workdir(workdir, algorithm)
  if written:
    print(f"per-round plots: {', '.join(str(p) for p in written)}")
  print(f"final global adapter (PEFT format): {workdir / 'adapter'}")
  if report.blocks:
    print(f"audit: OK ({len(report.blocks)} blocks, {len(report.checkpoints)} checkpoints "
          f"verified); details: python -m launch.audit --workdir={workdir}")


if __name__ == "__main__":
  errors.run(main)
