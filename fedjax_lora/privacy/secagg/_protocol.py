"""The secure aggregation protocol: clients deal shares and mask, the server unmasks the sums.

`SecAggClient` and `SecAggServer` are the two roles of one round; `SecAggRound` runs them
phase by phase (the one orchestration), and `secure_weighted_mean` runs a whole round
in-process through it. The package docstring (`fedjax_lora.privacy.secagg`) describes the
protocol step by step.
"""

from __future__ import annotations

import dataclasses
import os
import random
import secrets
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedjax_lora.privacy.secagg._errors import SecAggError
from fedjax_lora.privacy.secagg._fixed_point import (DEFAULT_FRAC_BITS, _check_frac_bits, _first,
                                                     dequantize, quantization_bound, quantize)
from fedjax_lora.privacy.secagg._prg import SEED_BYTES, _kdf, _pair_mask, prg
from fedjax_lora.privacy.secagg._shamir import PRIME, Share, reconstruct_secret, split_secret


# A "sum" of one update is that update: below two survivors secure aggregation aggregates
# nothing. (With exactly two, each site can subtract its own update from the new global and
# learn the other's; the server still cannot. WORKSPACE.md, threat model.)
MIN_SURVIVORS = 2


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


def _hex_bytes(text, length: int) -> bytes:
  data = bytes.fromhex(text)
  if len(data) != length:
    raise SecAggError(f"expected {length} hex-encoded bytes, got {len(data)}")
  return data


