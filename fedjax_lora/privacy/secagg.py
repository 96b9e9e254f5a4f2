"""Simulated secure aggregation (Bonawitz et al., CCS 2017, eprint 2017/281) for weighted FedAvg.

Why: the server should learn only sum_k n_k x_k and sum_k n_k over the clients that finished a
round, never one client's update. Weighting is therefore done client-side: each client masks
the fixed-point vector [n_k x_k, n_k] and the server divides the two unmasked sums.

Protocol (semi-honest, one round, run in-process with real primitives):
  1. Each client makes an X25519 key pair and a 32-byte self-mask seed b_u; the server
     broadcasts all public keys.
  2. Each client Shamir-shares (t-of-n, over GF(2^521 - 1)) its X25519 private key and b_u
     among all clients of the round. Shares travel client to client (`ShareBundle`); the real
     protocol encrypts them under a second key pair and routes them through the server, which
     this simulation takes as a private channel.
  3. Client u sends y_u = q(x_u) + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod 2^64,
     with s_uv = HKDF-SHA256(X25519(u, v), info = round and both ids in sorted order), so the
     pairwise masks cancel in sum_u y_u and are fresh every round.
  4. For each client the server asks the survivors for shares of b_u (u survived) or of u's
     private key (u dropped after masking), never both: each client refuses to reveal the
     second kind for the same peer. The server removes the self masks of survivors and the
     left-over pairwise masks between dropped clients and survivors.

The PRG is AES-256-CTR (seed = key, zero nonce; every key is used for exactly one stream), read
as little-endian uint64. Fixed point: q(x) = round(x * 2^f) in two's complement modulo 2^64.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import secrets
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # Mersenne prime: the Shamir field, large enough for 32-byte secrets
SEED_BYTES = 32
DEFAULT_FRAC_BITS = 24
_DOMAIN = "fedjax-lora/secagg/v1"

Share = tuple[int, int]  # (x, y) point of a Shamir polynomial over GF(PRIME)


class SecAggError(ValueError):
  """Secure aggregation cannot proceed safely or correctly."""


# ----------------------------------------------------------------------------- fixed point

def _first(mask: np.ndarray):
  """Index of the first True entry: an int for vectors, a tuple otherwise (for messages)."""
  idx = tuple(int(i) for i in np.argwhere(mask)[0])
  return idx[0] if len(idx) == 1 else idx


def _check_frac_bits(frac_bits: int) -> int:
  if isinstance(frac_bits, bool) or not isinstance(frac_bits, (int, np.integer)) \
      or not 0 <= frac_bits <= 62:
    raise SecAggError(f"frac_bits={frac_bits!r}: must be an integer in [0, 62]")
  return int(frac_bits)


def _check_count(num_clients: int) -> int:
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
      or num_clients < 1:
    raise SecAggError(f"num_clients={num_clients!r}: must be an integer >= 1")
  return int(num_clients)


def _max_abs_int(num_clients: int) -> float:
  """Largest |q| such that num_clients of them sum below 2^63; as a float that is never above."""
  exact = (2**63 - 1) // num_clients
  limit = float(exact)
  if int(limit) > exact:  # float rounding went up; step down one ulp
    limit = float(np.nextafter(limit, 0.0))
  return limit


def safe_range(frac_bits: int = DEFAULT_FRAC_BITS, num_clients: int = 1) -> float:
  """Largest |x| that `quantize` accepts, so a sum of num_clients values cannot wrap."""
  return _max_abs_int(_check_count(num_clients)) / 2.0**_check_frac_bits(frac_bits)


def quantize(x, frac_bits: int = DEFAULT_FRAC_BITS, num_clients: int = 1) -> np.ndarray:
  """round(x * 2^f) as two's complement uint64; rejects values a num_clients-sum could wrap."""
  frac_bits, num_clients = _check_frac_bits(frac_bits), _check_count(num_clients)
  arr = np.asarray(x, dtype=np.float64)
  bad = ~np.isfinite(arr)
  if bad.any():
    idx = _first(bad)
    raise SecAggError(f"cannot quantize non-finite value {float(arr[idx])!r} at index {idx}")
  with np.errstate(over="ignore"):
    scaled = np.rint(arr * 2.0**frac_bits)  # exact scaling by a power of two, then round
  over = np.abs(scaled) > _max_abs_int(num_clients)
  if over.any():
    idx = _first(over)
    raise SecAggError(
        f"value {float(arr[idx])!r} at index {idx} is outside the safe fixed-point range "
        f"|x| <= {safe_range(frac_bits, num_clients):.6g} for frac_bits={frac_bits} and "
        f"num_clients={num_clients} (a sum of that many values would wrap modulo 2^64); "
        "rescale the update or lower frac_bits")
  return scaled.astype(np.int64).view(np.uint64)


