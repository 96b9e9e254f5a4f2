r"""Verifies a run's audit trail: the ledger's hash chain and every checkpoint against it.

  python -m launch.audit --workdir=DIR

Prints one line per round (sites accepted, quarantined or rejected, aggregation weights,
global adapter hash, the checkpoint's check and, with security.keep_uploads, the replay of
the aggregation from the stored uploads) and ends with `audit: OK` (exit 0) or `audit: FAILED: <first broken
link>` (exit 1).
"""

import sys

from absl import app, flags, logging

from fedjax_lora.security import audit
from launch import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by launch.federate "
                               "with config.security.ledger=True.", required=True)


def _describe(block: dict) -> str:
  if block["kind"] == "genesis":
    return f"genesis   | config {block['config_hash'][:12]} | initial adapter " \
           f"{block['initial_global_hash'][:12]}"
  parts = []
  for e in block.get("entries", []):
    if e["status"] != "accepted":
      tag = f"{e['site']}:{e['status']}"
    elif e["weight"] is None:  # the rule does not weight sites (median, dp_fedavg, ...)
      tag = f"{e['site']}=accepted"
    else:
      tag = f"{e['site']}={e['weight']:.2f}"
    parts.append(tag)
  return f"round {block['round']:3d} | {' '.join(parts)} | global {block['global_hash'][:12]}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  report = audit.audit_workdir(_WORKDIR.value)
  for block in report.blocks:
    status = report.checkpoints.get(block["round"]) if block["kind"] == "round" else None
    uploads = report.uploads.get(block["round"])
    print(_describe(block) + (f" | checkpoint {status}" if status else "") +
          (f" | uploads {uploads}" if uploads else ""))
  problem = report.first_problem()
  if problem is None:
    print(f"audit: OK ({len(report.blocks)} blocks, {len(report.checkpoints)} checkpoints "
          "verified)")
    return
  print(f"audit: FAILED: {problem}")
  sys.exit(1)


if __name__ == "__main__":
  errors.run(main)
