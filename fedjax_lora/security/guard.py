"""The server's checks between local training and aggregation, and the ledger record.

With `security.ledger`, every present site signs its upload (simulated on the site's behalf
with its own key) and the server verifies it before the upload may count: unsigned, forged,
replayed or unregistered uploads are rejected (the site is then treated as absent), and each
round appends a block to the ledger. With `security.secure_aggregation` the uploads are masked
on the site side and the server only learns their weighted sum (fedjax_lora.privacy.secagg).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedjax_lora import files
from fedjax_lora.algorithms import select_factors
from fedjax_lora.privacy import secagg
from fedjax_lora.security import identity, ledger as ledger_lib

if TYPE_CHECKING:
  from fedjax_lora.simulator import Federation, SecurityConfig


# A "sum" of one update is that update: below two survivors secure aggregation aggregates
# nothing. (With exactly two, each site can subtract its own update from the new global and
# learn the other's; the server still cannot. WORKSPACE.md, threat model.)
MIN_SECAGG_SURVIVORS = 2


def _client(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


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
  """Identity, upload checks and ledger for one Federation (state lives in its workdir)."""

  def __init__(self, fed: "Federation", security: "SecurityConfig"):
    self.fed, self.security = fed, security
    self.started = False
    self.identities: dict[str, identity.SiteIdentity] = {}
    self.verifier = None
    self.ledger = None

  # ---- setup ---------------------------------------------------------------------------------
  def start(self, resumed_round: int | None = None) -> None:
    """Loads (or creates) the site keys and the ledger; a fresh run writes the genesis block,
    a resumed one drops the blocks of rounds it will re-run."""
    self.started = True
    if not self.security.ledger:
      return
    workdir = self.fed.workdir
    self.identities = identity.ensure_identities(workdir / "identity",
                                                 [s.name for s in self.fed.sites])
    self.verifier = identity.UploadVerifier(identity.load_registry(workdir / "identity"))
    self.ledger = ledger_lib.Ledger(workdir)
    initial_global = self.fed.initial_state()["global"]
    genesis = self._genesis_fields(initial_global)
    if self.ledger.exists():
      if self.ledger.repair_tail():
        self.fed.log(f"ledger: dropped a half-written last line of {self.ledger.path} (the "
                     "run was killed while appending it)")
      blocks = self.ledger.blocks()  # raises LedgerError at the first broken link
      if blocks and {k: blocks[0].get(k) for k in genesis} != genesis:
        raise ledger_lib.LedgerError(
            f"{self.ledger.path}: the genesis block belongs to another run (config, initial "
            "adapter or keys differ); use a fresh --workdir")
      dropped = self.ledger.truncate_after(resumed_round or 0)
      if dropped:
        self.fed.log(f"ledger: dropped {dropped} block(s) after round {resumed_round or 0}; "
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
    ledger = ledger_lib.Ledger(self.fed.workdir)
    if not ledger.exists():
      from fedjax_lora.simulator import ResumeError
      raise ResumeError(f"{self.fed.workdir}: checkpoints but no {ledger_lib.FILENAME} (the "
                        "run was started without security.ledger); resume it with "
                        "--config.security.ledger=False")
    ledger.repair_tail()
    ledger.blocks()  # LedgerError naming the first broken link

  @property
  def uploads_dir(self):
    return self.fed.workdir / "uploads"

  @staticmethod
  def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, data)

  def _genesis_fields(self, initial_global) -> dict:
    registry = (self.fed.workdir / "identity" / identity.REGISTRY).read_bytes()
    return {"config_hash": self.security.config_hash,
            "initial_global_hash": identity.tree_hash(initial_global),
            "registry_hash": identity.bytes_hash(registry),
            "aggregator": self.fed.aggregator.name,
            "combine": self.fed.aggregator.combine,
            "sends": list(self.fed.aggregator.sends),
            "secure_aggregation": self.security.secure_aggregation}

  # ---- between training and aggregation ------------------------------------------------------
  def check_uploads(self, r: int, idx, present, global_params, client_out):
    """(accepted [K] bool, secure_delta or None, report) for round r's uploads."""
    names = [self.fed.sites[k].name for k in idx]
    accepted = np.array(present, bool)
    uploads = jax.device_get(client_out["trained"]["global"])
    sends = self.fed.aggregator.sends
    report = {"hashes": {}, "signatures": {}, "rejected": {}, "masking": {}, "row": {}}
    secure = None
    if self.security.secure_aggregation:  # the server receives masked vectors only
      secure = self._mask_uploads(r, names, accepted, jax.device_get(global_params), uploads,
                                  report)
      payloads = {n: v.tobytes() for n, v in secure["masked"].items()}
    else:
      payloads = {name: identity.tree_bytes(select_factors(_client(uploads, i), sends))
                  for i, name in enumerate(names) if accepted[i]}
    report["payloads"] = payloads
    if self.security.ledger:
      for i, name in enumerate(names):
        if name not in payloads:
          continue
        digest = identity.bytes_hash(payloads[name])
        report["hashes"][name] = digest
        upload = self._sign(name, r, digest)
        report["signatures"][name] = None if upload.signature is None else upload.signature.hex()
        try:
          self.verifier.verify(upload, r, digest, self.identities[name].client_id)
        except identity.RejectedUpload as e:
          accepted[i] = False
          report["rejected"][name] = e.reason
          self.fed.log(f"round {r}: rejected the upload of {name}: {e}")
    secure_delta = None
    if secure is not None:
      secure_delta = self._unmask(r, names, accepted, secure, global_params, report)
    if report["rejected"]:
      report["row"]["rejected"] = dict(report["rejected"])
    if report["masking"]:
      report["row"]["secagg_dropped"] = dict(report["masking"])
    return accepted, secure_delta, report

  def _sign(self, name: str, r: int, digest: str) -> identity.SignedUpload:
    """The site's signature on its upload, or the configured misbehaviour."""
    me = self.identities[name]
    kind = self.security.faults.kind(name, r)
    if kind == "unsigned":
      return identity.SignedUpload(r, me.client_id, digest, None)
    if kind == "forged":
      impostor = identity.SiteIdentity(name, ed25519.Ed25519PrivateKey.generate())
      sig = impostor.private_key.sign(identity.signed_message(r, me.client_id, digest))
      return identity.SignedUpload(r, me.client_id, digest, sig)
    if kind == "replay":  # resend the site's signed upload of the previous round
      previous = self.ledger.block(r - 1) if r > 1 else None
      for e in (previous or {}).get("entries", []):
        if e["client_id"] == me.client_id and e.get("signature"):
          return identity.SignedUpload(r - 1, me.client_id, e["update_hash"],
                                       bytes.fromhex(e["signature"]))
      return identity.sign_upload(me, r - 1, digest)  # nothing sent before: an old-round claim
    return identity.sign_upload(me, r, digest)

  # ---- secure aggregation --------------------------------------------------------------------
  def _mask_uploads(self, r, names, accepted, global_params, uploads, report) -> dict:
    """Site side: every reporting site masks n_k (y_k − x) and n_k; returns the masked
    vectors that reach the server (a site that cannot encode its update, e.g. a non-finite
    one, or that vanishes after masking, sends nothing and is recovered by the protocol)."""
    sends = self.fed.aggregator.sends
    x = select_factors(global_params, sends)
    leaves_x = jax.tree.leaves(x)
    ids = [n for i, n in enumerate(names) if accepted[i]]
    counts = {s.name: float(c) for s, c in zip(self.fed.sites, self.fed.token_counts)}
    deltas = {}
    for i, name in enumerate(names):
      if accepted[i]:
        y = jax.tree.leaves(select_factors(_client(uploads, i), sends))
        deltas[name] = np.concatenate([(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                                       .ravel() for a, b in zip(y, leaves_x)])
    n = len(ids)
    if n < MIN_SECAGG_SURVIVORS:
      for c in ids:
        report["masking"][c] = "no_quorum"
      return {"clients": {}, "server": None, "masked": {}, "deltas": {}, "counts": counts}
    threshold = min(n, max(MIN_SECAGG_SURVIVORS,
                           int(np.floor(self.security.secagg_threshold * n)) + 1))
    # Mask secrets come from the OS, not the run seed (which is in config.json): the sum,
    # hence the run, does not depend on them, only the masked bytes do.
    clients = {c: secagg.SecAggClient(c, r) for c in ids}
    server = secagg.SecAggServer(ids, threshold, self.security.secagg_frac_bits, round=r)
    for c in ids:
      server.add_public_key(c, clients[c].public_key)
    for c in ids:
      for peer, bundle in clients[c].shares_for(ids, threshold).items():
        clients[peer].hold(bundle)
    masked = {}
    for c in ids:
      try:
        vector = clients[c].mask(deltas[c], counts[c], server.public_keys,
                                 self.security.secagg_frac_bits)
      except secagg.SecAggError as e:
        report["masking"][c] = "not_encodable"
        self.fed.log(f"round {r}: {c} could not mask its update ({e}); recovered as a dropout")
        continue
      if self.security.faults.kind(c, r) == "drop_after_masking":
        report["masking"][c] = "dropped_after_masking"
        continue
      masked[c] = vector
    return {"clients": clients, "server": server, "masked": masked, "deltas": deltas,
            "counts": counts}

  def _unmask(self, r, names, accepted, secure, global_params, report):
    """Server side: takes the verified masked vectors, asks the survivors for the shares
    that remove self masks and the pairwise masks of the sites that dropped, and returns
    the weighted mean update as a tree (zeros for factors that are not sent)."""
    server, clients = secure["server"], secure["clients"]
    for i, name in enumerate(names):
      if name in secure["masked"] and accepted[i]:
        server.add_masked(name, secure["masked"][name])
      elif name in clients:
        accepted[i] = False
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), jax.device_get(global_params))
    if server is None:  # fewer than two sites could take part
      accepted[:] = False
      self.fed.log(f"round {r}: secure aggregation needs at least {MIN_SECAGG_SURVIVORS} "
                   "sites; the global adapter stays")
      return zeros
    try:
      server.require_quorum()
    except secagg.SecAggError as e:
      self.fed.log(f"round {r}: secure aggregation failed ({e}); the global adapter stays")
      for i, name in enumerate(names):
        if accepted[i]:
          report["masking"][name] = "no_quorum"
      accepted[:] = False
      return zeros
    gone = set(server.dropped)
    revealed = {o: [clients[h].reveal(o, dropped=o in gone) for h in server.survivors]
                for o in clients}
    total, weight = server.aggregate(revealed)
    mean = total / weight
    # Simulation diagnostics, computed with what the server never sees (the individual
    # deltas): the actual quantization error and its worst-case bound.
    exact = sum(secure["counts"][c] * secure["deltas"][c] for c in server.survivors) / \
        sum(secure["counts"][c] for c in server.survivors)
    max_abs = max(float(np.max(np.abs(secure["deltas"][c]), initial=0.0))
                  for c in server.survivors)
    report["row"]["secagg"] = {
        "survivors": len(server.survivors), "recovered_dropouts": len(server.dropped),
        "quantization_error": float(np.max(np.abs(mean - exact), initial=0.0)),
        "quantization_bound": secagg.quantization_bound(
            len(server.survivors), self.security.secagg_frac_bits, max_abs, weight)}
    sends = self.fed.aggregator.sends
    sent = select_factors(zeros, sends)
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
    sends = self.fed.aggregator.sends
    trained = dict(client_out["trained"])

    def hide(t, f, y):
      return jnp.broadcast_to(global_params[t][f], y.shape).astype(y.dtype) if f in sends else y
    trained["global"] = {t: {f: hide(t, f, y) for f, y in ab.items()}
                         for t, ab in trained["global"].items()}
    return {**client_out, "trained": trained}

  # ---- after aggregation ---------------------------------------------------------------------
  def record_round(self, r: int, idx, present, metrics, report: dict, row: dict) -> dict:
    """Appends round r's block: who sent what, with which weight and status, and the hashes
    of the new global adapter and of the state about to be checkpointed."""
    names = [self.fed.sites[k].name for k in idx]
    weights = np.asarray(metrics["weights"])
    nonfinite = np.asarray(metrics.get("client_quarantined_nonfinite", np.zeros(len(idx), bool)))
    too_big = np.asarray(metrics.get("client_quarantined_norm", np.zeros(len(idx), bool)))
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
      if self.fed.aggregator.combine == "unweighted" and status == "accepted":
        weight = None  # the rule does not use p_k (aggregators.base.COMBINES)
      entries.append({"site": name, "client_id": self.identities[name].client_id,
                      "update_hash": report["hashes"].get(name),
                      "signature": report["signatures"].get(name),
                      "weight": weight, "status": status})
    entries.sort(key=lambda e: e["client_id"])
    fields = {"entries": entries,
              "global_hash": identity.tree_hash(self.fed.state["global"]),
              "state_hash": identity.tree_hash(self.fed.checkpoint_state())}
    if self.security.keep_uploads:
      folder = self.uploads_dir / f"round_{r:06d}"
      for name, payload in report["payloads"].items():
        self._write(folder / f"{name}.bin", payload)
      self._write(folder / "global.bin", identity.tree_bytes(self.fed.state["global"]))
    if "epsilon" in row:
      fields["epsilon"] = row["epsilon"]
    if "client_epsilon" in row:
      fields["client_epsilon"] = row["client_epsilon"]
    return self.ledger.append(r, "round", _json_safe(fields))

  def check_checkpoint(self, r: int, restored) -> str | None:
    """None when round r's restored state hashes to its ledger block, else the problem."""
    if not self.security.ledger:
      return None
    ledger = ledger_lib.Ledger(self.fed.workdir)
    if not ledger.exists():
      return None if r == 0 else "has no ledger to check it against"
    block = ledger.block(r)
    if block is None:
      return "has no block in the ledger (written after the ledger stopped?)"
    if identity.tree_hash(restored) != block["state_hash"]:
      return "does not match the state hash in the ledger (corrupted or partial)"
    return None
