"""Masks for secure aggregation: the AES-256-CTR PRG and the HKDF-SHA256 seeds that key it.

The PRG is AES-256-CTR (seed = key, zero nonce; every key is used for exactly one stream), read
as little-endian uint64. Pairwise seeds are bound to the round and to both ids in sorted order.
"""

from __future__ import annotations

import json

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_lora.privacy.secagg._errors import SecAggError

SEED_BYTES = 32
_DOMAIN = "fedjax-lora/secagg/v1"


def prg(seed: bytes, length: int) -> np.ndarray:
  """AES-256-CTR keystream under key `seed` (zero nonce) as `length` uniform uint64 values."""
  if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
    raise SecAggError(f"PRG seed must be {SEED_BYTES} bytes")
  encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
  stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
  return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _kdf(material: bytes, *label) -> bytes:
  """HKDF-SHA256 to 32 bytes; the JSON label keeps (round, ids) unambiguous."""
  info = json.dumps([_DOMAIN, *label]).encode()
  return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(material)


def pairwise_seed(shared_secret: bytes, round: int, a: str, b: str) -> bytes:
  """s_ab = s_ba: bound to the round so masks never repeat across rounds."""
  lo, hi = sorted((a, b))
  return _kdf(shared_secret, "pairwise-mask", round, lo, hi)


def _pair_mask(private: X25519PrivateKey, peer_public: bytes, round: int, me: str, peer: str,
               length: int) -> np.ndarray:
  shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
  return prg(pairwise_seed(shared, round, me, peer), length)