def dequantize(total, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
  """Reads a uint64 ring element (or sum) as a signed fixed-point float64."""
  frac_bits = _check_frac_bits(frac_bits)
  arr = np.asarray(total)
  if arr.dtype != np.uint64:
    raise SecAggError(f"dequantize expects uint64 ring elements, got dtype {arr.dtype}")
  return arr.view(np.int64).astype(np.float64) / 2.0**frac_bits


# ----------------------------------------------------------------------------- PRG and KDF

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


# ----------------------------------------------------------------------------- Shamir

def _eval_poly(coeffs: Sequence[int], x: int) -> int:
  acc = 0
  for c in reversed(coeffs):
    acc = (acc * x + c) % PRIME
  return acc


def split_secret(secret: bytes, n: int, t: int, rng=None) -> list[Share]:
  """t-of-n Shamir shares at x = 1..n; any t-1 of them are independent of the secret.

  rng: anything with `randrange` (default `secrets.SystemRandom()`); a seeded
  `random.Random` is for reproducible simulations only, not for real secrets.
  """
  if not isinstance(secret, bytes) or len(secret) * 8 >= PRIME.bit_length():
    raise SecAggError(f"secret must be bytes shorter than {PRIME.bit_length() // 8} bytes")
  if isinstance(n, bool) or isinstance(t, bool) or not 1 <= t <= n:
    raise SecAggError(f"Shamir needs 1 <= t <= n, got t={t!r}, n={n!r}")
  rng = secrets.SystemRandom() if rng is None else rng
  coeffs = [int.from_bytes(secret, "big")] + [rng.randrange(PRIME) for _ in range(t - 1)]
  return [(x, _eval_poly(coeffs, x)) for x in range(1, n + 1)]


def _interpolate_at_zero(shares: Sequence[Share]) -> int:
  xs = [x % PRIME for x, _ in shares]
  if len(set(xs)) != len(xs) or 0 in xs:
    raise SecAggError("Shamir shares must have distinct non-zero x coordinates")
  total = 0
  for i, (xi, yi) in enumerate(shares):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if j != i:
        num = num * -xj % PRIME
        den = den * (xi - xj) % PRIME
    total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
  return total


def reconstruct_secret(shares: Sequence[Share], length: int) -> bytes:
  """The `length`-byte secret from >= t shares.

  Fewer than t shares interpolate to a uniform field element, which fits in `length` bytes with
  negligible probability; that case is reported instead of returning garbage.
  """
  if not shares:
    raise SecAggError("cannot reconstruct a secret from zero shares")
  value = _interpolate_at_zero(list(shares))
  if value >> (8 * length):
    raise SecAggError(
        f"the {len(shares)} shares do not interpolate to a {length}-byte secret: too few shares "
        "(below the threshold) or shares of different secrets")
  return value.to_bytes(length, "big")


# ----------------------------------------------------------------------------- validation

def _check_ids(ids: Iterable[str], what: str = "client ids") -> tuple[str, ...]:
  ids = list(ids)
  if not ids:
    raise SecAggError(f"{what}: need at least one client")
  for c in ids:
    if not isinstance(c, str) or not c:
      raise SecAggError(f"{what}: every id must be a non-empty string, got {c!r}")
  if len(set(ids)) != len(ids):
    raise SecAggError(f"{what}: duplicate ids in {ids!r}")
  return tuple(sorted(ids))


def _check_round(round: int) -> int:
  if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
    raise SecAggError(f"round={round!r}: must be an integer >= 0")
  return int(round)


def _check_threshold(threshold: int, n: int) -> int:
  if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) \
      or not 1 <= threshold <= n:
    raise SecAggError(f"threshold={threshold!r}: must be an integer in [1, {n}]")
  return int(threshold)


def _weighted_vector(update, weight) -> np.ndarray:
  """[w x, w] in float64: the client-side weighting the server must not do itself."""
  x = np.asarray(update, dtype=np.float64)
  if x.ndim != 1:
    raise SecAggError(f"update must be a 1-D vector (flatten pytrees first), got shape {x.shape}")
  bad = ~np.isfinite(x)
  if bad.any():
    i = _first(bad)
    raise SecAggError(f"update has non-finite value {float(x[i])!r} at index {i}")
  w = float(weight)
  if not (np.isfinite(w) and w >= 0):
    raise SecAggError(f"weight must be finite and >= 0, got {weight!r}")
  return np.append(w * x, w)


