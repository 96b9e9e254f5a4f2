"""The audit ledger: an append-only hash chain of rounds in `<workdir>/ledger.jsonl` (method.md §10).

One JSON block per line. Block 0 (genesis) commits to the run's config and initial adapter;
block t to round t: the previous block's hash, every sampled site's client id, update hash,
aggregation weight and status (accepted, or why it was quarantined or rejected), the hash of
the new global adapter and of the whole checkpointed state. A block's `hash` is SHA-256 of its
canonical JSON without that field, so editing any byte of a past block, or reordering,
inserting or removing blocks, breaks the chain at a position `verify_chain` reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedjax_lora import files
from fedjax_lora.errors import LedgerError

FILENAME = "ledger.jsonl"
ZERO_HASH = "0" * 64


def block_hash(block: dict) -> str:
  body = {k: v for k, v in block.items() if k != "hash"}
  canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
  return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class BrokenLink:
  line: int          # 1-based line of the ledger file
  round: int | None  # the round the block claims, when it could be read
  reason: str

  def __str__(self) -> str:
    where = f"line {self.line}" + (f" (round {self.round})" if self.round is not None else "")
    return f"{where}: {self.reason}"


def read_lines(path: Path) -> list[str]:
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise LedgerError(f"{path}: no ledger (was the run started with security.ledger?)") from None
  return [line for line in text.split("\n") if line.strip()]


def verify_chain(path: str | os.PathLike) -> tuple[list[dict], BrokenLink | None]:
  """(the blocks before the first broken link, that link or None when the chain is intact)."""
  path = Path(path)
  blocks: list[dict] = []
  prev_hash = ZERO_HASH
  for i, line in enumerate(read_lines(path), start=1):
    try:
      block = json.loads(line)
    except json.JSONDecodeError as e:
      return blocks, BrokenLink(i, None, f"not valid JSON ({e.msg})")
    if not isinstance(block, dict):
      return blocks, BrokenLink(i, None, "not a JSON object")
    rnd = block.get("round") if isinstance(block.get("round"), int) else None
    if block.get("hash") != block_hash(block):
      return blocks, BrokenLink(i, rnd, "content does not match its hash (the block was edited)")
    if block.get("prev") != prev_hash:
      return blocks, BrokenLink(i, rnd, "prev does not match the hash of the block before it "
                                "(blocks reordered, inserted or removed)")
    if block.get("index") != i - 1:
      return blocks, BrokenLink(i, rnd, f"index {block.get('index')} where {i - 1} belongs")
    want_round = 0 if i == 1 else blocks[-1]["round"] + 1
    if rnd != want_round:
      return blocks, BrokenLink(i, rnd, f"round {rnd} where round {want_round} belongs")
    blocks.append(block)
    prev_hash = block["hash"]
  return blocks, None


class Ledger:
  """Appends blocks (fsynced, one line each) and reads the verified chain back."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / FILENAME
    self._tip: dict | None = None  # last block, once the chain was verified

  def exists(self) -> bool:
    return self.path.exists()

  def blocks(self) -> list[dict]:
    """The chain; LedgerError naming the first broken link if it does not verify."""
    blocks, broken = verify_chain(self.path)
    if broken is not None:
      raise LedgerError(f"{self.path}: {broken}")
    return blocks

  def block(self, round_index: int) -> dict | None:
    return next((b for b in self.blocks() if b["round"] == round_index), None)

  def append(self, round_index: int, kind: str, fields: dict[str, Any]) -> dict:
    prev = self._tip
    if prev is None and self.exists():  # verify the chain once, then extend it in memory
      blocks = self.blocks()
      prev = blocks[-1] if blocks else None
    block = {"index": prev["index"] + 1 if prev else 0, "round": int(round_index),
             "kind": kind, "prev": prev["hash"] if prev else ZERO_HASH, **fields}
    block["hash"] = block_hash(block)
    with open(self.path, "a") as f:
      f.write(json.dumps(block, sort_keys=True, allow_nan=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self._tip = block
    return block

  def repair_tail(self) -> bool:
    """Drops a last line without its newline (a kill while appending); True if it did.

    Only the unterminated tail goes: `append` writes a block and its newline in one call
    and fsyncs, so every complete block ends with a newline."""
    data = self.path.read_bytes()
    if not data or data.endswith(b"\n"):
      return False
    files.write_atomic(self.path, data[:data.rfind(b"\n") + 1])
    self._tip = None
    return True

  def truncate_after(self, round_index: int) -> int:
    """Drops blocks of rounds after `round_index` (a resume re-runs them); returns how many.

    Only a chain that verifies is truncated, and atomically (write, then rename)."""
    blocks = self.blocks()
    keep = [b for b in blocks if b["round"] <= round_index]
    if len(keep) == len(blocks):
      return 0
    files.write_atomic(self.path, "".join(json.dumps(b, sort_keys=True) + "\n" for b in keep))
    self._tip = None
    return len(blocks) - len(keep)
