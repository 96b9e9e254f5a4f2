"""Audit of a run directory: the ledger's hash chain, then every stored checkpoint against it.

A verifier needs only the workdir: `ledger.jsonl`, `identity/registry.json` and
`checkpoints/`. It reports the first broken link of the chain, and for each checkpoint
whether its state and global adapter hash to what the ledger recorded for that round.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fedjax_lora import checkpointing
from fedjax_lora.security import identity, ledger as ledger_lib


@dataclasses.dataclass
class AuditReport:
  blocks: list[dict]
  broken: ledger_lib.BrokenLink | None = None
  registry_ok: bool | None = None
  checkpoints: dict[int, str] = dataclasses.field(default_factory=dict)  # round -> "ok" | problem
  uploads: dict[int, str] = dataclasses.field(default_factory=dict)  # round -> "ok..." | problem
  signatures: dict[int, str] = dataclasses.field(default_factory=dict)  # round -> "ok" | problem

  @property
  def ok(self) -> bool:
    return (self.broken is None and self.registry_ok is not False and
            all(v == "ok" for v in self.checkpoints.values()) and
            all(v == "ok" for v in self.signatures.values()) and
            all(v.startswith("ok") for v in self.uploads.values()))

  def first_problem(self) -> str | None:
    if self.broken is not None:
      return f"ledger {self.broken}"
    if self.registry_ok is False:
      return ("identity/registry.json is missing or differs from the keys the genesis block "
              "committed to")
    for r, status in sorted(self.signatures.items()):
      if status != "ok":
        return f"signatures of round {r}: {status}"
    for r, status in sorted(self.checkpoints.items()):
      if status != "ok":
        return f"checkpoint of round {r}: {status}"
    for r, status in sorted(self.uploads.items()):
      if not status.startswith("ok"):
        return f"uploads of round {r}: {status}"
    return None


def _tree_close(a: dict, b: dict) -> float:
  """Largest |a - b| over matching leaves (inf when the structures differ)."""
  if a.keys() != b.keys():
    return float("inf")
  worst = 0.0
  for k in a:
    if isinstance(a[k], dict):
      worst = max(worst, _tree_close(a[k], b[k]) if isinstance(b[k], dict) else float("inf"))
    elif np.shape(a[k]) != np.shape(b[k]):
      return float("inf")
    else:
      worst = max(worst, float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]), initial=0)))
  return worst


def verify_signatures(registry, blocks: list[dict]) -> dict[int, str]:
  """Re-checks every signature the server accepted (statuses other than absent, rejected
  or dropped) against the committed key registry (and the run nonce of a deployed run)."""
  out = {}
  run = blocks[0].get("run_nonce", "") if blocks else ""
  for block in blocks[1:]:
    out[block["round"]] = "ok"
    for e in block.get("entries", []):
      if e["status"] == "absent" or e["status"].startswith(("rejected", "dropped")):
        continue
      upload = identity.SignedUpload(block["round"], e["client_id"], e["update_hash"] or "",
                                     bytes.fromhex(e["signature"]) if e.get("signature")
                                     else None, run)
      try:
        identity.UploadVerifier(registry, run).verify(upload, block["round"], upload.update_hash,
                                                 e["client_id"])
      except identity.RejectedUpload as err:
        out[block["round"]] = f"{e['site']}'s upload was accepted but {err}"
        break
  return out


def replay_uploads(workdir: Path, blocks: list[dict]) -> dict[int, str]:
  """Checks the stored uploads (security.keep_uploads) against the ledger, round by round:
  every received upload and the new global adapter must hash to what the block recorded,
  and for weighted-mean aggregators the new global must equal x + sum_k p_k (y_k - x) over
  the accepted uploads with the recorded weights (to float32 rounding)."""
  folder = workdir / "uploads"
  if not folder.exists() or not blocks:
    return {}
  genesis = blocks[0]
  results: dict[int, str] = {}
  initial = folder / "initial.bin"
  if not initial.exists():
    return {0: "uploads/initial.bin is missing"}
  data = initial.read_bytes()
  if identity.bytes_hash(data) != genesis.get("initial_global_hash"):
    return {0: "uploads/initial.bin differs from the genesis block's initial adapter"}
  x = identity.parse_tree_bytes(data, str(initial))
  # Only "mean" aggregators make the new global x + sum_k p_k (y_k - x) of what is stored.
  replayable = genesis.get("combine") == "mean" and not genesis.get("secure_aggregation")
  sends = set(genesis.get("sends", ("a", "b")))
  for block in blocks[1:]:
    r = block["round"]
    d = folder / f"round_{r:06d}"
    problem = None
    accepted = []
    for e in block["entries"]:
      if e["update_hash"] is None:
        continue
      f = d / f"{e['site']}.bin"
      if not f.exists():
        problem = f"the upload of {e['site']} is missing ({f})"
        break
      payload = f.read_bytes()
      if identity.bytes_hash(payload) != e["update_hash"]:
        problem = f"the stored upload of {e['site']} differs from the hash it was signed with"
        break
      if e["status"] == "accepted":
        accepted.append((e["weight"], payload, f))
    g = d / "global.bin"
    if problem is None and not g.exists():
      problem = f"{g} is missing"
    if problem is None and identity.bytes_hash(g.read_bytes()) != block["global_hash"]:
      problem = "the stored global adapter differs from the ledger's global hash"
    if problem is not None:
      results[r] = problem
      break
    new = identity.parse_tree_bytes(g.read_bytes(), str(g))
    if replayable:
      expected = {t: {f: np.asarray(v, np.float64) for f, v in ab.items()} for t, ab in x.items()}
      for weight, payload, f in accepted:
        for t, ab in identity.parse_tree_bytes(payload, str(f)).items():
          for factor, y in ab.items():
            if factor in sends:
              expected[t][factor] += weight * (y.astype(np.float64) - x[t][factor])
      diff = _tree_close(expected, new)
      scale = max(_tree_close(x, new), 1e-12)
      if not diff <= 1e-6 + 1e-4 * scale:
        results[r] = (f"the global adapter is not the recorded weighted mean of the accepted "
                      f"uploads (largest difference {diff:.3g}, round update {scale:.3g})")
        break
      results[r] = f"ok (replayed; largest difference {diff:.1g})"
    else:
      results[r] = f"ok (hashes only: {genesis.get('aggregator')} is not replayed)"
    x = new
  return results


def audit_workdir(workdir: str | Path) -> AuditReport:
  workdir = Path(workdir)
  path = workdir / ledger_lib.FILENAME
  blocks, broken = ledger_lib.verify_chain(path)
  report = AuditReport(blocks, broken)
  registry = workdir / "identity" / identity.REGISTRY
  if blocks:
    report.registry_ok = registry.exists() and identity.bytes_hash(
        registry.read_bytes()) == blocks[0].get("registry_hash")
  if report.registry_ok:
    report.signatures = verify_signatures(identity.load_registry(registry.parent), blocks)
  by_round = {b["round"]: b for b in blocks}
  report.uploads = replay_uploads(workdir, blocks)
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
