"""Audit of a run directory: the ledger's hash chain, then every stored checkpoint against it.

A verifier needs only the workdir: `ledger.jsonl`, `identity/registry.json` and
`checkpoints/`. It reports the first broken link of the chain, and for each checkpoint
whether its state and global adapter hash to what the ledger recorded for that round.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedjax_lora import checkpointing
from fedjax_lora.security import identity, ledger as ledger_lib


@dataclasses.dataclass
class AuditReport:
  blocks: list[dict]
  broken: ledger_lib.BrokenLink | None = None
  registry_ok: bool | None = None
  checkpoints: dict[int, str] = dataclasses.field(default_factory=dict)  # round -> "ok" | problem

  @property
  def ok(self) -> bool:
    return (self.broken is None and self.registry_ok is not False and
            all(v == "ok" for v in self.checkpoints.values()))

  def first_problem(self) -> str | None:
    if self.broken is not None:
      return f"ledger {self.broken}"
    if self.registry_ok is False:
      return "identity/registry.json differs from the keys the genesis block committed to"
    for r, status in sorted(self.checkpoints.items()):
      if status != "ok":
        return f"checkpoint of round {r}: {status}"
    return None


def audit_workdir(workdir: str | Path) -> AuditReport:
  workdir = Path(workdir)
  path = workdir / ledger_lib.FILENAME
  blocks, broken = ledger_lib.verify_chain(path)
  report = AuditReport(blocks, broken)
  registry = workdir / "identity" / identity.REGISTRY
  if blocks and registry.exists():
    report.registry_ok = identity.bytes_hash(registry.read_bytes()) == \
        blocks[0].get("registry_hash")
  by_round = {b["round"]: b for b in blocks}
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.exists():
    return report
  checkpointer = checkpointing.RoundCheckpointer(ckpt_dir, keep_last=None)
  try:
    for r in checkpointer.all_rounds():
      block = by_round.get(r)
      if block is None:
        report.checkpoints[r] = ("no ledger block for this round" if broken is None else
                                 "not verifiable: the chain breaks before this round")
        continue
      try:
        state, _ = checkpointer.restore_on_host(r)
      except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is the finding
        report.checkpoints[r] = f"cannot be restored ({type(e).__name__}: {str(e)[:160]})"
        continue
      if identity.tree_hash(state) != block.get("state_hash"):
        report.checkpoints[r] = "state hash differs from the ledger (checkpoint modified)"
      elif identity.tree_hash(state["global"]) != block.get("global_hash"):
        report.checkpoints[r] = "global adapter hash differs from the ledger"
      else:
        report.checkpoints[r] = "ok"
  finally:
    checkpointer.close()
  return report
