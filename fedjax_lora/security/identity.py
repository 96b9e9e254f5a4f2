"""Site identities (Ed25519) and signed uploads (method.md §10).

Every site holds an Ed25519 key pair; its client id is SHA-256 of the raw public key. An
upload is signed over (round, client id, SHA-256 of the serialized update), so the server
can tell who sent it, that it was not altered, and that it belongs to this round. In the
simulation all keys live in `<workdir>/identity/`: `registry.json` holds the public keys (what
the server knows), `keys/<site>.pem` the private keys (what each site would keep to itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedjax_lora import files
from fedjax_lora.checkpointing import keys_to_data, path_names
from fedjax_lora.errors import IdentityError

REGISTRY = "registry.json"
DOMAIN = b"fedjax-lora upload v1"
# A deployed run binds every signature to its run nonce as well: an upload signed in an
# earlier run with the same keys (same round, same bytes) does not verify in this one.
RUN_DOMAIN = b"fedjax-lora upload v2"


class RejectedUpload(Exception):
  """An upload the server refuses; `reason` is one of REJECT_REASONS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


REJECT_REASONS = ("unsigned", "wrong_client", "unregistered", "replayed", "duplicate",
                  "hash_mismatch", "bad_signature")


# ---- deterministic serialization ---------------------------------------------------------------

def tree_bytes(tree: Any) -> bytes:
  """Fixed tensor order (sorted paths), dtype and shape headers, little-endian data."""
  leaves = jax.tree_util.tree_flatten_with_path(keys_to_data(tree))[0]
  parts = []
  for path, leaf in sorted(((path_names(p), x) for p, x in leaves), key=lambda t: t[0]):
    arr = np.asarray(leaf)
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    header = f"{'/'.join(path)}|{arr.dtype.str}|{list(arr.shape)}\n".encode()
    parts += [header, arr.tobytes()]
  return b"".join(parts)


