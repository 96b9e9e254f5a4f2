"""The deployed protocol's messages, and what binds them to a site's key and to this run.

A run has a random nonce, chosen by the coordinator when the run starts (kept across its
restarts). The handshake proves a node holds the private key the coordinator registered
for the site it claims: the node signs (nonce, site, client id, a fresh challenge). Every
upload is signed over (nonce, round, client id, update hash) (`identity.sign_upload` with
the run), so an upload recorded in an earlier run with the same keys, same round and same
bytes, does not verify in this one.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fedjax_lora.security import identity

HELLO, HELLO_REPLY = "hello", "hello_reply"
TRAIN, UPLOAD = "train", "upload"
DECISION, DECISION_REPLY = "decision", "decision_reply"
# Secure aggregation (deploy/secagg_wire.py): keys, then the sealed shares, then (after the
# masked uploads of `train`) the shares the coordinator needs to unmask the sum.
SECAGG_KEYS, SECAGG_DEAL, SECAGG_REVEAL = "secagg_keys", "secagg_deal", "secagg_reveal"
SECAGG_REPLY = "secagg_reply"
PAYLOAD = "payload"  # the frame field holding an upload's signed bytes
HELLO_DOMAIN = b"fedjax-lora hello v1"


def public_key_hex(me: identity.SiteIdentity) -> str:
  return me.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw).hex()


def hello_message(nonce: str, site: str, cid: str, challenge: str) -> bytes:
  return b"|".join([HELLO_DOMAIN, nonce.encode(), site.encode(), cid.encode(),
                    challenge.encode()])


def sign_hello(me: identity.SiteIdentity, nonce: str, challenge: str) -> bytes:
  return me.private_key.sign(hello_message(nonce, me.site, me.client_id, challenge))


def check_hello(registry: dict, reply: dict, nonce: str, challenge: str) -> str | None:
  """Why a node's hello is refused (None: it holds the key registered for its site).
  `registry` is `identity.read_registry`'s site -> (client id, public key)."""
  site = reply.get("site")
  if site not in registry:
    return f"site {site!r} is not in the coordinator's key registry"
  cid, key = registry[site]
  if reply.get("client_id") != cid:
    return (f"site {site!r} presented key {str(reply.get('client_id'))[:12]}, but the registry "
            f"holds {cid[:12]} for it (unregistered key)")
  try:
    key.verify(bytes.fromhex(reply.get("signature", "")),
               hello_message(nonce, site, cid, challenge))
  except (InvalidSignature, ValueError):
    return f"site {site!r}: the handshake signature does not verify under its registered key"
  return None


def upload_payload(upload: dict) -> bytes:
  """The bytes a site signs and the server hashes: the sent factors alone (what the ledger
  and `launch.audit` replay), or every uploaded tree when there is more (SCAFFOLD's control
  change)."""
  if set(upload) == {"update"}:
    return identity.tree_bytes(upload["update"])
  return identity.tree_bytes(upload)


def parse_upload(payload: bytes, extras: bool, where: str) -> dict:
  """Inverse of `upload_payload`: {"update": ..., and the extra trees}."""
  tree = identity.parse_tree_bytes(payload, where)
  return tree if extras else {"update": tree}
