"""What a site does to its upload before it leaves: select, mask, sign.

A site sends the factors its algorithm sends; under secure aggregation it sends instead
its masked, token-weighted update (y_k - x) n_k; with the ledger it signs the bytes it
sends, or, when the fault plan makes it misbehave, sends them unsigned, signed by an
impostor, or replays an earlier signed upload. In a deployment each site runs this for
itself; the simulator runs it for every site of the round in turn (`SimulatedSites`).
The server's side (`security/guard.py`) sees only the `Outgoing` record.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedjax_lora.algorithms import select_factors
from fedjax_lora.privacy import secagg
from fedjax_lora.security import identity
from fedjax_lora.security.config import SecurityConfig


def client_slice(tree, i: int):
  """Client i of a tree stacked over the round's clients."""
  return jax.tree.map(lambda x: x[i], tree)


def update_vector(upload, global_params, sends) -> np.ndarray:
  """y_k - x over the sent factors, flattened in float64 (what secure aggregation masks)."""
  y = jax.tree.leaves(select_factors(upload, sends))
  x = jax.tree.leaves(select_factors(global_params, sends))
  return np.concatenate([(np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
                         for a, b in zip(y, x)])


def sign(me: identity.SiteIdentity, r: int, digest: str, kind: str | None,
         published: list[dict]) -> identity.SignedUpload:
  """Site `me`'s signature on round r's payload hash, or the misbehaviour `kind` of the
  fault plan. `published` is the previous round's public ledger entries (what a replaying
  site resends)."""
  if kind == "unsigned":
    return identity.SignedUpload(r, me.client_id, digest, None)
  if kind == "forged":
    impostor = identity.SiteIdentity(me.site, ed25519.Ed25519PrivateKey.generate())
    sig = impostor.private_key.sign(identity.signed_message(r, me.client_id, digest))
    return identity.SignedUpload(r, me.client_id, digest, sig)
  if kind == "replay":  # resend the site's signed upload of the previous round
    for e in published:
      if e["client_id"] == me.client_id and e.get("signature"):
        return identity.SignedUpload(r - 1, me.client_id, e["update_hash"],
                                     bytes.fromhex(e["signature"]))
    return identity.sign_upload(me, r - 1, digest)  # nothing sent before: an old-round claim
  return identity.sign_upload(me, r, digest)


@dataclasses.dataclass
class Outgoing:
  """What the round's sites put on the wire, by site name."""
  payloads: dict[str, bytes]                 # the bytes that reach the server
  signed: dict[str, identity.SignedUpload]   # with the ledger: each payload's signature
  masking: dict[str, str]                    # sites whose masked vector never left, and why
  secagg: secagg.SecAggRound | None = None   # the protocol round the vectors belong to
  # Simulation diagnostics the server never receives (the quantization error it reports):
  deltas: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  weights: dict[str, float] = dataclasses.field(default_factory=dict)


class SimulatedSites:
  """Every site's side of the wire in one process: their keys, their masking and signing."""

  def __init__(self, names: list[str], sends: tuple[str, ...], security: SecurityConfig,
               token_counts: dict[str, float], log: Callable[[str], None] = print):
    self.names, self.sends, self.security = list(names), tuple(sends), security
    self.token_counts, self.log = dict(token_counts), log
    self.identities: dict[str, identity.SiteIdentity] = {}

  def start(self, identity_dir: Path) -> None:
    """Each site's key (created on first use); the public registry the server reads."""
    if self.security.ledger:
      self.identities = identity.ensure_identities(identity_dir, self.names)

  def send(self, r: int, names: list[str], present, global_params, uploads,
           secagg_round: secagg.SecAggRound | None, published: list[dict]) -> Outgoing:
    """Round r's uploads of the reporting sites (`present`); `uploads` are stacked over
    `names` (host arrays); `secagg_round` is the protocol round the server opened (None:
    plain uploads, or too few sites to open one)."""
    out = Outgoing({}, {}, {}, secagg_round)
    plan = self.security.faults
    if self.security.secure_aggregation:
      for i, name in enumerate(names):
        if not present[i] or secagg_round is None:
          continue
        out.deltas[name] = update_vector(client_slice(uploads, i), global_params, self.sends)
        out.weights[name] = float(self.token_counts[name])
        try:
          vector = secagg_round.mask(name, out.deltas[name], out.weights[name])
        except secagg.SecAggError as e:
          out.masking[name] = "not_encodable"
          self.log(f"round {r}: {name} could not mask its update ({e}); recovered as a dropout")
          continue
        if plan.kind(name, r) == "drop_after_masking":
          out.masking[name] = "dropped_after_masking"
          continue
        out.payloads[name] = vector.tobytes()
    else:
      for i, name in enumerate(names):
        if present[i]:
          out.payloads[name] = identity.tree_bytes(
              select_factors(client_slice(uploads, i), self.sends))
    if self.security.ledger:
      for name, payload in out.payloads.items():
        out.signed[name] = sign(self.identities[name], r, identity.bytes_hash(payload),
                                plan.kind(name, r), published)
    return out