# Hex digits of a field element: fixed width, so an encrypted share's length says nothing of it.
_SHARE_HEX = 2 * ((PRIME.bit_length() + 7) // 8)


def _share_json(share: Share) -> list:
  """[x, hex y]: y is a 521-bit field element, beyond what JSON readers keep exact as a
  number."""
  return [share[0], format(share[1], f"0{_SHARE_HEX}x")]


def _share_from_json(value) -> Share:
  x, y = value
  y = int(y, 16)
  if isinstance(x, bool) or not isinstance(x, int) or x < 1 or not 0 <= y < PRIME:
    raise SecAggError("not a Shamir share: x must be an integer >= 1 and y a field element")
  return (x, y)


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
      private, self_seed, shamir_seed = X25519PrivateKey.generate(), os.urandom(SEED_BYTES), None
    else:
      root = seed if isinstance(seed, bytes) else f"int:{int(seed)}".encode()
      ctx = (self.round, self.client_id)
      private = X25519PrivateKey.from_private_bytes(_kdf(root, "x25519", *ctx))
      self_seed, shamir_seed = _kdf(root, "self-mask", *ctx), _kdf(root, "shamir", *ctx)
    self._set_secrets(private, self_seed, shamir_seed)
    self._peers: tuple[str, ...] | None = None
    self._threshold = 0
    self._held: dict[str, ShareBundle] = {}
    self._revealed: dict[str, bool] = {}  # owner -> dropped flag of the share given out

  def _set_secrets(self, private: X25519PrivateKey, self_seed: bytes,
                   shamir_seed: bytes | None) -> None:
    self._private, self._self_seed = private, self_seed
    # The seed is kept only so that a seeded client restored before dealing deals the same
    # shares; OS randomness has nothing to keep.
    self._shamir_seed = shamir_seed
    self._rng = secrets.SystemRandom() if shamir_seed is None else random.Random(shamir_seed)
    self.public_key: bytes = private.public_key().public_bytes_raw()

  def export_state(self) -> dict:
    """Everything this client knows, secrets included, as JSON values (hex for bytes and
    share values): for a site that runs each protocol step in a fresh process and keeps this
    in its own storage. Whoever reads it can unmask this client; it must never be sent."""
    return {
        "client_id": self.client_id, "round": self.round,
        "private_key": self._private.private_bytes_raw().hex(),
        "self_seed": self._self_seed.hex(),
        # After dealing the Shamir randomness is never used again (a second deal is refused).
        "shamir_seed": None if self._shamir_seed is None or self._peers is not None
                       else self._shamir_seed.hex(),
        "peers": None if self._peers is None else list(self._peers),
        "threshold": self._threshold,
        "held": {o: {"key_share": _share_json(b.key_share), "seed_share": _share_json(b.seed_share)}
                 for o, b in self._held.items()},
        "revealed": dict(self._revealed),
    }

  @classmethod
  def from_state(cls, state: Mapping) -> SecAggClient:
    """The client `export_state` saved, with the same checks a live client keeps (one deal,
    bundles held by this client only, never both kinds of share revealed for one owner)."""
    try:
      client = cls.__new__(cls)
      client.client_id = _check_ids([state["client_id"]], "client_id")[0]
      client.round = _check_round(state["round"])
      private = X25519PrivateKey.from_private_bytes(_hex_bytes(state["private_key"], 32))
      shamir = state["shamir_seed"]
      client._set_secrets(private, _hex_bytes(state["self_seed"], SEED_BYTES),
                          None if shamir is None else _hex_bytes(shamir, SEED_BYTES))
      peers = state["peers"]
      client._peers = None if peers is None else _check_ids(peers, "peers")
      client._threshold = (0 if peers is None
                           else _check_threshold(state["threshold"], len(client._peers)))
      client._held, client._revealed = {}, {}
      for owner, shares in dict(state["held"]).items():
        client.hold(ShareBundle(owner, client.client_id, _share_from_json(shares["key_share"]),
                                _share_from_json(shares["seed_share"])))
      for owner, dropped in dict(state["revealed"]).items():
        if owner not in client._held or not isinstance(dropped, bool):
          raise SecAggError(f"revealed entry {owner!r}: {dropped!r} names no held share")
        client._revealed[owner] = dropped
    except SecAggError as e:
      raise SecAggError(f"saved secure-aggregation client state: {e}") from None
    except KeyError as e:
      raise SecAggError(f"saved secure-aggregation client state lacks field {e}") from None
    except (TypeError, ValueError) as e:  # the text could quote a secret: name the kind only
      raise SecAggError(f"saved secure-aggregation client state is malformed "
                        f"({type(e).__name__})") from None
    return client

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


class SecAggRound:
  """One round of the protocol, phase by phase; the only orchestration of the two roles.

  Setup (here): every client makes its key pair, registers its public key and deals Shamir
  shares of its self-mask seed and private key to every peer. Then each client masks its
  update (`mask`, the client side), the server collects the vectors that reach it
  (`receive`), and `unmask` asks the survivors for the shares the server needs and returns
  the weighted sum. `secure_weighted_mean` runs the phases straight through; a federation
  checks each upload's signature between `mask` and `receive`.
  """

  def __init__(self, client_ids: Iterable[str], round: int, threshold: int,
               frac_bits: int = DEFAULT_FRAC_BITS, seed: int | bytes | None = None):
    self.ids = _check_ids(client_ids)
    self.frac_bits = frac_bits
    self.clients = {c: SecAggClient(c, round, seed) for c in self.ids}
    self.server = SecAggServer(self.ids, threshold, frac_bits, round=round)
    for c in self.ids:
      self.server.add_public_key(c, self.clients[c].public_key)
    for c in self.ids:
      for peer, bundle in self.clients[c].shares_for(self.ids, threshold).items():
        self.clients[peer].hold(bundle)

  def mask(self, client_id: str, update: np.ndarray, weight: float) -> np.ndarray:
    """Client side: the masked vector of weight * update (SecAggError if not encodable)."""
    return self.clients[client_id].mask(update, weight, self.server.public_keys, self.frac_bits)

  def receive(self, client_id: str, vector: np.ndarray) -> None:
    """Server side: a masked vector that reached the server."""
    self.server.add_masked(client_id, vector)

  def unmask(self) -> tuple[np.ndarray, float]:
    """(sum of weighted updates, total weight) over the survivors; SecAggError below the
    threshold (nothing is revealed then)."""
    self.server.require_quorum()
    gone = set(self.server.dropped)
    revealed = {o: [self.clients[h].reveal(o, dropped=o in gone) for h in self.server.survivors]
                for o in self.ids}
    return self.server.aggregate(revealed)


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

  rnd = SecAggRound(ids, round, threshold, frac_bits, seed)
  for c in ids:
    y = rnd.mask(c, updates[c], weights[c])
    if c not in dropped:
      rnd.receive(c, y)
  weighted_sum, total_weight = rnd.unmask()
  if not total_weight > 0:
    raise SecAggError("total weight of the surviving clients is 0; cannot average")
  survivors = rnd.server.survivors
  max_abs = max((float(np.max(np.abs(np.asarray(updates[c], np.float64)), initial=0.0))
                 for c in survivors), default=0.0)
  return SecAggResult(
      mean=weighted_sum / total_weight, total_weight=total_weight, survivors=survivors,
      dropped=rnd.server.dropped,
      quantization_bound=quantization_bound(len(survivors), frac_bits, max_abs, total_weight),
      masked=rnd.server.masked)