# ----------------------------------------------------------------------------- protocol

@dataclasses.dataclass(frozen=True)
class ShareBundle:
  """What `holder` keeps for `owner`: one share of owner's X25519 key and one of its b_u."""
  owner: str
  holder: str
  key_share: Share
  seed_share: Share


class SecAggClient:
  """One client in one round; its secrets never leave it except as Shamir shares.

  seed: None draws keys and b_u from the OS; an int or bytes derives them (and the Shamir
  coefficients) deterministically from (seed, round, client_id), for reproducible tests.
  """

  def __init__(self, client_id: str, round: int, seed: int | bytes | None = None):
    self.client_id = _check_ids([client_id], "client_id")[0]
    self.round = _check_round(round)
    if seed is None:
      self._private = X25519PrivateKey.generate()
      self._self_seed = os.urandom(SEED_BYTES)
      self._rng = secrets.SystemRandom()
    else:
      root = seed if isinstance(seed, bytes) else f"int:{int(seed)}".encode()
      ctx = (self.round, self.client_id)
      self._private = X25519PrivateKey.from_private_bytes(_kdf(root, "x25519", *ctx))
      self._self_seed = _kdf(root, "self-mask", *ctx)
      self._rng = random.Random(_kdf(root, "shamir", *ctx))
    self.public_key: bytes = self._private.public_key().public_bytes_raw()
    self._peers: tuple[str, ...] | None = None
    self._threshold = 0
    self._held: dict[str, ShareBundle] = {}
    self._revealed: dict[str, bool] = {}  # owner -> dropped flag of the share given out

  def shares_for(self, peers: Sequence[str], threshold: int) -> dict[str, ShareBundle]:
    """Deals t-of-n shares of the private key and b_u to all clients of the round (self too)."""
    if self._peers is not None:
      raise SecAggError(f"client {self.client_id!r} already dealt its shares this round")
    peers = _check_ids(peers, "peers")
    if self.client_id not in peers:
      raise SecAggError(f"peers must list every client of the round, including "
                        f"{self.client_id!r} itself")
    threshold = _check_threshold(threshold, len(peers))
    key_shares = split_secret(self._private.private_bytes_raw(), len(peers), threshold, self._rng)
    seed_shares = split_secret(self._self_seed, len(peers), threshold, self._rng)
    self._peers, self._threshold = peers, threshold
    return {p: ShareBundle(self.client_id, p, k, s)
            for p, k, s in zip(peers, key_shares, seed_shares)}

  def hold(self, bundle: ShareBundle) -> None:
    """Keeps the shares another client dealt to this one."""
    if bundle.holder != self.client_id:
      raise SecAggError(f"bundle for {bundle.holder!r} delivered to {self.client_id!r}")
    if bundle.owner in self._held:
      raise SecAggError(f"{self.client_id!r} already holds shares of {bundle.owner!r}")
    self._held[bundle.owner] = bundle

  def mask(self, update: np.ndarray, weight: float, public_keys: Mapping[str, bytes],
           frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """y_u: the masked fixed-point [weight * update, weight], length d + 1, uint64."""
    if self._peers is None:
      raise SecAggError(f"client {self.client_id!r} must deal shares (shares_for) before masking, "
                        "or its pairwise masks could not be removed if it dropped")
    own = public_keys.get(self.client_id, self.public_key)
    if own != self.public_key:
      raise SecAggError(f"the server's public key for {self.client_id!r} is not this client's")
    others = sorted(set(public_keys) - {self.client_id})
    unknown = sorted(set(others) - set(self._peers))
    if unknown:
      raise SecAggError(f"client {self.client_id!r} dealt no shares to {unknown}; refusing to "
                        "mask with peers whose masks could not be recovered")
    if len(others) + 1 < self._threshold:
      raise SecAggError(f"only {len(others) + 1} clients in the mask set, below the threshold "
                        f"{self._threshold}")
    try:
      q = quantize(_weighted_vector(update, weight), frac_bits, num_clients=len(self._peers))
    except SecAggError as e:
      raise SecAggError(f"client {self.client_id!r}: {e}") from None
    y = q + prg(self._self_seed, q.size)
    for peer in others:
      m = _pair_mask(self._private, public_keys[peer], self.round, self.client_id, peer, q.size)
      y = y + m if self.client_id < peer else y - m
    return y

  def reveal(self, for_client: str, dropped: bool) -> Share:
    """The share held of for_client's key (it dropped) or of its b_u (it survived), never both."""
    if for_client not in self._held:
      raise SecAggError(f"{self.client_id!r} holds no shares of {for_client!r}")
    dropped = bool(dropped)
    if dropped and for_client == self.client_id:
      raise SecAggError(f"client {self.client_id!r} is alive; it cannot be treated as dropped")
    if self._revealed.get(for_client, dropped) != dropped:
      raise SecAggError(
          f"{self.client_id!r} refuses to reveal both the key share and the self-mask share of "
          f"{for_client!r}: together they would unmask its individual update")
    self._revealed[for_client] = dropped
    bundle = self._held[for_client]
    return bundle.key_share if dropped else bundle.seed_share


class SecAggServer:
  """Sees public keys, masked vectors and revealed shares only; outputs the unmasked sums."""

  def __init__(self, client_ids: Iterable[str], threshold: int,
               frac_bits: int = DEFAULT_FRAC_BITS, *, round: int):
    self.client_ids = _check_ids(client_ids)
    self.threshold = _check_threshold(threshold, len(self.client_ids))
    self.frac_bits = _check_frac_bits(frac_bits)
    self.round = _check_round(round)
    self._keys: dict[str, bytes] = {}
    self._masked: dict[str, np.ndarray] = {}

  def add_public_key(self, client_id: str, public_key: bytes) -> None:
    if client_id not in self.client_ids:
      raise SecAggError(f"unknown client {client_id!r}")
    if client_id in self._keys:
      raise SecAggError(f"client {client_id!r} already registered a public key")
    if not isinstance(public_key, bytes) or len(public_key) != 32:
      raise SecAggError(f"public key of {client_id!r} must be 32 raw X25519 bytes")
    self._keys[client_id] = public_key

  @property
  def public_keys(self) -> dict[str, bytes]:
    """The mask set broadcast to clients: everyone who registered a key."""
    return dict(self._keys)

  def add_masked(self, client_id: str, vector: np.ndarray) -> None:
    if client_id not in self._keys:
      raise SecAggError(f"client {client_id!r} sent a masked vector without a registered key")
    if client_id in self._masked:
      raise SecAggError(f"client {client_id!r} already sent its masked vector")
    vector = np.asarray(vector)
    if vector.dtype != np.uint64 or vector.ndim != 1 or vector.size < 1:
      raise SecAggError(f"masked vector of {client_id!r} must be a non-empty 1-D uint64 array, "
                        f"got dtype {vector.dtype} and shape {vector.shape}")
    sizes = {v.size for v in self._masked.values()}
    if sizes and vector.size not in sizes:
      raise SecAggError(f"masked vector of {client_id!r} has length {vector.size}, expected "
                        f"{sizes.pop()}")
    self._masked[client_id] = vector.copy()

  @property
  def survivors(self) -> tuple[str, ...]:
    return tuple(sorted(self._masked))

  @property
  def dropped(self) -> tuple[str, ...]:
    """Clients in the mask set whose masked vector never arrived."""
    return tuple(sorted(set(self._keys) - set(self._masked)))

  @property
  def masked(self) -> dict[str, np.ndarray]:
    return {c: v.copy() for c, v in self._masked.items()}

  def require_quorum(self) -> None:
    """Unmasking below the threshold is refused: shares could not (and must not) suffice."""
    m = len(self._masked)
    if m < self.threshold:
      raise SecAggError(f"only {m} of {len(self._keys)} clients survived, below the threshold "
                        f"{self.threshold}; the round cannot be unmasked")

  def _secret(self, revealed: Mapping[str, Sequence[Share]], owner: str, what: str) -> bytes:
    shares = list(revealed.get(owner, ()))
    if len(shares) < self.threshold:
      raise SecAggError(f"need {self.threshold} shares of the {what} of {owner!r}, "
                        f"got {len(shares)}")
    return reconstruct_secret(shares, SEED_BYTES)

  def aggregate(self, revealed: Mapping[str, Sequence[Share]]) -> tuple[np.ndarray, float]:
    """(sum of weighted updates [d], total weight) over survivors.

    revealed: owner id -> shares from survivors, of b_owner for survivors and of the private
    key for dropped clients.
    """
    self.require_quorum()
    survivors, dropped = self.survivors, self.dropped
    dim = next(iter(self._masked.values())).size
    total = np.zeros(dim, dtype=np.uint64)
    for v in survivors:
      total += self._masked[v]
      total -= prg(self._secret(revealed, v, "self-mask seed"), dim)
    for u in dropped:
      private = X25519PrivateKey.from_private_bytes(self._secret(revealed, u, "private key"))
      if private.public_key().public_bytes_raw() != self._keys[u]:
        raise SecAggError(f"reconstructed key of dropped client {u!r} does not match its public "
                          "key: bad or mixed shares")
      for v in survivors:  # v added +PRG(s_uv) if v < u, else subtracted it
        m = _pair_mask(private, self._keys[v], self.round, u, v, dim)
        total = total - m if v < u else total + m
    values = dequantize(total, self.frac_bits)
    return values[:-1], float(values[-1])


# ----------------------------------------------------------------------------- driver

@dataclasses.dataclass(frozen=True)
class SecAggResult:
  """Outcome of one simulated round; `masked` is exactly what the server received."""
  mean: np.ndarray
  total_weight: float
  survivors: tuple[str, ...]
  dropped: tuple[str, ...]
  quantization_bound: float
  masked: dict[str, np.ndarray]


def quantization_bound(num_survivors: int, frac_bits: int, max_abs: float,
                       total_weight: float) -> float:
  """Worst-case |mean - exact mean| per coordinate from fixed-point rounding.

  Each of the m survivors rounds w_k x_k and w_k by at most e0 = 2^-(f+1), so the sums satisfy
  |S^ - S| <= e and |W^ - W| <= e with e = m e0. Then
    S^/W^ - S/W = ((S^ - S) W - S (W^ - W)) / (W^ W),
  whose magnitude is <= e (1 + |S|/W) / W^ <= e (1 + M) / W^, because |S|/W <= M = max |x_k|
  for weights >= 0. W^ is the (quantized) total weight the server reports. The term 2^-49 M
  covers float64 rounding (w x products, int64 -> float64, the final division).
  """
  e = num_survivors * 2.0 ** -(frac_bits + 1)
  return e * (1.0 + max_abs) / total_weight + 2.0**-49 * max_abs


def secure_weighted_mean(updates: Mapping[str, np.ndarray], weights: Mapping[str, float], *,
                         round: int, dropped: Iterable[str] = frozenset(),
                         threshold: int | None = None, frac_bits: int = DEFAULT_FRAC_BITS,
                         seed: int | bytes | None = None) -> SecAggResult:
  """Runs one full round; clients in `dropped` mask but their vectors never reach the server."""
  ids = _check_ids(updates, "updates")
  if set(weights) != set(ids):
    raise SecAggError(f"weights and updates must name the same clients; missing "
                      f"{sorted(set(ids) - set(weights))}, extra {sorted(set(weights) - set(ids))}")
  dropped = set(dropped)
  if dropped - set(ids):
    raise SecAggError(f"dropped clients {sorted(dropped - set(ids))} are not in updates")
  dims = {c: np.shape(updates[c]) for c in ids}
  if len(set(dims.values())) != 1:
    raise SecAggError(f"all updates must have the same shape, got {dims}")
  threshold = len(ids) // 2 + 1 if threshold is None else threshold

  clients = {c: SecAggClient(c, round, seed) for c in ids}
  server = SecAggServer(ids, threshold, frac_bits, round=round)
  for c in ids:
    server.add_public_key(c, clients[c].public_key)
  for c in ids:
    for peer, bundle in clients[c].shares_for(ids, threshold).items():
      clients[peer].hold(bundle)
  keys = server.public_keys
  for c in ids:
    y = clients[c].mask(updates[c], weights[c], keys, frac_bits)
    if c not in dropped:
      server.add_masked(c, y)

  server.require_quorum()
  gone = set(server.dropped)
  revealed = {o: [clients[h].reveal(o, dropped=o in gone) for h in server.survivors] for o in ids}
  weighted_sum, total_weight = server.aggregate(revealed)
  if not total_weight > 0:
    raise SecAggError("total weight of the surviving clients is 0; cannot average")
  survivors = server.survivors
  max_abs = max((float(np.max(np.abs(np.asarray(updates[c], np.float64)), initial=0.0))
                 for c in survivors), default=0.0)
  return SecAggResult(
      mean=weighted_sum / total_weight, total_weight=total_weight, survivors=survivors,
      dropped=server.dropped,
      quantization_bound=quantization_bound(len(survivors), frac_bits, max_abs, total_weight),
      masked=server.masked)
