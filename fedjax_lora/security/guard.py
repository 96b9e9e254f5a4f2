"""The server's side of a protected round: checks on the uploads, unmasking, the ledger.

With `security.ledger`, the server verifies every upload's signature before it may count:
unsigned, forged, replayed or unregistered uploads are rejected (the site is then treated
as absent), and each round appends a block to the ledger. With `security.secure_aggregation`
the server opens the round's protocol (`open_secagg`), receives masked vectors only and
learns their weighted sum (fedjax_lora.privacy.secagg). What the sites do on their side
(masking, signing) is `security/site_side.py`; the guard is built from plain values (the
workdir, the aggregator record, the settings) and never sees a site's key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lora import files
from fedjax_lora.aggregators import Aggregator
from fedjax_lora.algorithms import select_factors
from fedjax_lora.errors import ResumeError
from fedjax_lora.privacy import secagg
from fedjax_lora.security import identity, ledger as ledger_lib
from fedjax_lora.security.config import SecurityConfig
from fedjax_lora.security.site_side import Outgoing


def _json_safe(value):
  """Non-finite floats as strings ("inf": e.g. epsilon without noise), for strict JSON."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)
  return value


class RoundGuard:
  """Upload checks, unmasking and ledger for one federation (state lives in its workdir)."""

  def __init__(self, workdir: Path | None, aggregator: Aggregator, security: SecurityConfig,
               log: Callable[[str], None] = print, run_nonce: str = ""):
    self.workdir = Path(workdir) if workdir is not None else None
    self.run_nonce = run_nonce  # a deployed run's nonce: signatures must be bound to it
    self.aggregator = aggregator
    self.security, self.log = security, log
    self.started = False
    self.client_ids: dict[str, str] = {}
    self.verifier = None
    self.ledger = None

  @property
  def identity_dir(self) -> Path:
    return self.workdir / "identity"

  # ---- setup ---------------------------------------------------------------------------------
  def start(self, initial_global, resumed_round: int | None = None) -> None:
    """Reads the sites' public registry and loads (or creates) the ledger; a fresh run writes
    the genesis block, a resumed one drops the blocks of rounds it will re-run."""
    self.started = True
    if not self.security.ledger:
      return
    registry = identity.read_registry(self.identity_dir)  # site -> (client id, key)
    self.client_ids = {site: cid for site, (cid, _) in registry.items()}
    self.verifier = identity.UploadVerifier(dict(registry.values()), self.run_nonce)
    self.ledger = ledger_lib.Ledger(self.workdir)
    genesis = self._genesis_fields(initial_global)
    if self.ledger.exists():
      if self.ledger.repair_tail():
        self.log(f"ledger: dropped a half-written last line of {self.ledger.path} (the "
                 "run was killed while appending it)")
      blocks = self.ledger.blocks()  # raises LedgerError at the first broken link
      if blocks and {k: blocks[0].get(k) for k in genesis} != genesis:
        raise ledger_lib.LedgerError(
            f"{self.ledger.path}: the genesis block belongs to another run (config, initial "
            "adapter or keys differ); use a fresh --workdir")
      dropped = self.ledger.truncate_after(resumed_round or 0)
      if dropped:
        self.log(f"ledger: dropped {dropped} block(s) after round {resumed_round or 0}; "
                 "those rounds are re-run")
      if blocks:
        return
    if self.security.keep_uploads:
      self._write(self.uploads_dir / "initial.bin", identity.tree_bytes(initial_global))
    self.ledger.append(0, "genesis", genesis)

  def check_resumable(self) -> None:
    """Before a resume touches any checkpoint: a ledger run needs its ledger, intact."""
    if not self.security.ledger:
      return
    ledger = ledger_lib.Ledger(self.workdir)
    if not ledger.exists():
      raise ResumeError(f"{self.workdir}: checkpoints but no {ledger_lib.FILENAME} (the "
                        "run was started without security.ledger); resume it with "
                        "--config.security.ledger=False")
    ledger.repair_tail()
    ledger.blocks()  # LedgerError naming the first broken link

  @property
  def uploads_dir(self):
    return self.workdir / "uploads"

  @staticmethod
  def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, data)

  def _genesis_fields(self, initial_global) -> dict:
    registry = (self.identity_dir / identity.REGISTRY).read_bytes()
    run = {"run_nonce": self.run_nonce} if self.run_nonce else {}
    return {**run, "config_hash": self.security.config_hash,
            "initial_global_hash": identity.tree_hash(initial_global),
            "registry_hash": identity.bytes_hash(registry),
            "aggregator": self.aggregator.name,
            "combine": self.aggregator.combine,
            "sends": list(self.aggregator.sends),
            "secure_aggregation": self.security.secure_aggregation}

  def published(self, r: int) -> list[dict]:
    """The entries of round r - 1's ledger block: the public record of the last round."""
    if self.ledger is None or r <= 1:
      return []
    return (self.ledger.block(r - 1) or {}).get("entries", [])

  # ---- between training and aggregation ------------------------------------------------------
  def open_secagg(self, r: int, names: list[str], present) -> secagg.SecAggRound | None:
    """Round r's secure-aggregation protocol among the reporting sites, with a threshold of
    more than security.secagg_threshold of them (None: fewer than the protocol's minimum)."""
    ids = [n for i, n in enumerate(names) if present[i]]
    if len(ids) < secagg.MIN_SURVIVORS:
      return None
    # Mask secrets come from the OS, not the run seed (which is in config.json): the sum,
    # hence the run, does not depend on them, only the masked bytes do.
    return secagg.SecAggRound(ids, r, self.secagg_threshold(len(ids)),
                              self.security.secagg_frac_bits)

  def secagg_threshold(self, n: int) -> int:
    """Shares needed to unmask among n sites: more than security.secagg_threshold of them."""
    return min(n, max(secagg.MIN_SURVIVORS,
                      int(np.floor(self.security.secagg_threshold * n)) + 1))

  def receive(self, r: int, names: list[str], present, out: Outgoing, global_params):
    """(accepted [K] bool, secure_delta or None, report) for what round r's sites sent."""
    accepted = np.array(present, bool)
    report = {"hashes": {}, "signatures": {}, "rejected": {}, "masking": dict(out.masking),
              "row": {}, "payloads": out.payloads}
    if self.security.secure_aggregation and out.secagg is None:
      for i, name in enumerate(names):
        if accepted[i]:
          report["masking"][name] = "no_quorum"
    if self.security.ledger:
      for i, name in enumerate(names):
        if name not in out.payloads:
          continue
        digest = identity.bytes_hash(out.payloads[name])
        report["hashes"][name] = digest
        upload = out.signed[name]
        report["signatures"][name] = None if upload.signature is None else upload.signature.hex()
        try:
          self.verifier.verify(upload, r, digest, self.client_ids[name])
        except identity.RejectedUpload as e:
          accepted[i] = False
          report["rejected"][name] = e.reason
          self.log(f"round {r}: rejected the upload of {name}: {e}")
    secure_delta = None
    if self.security.secure_aggregation:
      secure_delta = self._unmask(r, names, accepted, out, global_params, report)
    if report["rejected"]:
      report["row"]["rejected"] = dict(report["rejected"])
    if report["masking"]:
      report["row"]["secagg_dropped"] = dict(report["masking"])
    return accepted, secure_delta, report

  def _unmask(self, r, names, accepted, out: Outgoing, global_params, report):
    """Takes the verified masked vectors, has the protocol remove the self masks and the
    pairwise masks of the sites that dropped, and returns the weighted mean update as a
    tree (zeros for factors that are not sent)."""
    rnd = out.secagg
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), jax.device_get(global_params))
    if rnd is None:  # fewer than two sites could take part
      accepted[:] = False
      self.log(f"round {r}: secure aggregation needs at least {secagg.MIN_SURVIVORS} "
               "sites; the global adapter stays")
      return zeros
    for i, name in enumerate(names):
      if name in out.payloads and accepted[i]:
        try:
          rnd.receive(name, np.frombuffer(out.payloads[name], np.uint64))
        except (ValueError, secagg.SecAggError) as e:  # a signed but malformed vector
          accepted[i] = False
          report["rejected"][name] = "malformed"
          self.log(f"round {r}: rejected the masked upload of {name}: {e}")
      elif name in rnd.ids:
        accepted[i] = False
    try:
      rnd.server.require_quorum()  # below the threshold nothing may be revealed
      # Deployed, the shares are asked of the sites: too few may answer.
      total, weight = rnd.unmask()
    except secagg.SecAggError as e:
      self.log(f"round {r}: secure aggregation failed ({e}); the global adapter stays")
      for i, name in enumerate(names):
        if accepted[i]:
          report["masking"][name] = "no_quorum"
      accepted[:] = False
      return zeros
    mean = total / weight
    survivors = rnd.server.survivors
    report["row"]["secagg"] = {"survivors": len(survivors),
                               "recovered_dropouts": len(rnd.server.dropped)}
    if out.deltas:
      # Simulation diagnostics, computed with what the server never sees (the individual
      # deltas; a deployed server has none): the quantization error and its bound.
      exact = sum(out.weights[c] * out.deltas[c] for c in survivors) / \
          sum(out.weights[c] for c in survivors)
      max_abs = max(float(np.max(np.abs(out.deltas[c]), initial=0.0)) for c in survivors)
      report["row"]["secagg"].update(
          quantization_error=float(np.max(np.abs(mean - exact), initial=0.0)),
          quantization_bound=secagg.quantization_bound(
              len(survivors), self.security.secagg_frac_bits, max_abs, weight))
    sent = select_factors(zeros, self.aggregator.sends)
    leaves, treedef = jax.tree.flatten(sent)
    parts, offset = [], 0
    for leaf in leaves:
      parts.append(mean[offset:offset + leaf.size].reshape(leaf.shape).astype(np.float32))
      offset += leaf.size
    filled = jax.tree.unflatten(treedef, parts)
    return {t: {f: filled[t].get(f, ab[f]) for f in ab} for t, ab in zeros.items()}

  def server_view(self, client_out: dict, global_params) -> dict:
    """What the aggregation program may receive under secure aggregation: the sites' own
    state (local adapters, personal factors) but, in place of every sent factor, the global
    value, so no individual update reaches the server side even by mistake."""
    sends = self.aggregator.sends
    trained = dict(client_out["trained"])

    def hide(t, f, y):
      return jnp.broadcast_to(global_params[t][f], y.shape).astype(y.dtype) if f in sends else y
    trained["global"] = {t: {f: hide(t, f, y) for f, y in ab.items()}
                         for t, ab in trained["global"].items()}
    return {**client_out, "trained": trained}

  # ---- after aggregation ---------------------------------------------------------------------
  def record_round(self, r: int, names: list[str], present, metrics, report: dict, row: dict,
                   global_params, checkpoint_state) -> dict:
    """Appends round r's block: who sent what, with which weight and status, and the hashes
    of the new global adapter and of the state about to be checkpointed."""
    weights = np.asarray(metrics["weights"])
    nonfinite = np.asarray(metrics.get("client_quarantined_nonfinite", np.zeros(len(names), bool)))
    too_big = np.asarray(metrics.get("client_quarantined_norm", np.zeros(len(names), bool)))
    entries = []
    for i, name in enumerate(names):
      if not present[i]:
        status = "absent"
      elif name in report["rejected"]:
        status = "rejected:" + report["rejected"][name]
      elif name in report["masking"]:
        status = "dropped:" + report["masking"][name]
      elif nonfinite[i]:
        status = "quarantined:non_finite"
      elif too_big[i]:
        status = "quarantined:norm"
      else:
        status = "accepted"
      weight = float(weights[i]) if status == "accepted" else 0.0
      if self.aggregator.combine == "unweighted" and status == "accepted":
        weight = None  # the rule does not use p_k (aggregators.base.COMBINES)
      entries.append({"site": name, "client_id": self.client_ids[name],
                      "update_hash": report["hashes"].get(name),
                      "signature": report["signatures"].get(name),
                      "weight": weight, "status": status})
    entries.sort(key=lambda e: e["client_id"])
    fields = {"entries": entries,
              "global_hash": identity.tree_hash(global_params),
              "state_hash": identity.tree_hash(checkpoint_state)}
    if self.security.keep_uploads:
      folder = self.uploads_dir / f"round_{r:06d}"
      for name, payload in report["payloads"].items():
        self._write(folder / f"{name}.bin", payload)
      self._write(folder / "global.bin", identity.tree_bytes(global_params))
    if "epsilon" in row:
      fields["epsilon"] = row["epsilon"]
    if "client_epsilon" in row:
      fields["client_epsilon"] = row["client_epsilon"]
    return self.ledger.append(r, "round", _json_safe(fields))

  def check_checkpoint(self, r: int, restored) -> str | None:
    """None when round r's restored state hashes to its ledger block, else the problem."""
    if not self.security.ledger:
      return None
    ledger = ledger_lib.Ledger(self.workdir)
    if not ledger.exists():
      return None if r == 0 else "has no ledger to check it against"
    block = ledger.block(r)
    if block is None:
      return "has no block in the ledger (written after the ledger stopped?)"
    if identity.tree_hash(restored) != block["state_hash"]:
      return "does not match the state hash in the ledger (corrupted or partial)"
    return None