def parse_tree_bytes(data: bytes, where: str = "payload") -> dict:
  """Inverse of `tree_bytes`: a nested dict of numpy arrays (for replaying stored uploads)."""
  tree: dict = {}
  offset = 0
  while offset < len(data):
    end = data.find(b"\n", offset)
    try:
      path, dtype, shape = data[offset:end].decode().split("|")
      dtype, shape = np.dtype(dtype), tuple(json.loads(shape))
    except (ValueError, UnicodeDecodeError) as e:
      raise IdentityError(f"{where}: bad tensor header at byte {offset} ({e})") from None
    size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if end < 0 or end + 1 + size > len(data):
      raise IdentityError(f"{where}: tensor {path} is truncated")
    arr = np.frombuffer(data, dtype, count=size // dtype.itemsize, offset=end + 1).reshape(shape)
    node = tree
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = arr.astype(dtype.newbyteorder("="))
    offset = end + 1 + size
  return tree


def tree_hash(tree: Any) -> str:
  """Hex SHA-256 of `tree_bytes`: the same for a tree and its Orbax-restored copy."""
  return hashlib.sha256(tree_bytes(tree)).hexdigest()


def bytes_hash(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


# ---- keys and registry -------------------------------------------------------------------------

def client_id(public_key: ed25519.Ed25519PublicKey) -> str:
  raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
  return hashlib.sha256(raw).hexdigest()


@dataclasses.dataclass(frozen=True)
class SiteIdentity:
  site: str
  private_key: ed25519.Ed25519PrivateKey

  @property
  def client_id(self) -> str:
    return client_id(self.private_key.public_key())


def _load_private(path: Path) -> ed25519.Ed25519PrivateKey:
  try:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
  except (ValueError, TypeError) as e:
    raise IdentityError(f"{path}: not an unencrypted PEM private key ({e})") from None
  if not isinstance(key, ed25519.Ed25519PrivateKey):
    raise IdentityError(f"{path}: expected an Ed25519 private key, found "
                        f"{type(key).__name__}")
  return key


def _write_private(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
  pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
  files.write_atomic(path, pem, mode=0o600)


def read_registry(directory: str | os.PathLike) -> dict[str, tuple[str, ed25519.Ed25519PublicKey]]:
  """site -> (client id, public key), from `<directory>/registry.json`
  ({site: {client_id, public_key}}), every entry checked."""
  path = Path(directory) / REGISTRY
  try:
    entries = json.loads(path.read_text())
  except FileNotFoundError:
    raise IdentityError(f"{path}: no key registry (run the federation once to create it)") \
        from None
  except json.JSONDecodeError as e:
    raise IdentityError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
  if not isinstance(entries, dict):
    raise IdentityError(f"{path}: expected an object of site -> key entries")
  registry = {}
  for site, entry in entries.items():
    try:
      raw = bytes.fromhex(entry["public_key"])
      key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
      cid = entry["client_id"]
    except (KeyError, TypeError, ValueError) as e:
      raise IdentityError(f"{path}: site {site!r}: bad entry ({type(e).__name__}: {e}); "
                          "expected hex 'public_key' (32 bytes) and 'client_id'") from None
    if client_id(key) != cid:
      raise IdentityError(f"{path}: site {site!r}: client_id is not SHA-256 of its public key")
    registry[site] = (cid, key)
  return registry


def load_registry(directory: str | os.PathLike) -> dict[str, ed25519.Ed25519PublicKey]:
  """client id -> public key (what an upload's signature is checked against)."""
  return dict(read_registry(directory).values())


def ensure_identities(directory: str | os.PathLike, sites: list[str]) -> dict[str, SiteIdentity]:
  """Loads each site's key from `<directory>/keys`, creating the missing ones, and writes the
  public registry. Existing keys are kept, so a resumed run signs with the same identities."""
  directory = Path(directory)
  keys_dir = directory / "keys"
  keys_dir.mkdir(parents=True, exist_ok=True)
  identities = {}
  for site in sites:
    if not site or "/" in site or site.startswith("."):
      raise IdentityError(f"site name {site!r} cannot name a key file")
    path = keys_dir / f"{site}.pem"
    if path.exists():
      key = _load_private(path)
    else:
      key = ed25519.Ed25519PrivateKey.generate()
      _write_private(path, key)
    identities[site] = SiteIdentity(site, key)
  registry = {}
  for site, ident in identities.items():
    raw = ident.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)
    registry[site] = {"client_id": ident.client_id, "public_key": raw.hex()}
  files.write_atomic(directory / REGISTRY, json.dumps(registry, indent=1, sort_keys=True))
  return identities


# ---- uploads -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SignedUpload:
  """What travels with an update: the claim (round, client id, hash) and its signature."""
  round: int
  client_id: str
  update_hash: str
  signature: bytes | None
  run: str = ""  # the run nonce it claims (deployed runs; "" in the simulator)


def signed_message(round_index: int, cid: str, update_hash: str, run: str = "") -> bytes:
  """The bytes a site signs: (round, client id, update hash), and the run nonce if any."""
  if run:
    return b"|".join([RUN_DOMAIN, run.encode(), str(int(round_index)).encode(), cid.encode(),
                      update_hash.encode()])
  return b"|".join([DOMAIN, str(int(round_index)).encode(), cid.encode(), update_hash.encode()])


def sign_upload(identity: SiteIdentity, round_index: int, update_hash: str,
                run: str = "") -> SignedUpload:
  sig = identity.private_key.sign(signed_message(round_index, identity.client_id, update_hash,
                                                 run))
  return SignedUpload(int(round_index), identity.client_id, update_hash, sig, run)


class UploadVerifier:
  """The server's check of every upload before it may be aggregated.

  Rejects: no signature; a client id not in the registry; a claim for another round or
  another run (a replayed upload); a second upload from the same client in a round; a
  payload whose hash is not the signed one; a signature that does not verify under the
  registered key (over this run's nonce: a claim of this run on an old signature fails here).
  """

  def __init__(self, registry: dict[str, ed25519.Ed25519PublicKey], run: str = ""):
    self.registry = dict(registry)
    self.run = run
    self._seen: set[tuple[int, str]] = set()

  def verify(self, upload: SignedUpload, round_index: int, payload_hash: str,
             expected_client_id: str | None = None) -> None:
    """Raises RejectedUpload unless the upload is acceptable; `expected_client_id` is who the
    server is receiving from (a valid upload of another site is not this site's upload)."""
    if upload.signature is None:
      raise RejectedUpload("unsigned", f"client {upload.client_id[:12]} sent no signature")
    if expected_client_id is not None and upload.client_id != expected_client_id:
      raise RejectedUpload("wrong_client", f"an upload of client {upload.client_id[:12]} "
                           f"arrived from client {expected_client_id[:12]}")
    key = self.registry.get(upload.client_id)
    if key is None:
      raise RejectedUpload("unregistered", f"client {upload.client_id[:12]} is not registered")
    if upload.round != round_index:
      raise RejectedUpload("replayed", f"client {upload.client_id[:12]} sent an upload signed "
                           f"for round {upload.round} in round {round_index}")
    if upload.run != self.run:
      raise RejectedUpload("replayed", f"client {upload.client_id[:12]} sent an upload signed "
                           f"for run {upload.run[:12] or '(none)'} in run {self.run[:12]}")
    if (round_index, upload.client_id) in self._seen:
      raise RejectedUpload("duplicate", f"client {upload.client_id[:12]} already uploaded in "
                           f"round {round_index}")
    if upload.update_hash != payload_hash:
      raise RejectedUpload("hash_mismatch", f"client {upload.client_id[:12]}: payload hash "
                           "differs from the signed hash")
    try:
      key.verify(upload.signature, signed_message(upload.round, upload.client_id,
                                                   upload.update_hash, self.run))
    except InvalidSignature:
      raise RejectedUpload("bad_signature", f"client {upload.client_id[:12]}: signature does "
                           "not verify under its registered key") from None
    self._seen.add((round_index, upload.client_id))
