"""Secure aggregation between processes: the protocol of `fedjax_lora.privacy.secagg` as messages.

Why: in-process, `SecAggRound` hands each Shamir share bundle from one client to another and
treats that as a private channel. Deployed, every site is its own process and the coordinator
is the only channel, so a bundle travels sealed for its recipient: AES-256-GCM under
HKDF-SHA256(X25519(sender, recipient)) of a second key pair that is used for nothing else,
with (round, owner, holder) bound as associated data. The coordinator routes ciphertexts it
cannot open, so it never holds t shares of both secrets of one site; it only learns what the
server of the in-process protocol learns (public keys, masked vectors, revealed shares of one
kind per site).

One round, step by step (each step's input and output is JSON values, ciphertext bytes, or
the masked uint64 vector):
  1. site `advertise()` -> coordinator `add_keys(site, advertised)`.
  2. coordinator `public_keys()` -> every site; site `deal(public, threshold)` -> coordinator.
  3. coordinator `route(deals)`; site s gets `routed[s]` -> site `receive(routed[s])`.
  4. site `mask(vector, weight, frac_bits)` -> coordinator `add_masked(site, y)`.
  5. coordinator `reveal_request()` -> every survivor; site `reveal(**request)` -> coordinator.
  6. coordinator `aggregate({holder: revealed})` -> (sum of weight * update, total weight).

The mask set is the sites that dealt (Bonawitz et al.'s U2): one that advertised and vanished
before dealing is left out of everyone's masks, as it must be, since nobody holds its key.
The model is the protocol's semi-honest one: the coordinator relays honestly; a site refuses
what would unmask one update regardless (both kinds of share for one owner, a second masked
vector, a threshold below a majority, a reveal for fewer survivors than the threshold).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedjax_lora.privacy.secagg import (DEFAULT_FRAC_BITS, MIN_SURVIVORS, SecAggClient,
                                        SecAggError, SecAggServer, Share, ShareBundle)
from fedjax_lora.privacy.secagg._fixed_point import _check_frac_bits
from fedjax_lora.privacy.secagg._prg import _kdf
from fedjax_lora.privacy.secagg._protocol import (_check_ids, _check_round, _hex_bytes,
                                                  _share_from_json, _share_json)

KEY_BYTES = 32     # raw X25519 keys
NONCE_BYTES = 12   # AES-GCM nonce, fresh per ciphertext and sent in front of it
_STATE_FORMAT = "fedjax-lora/secagg-site-state/v1"


# ----------------------------------------------------------------------------- encodings

def share_to_json(share: Share) -> list:
  """A Shamir share as [x, fixed-width hex y]: JSON-able and exact (y has 521 bits)."""
  return _share_json(share)


def share_from_json(value, what: str = "share") -> Share:
  """The share `share_to_json` wrote; SecAggError names `what` if it is not one."""
  try:
    return _share_from_json(value)
  except (TypeError, ValueError):  # SecAggError too; the text could quote a secret
    raise SecAggError(f"{what} is not a Shamir share [x, hex y]") from None


def bundle_to_bytes(bundle: ShareBundle, round: int) -> bytes:
  """The plaintext a dealer seals for the holder: compact JSON, the round written in it."""
  return json.dumps({"round": round, "owner": bundle.owner, "holder": bundle.holder,
                     "key_share": share_to_json(bundle.key_share),
                     "seed_share": share_to_json(bundle.seed_share)},
                    sort_keys=True, separators=(",", ":")).encode()


def bundle_from_bytes(data: bytes) -> tuple[int, ShareBundle]:
  """(round, bundle) from `bundle_to_bytes`; SecAggError if malformed."""
  try:
    d = json.loads(bytes(data).decode())
    round, owner, holder = _check_round(d["round"]), d["owner"], d["holder"]
    _check_ids([owner, holder] if owner != holder else [owner], "bundle owner and holder")
    key_share, seed_share = d["key_share"], d["seed_share"]
  except (KeyError, TypeError, ValueError):  # SecAggError and UnicodeDecodeError too
    raise SecAggError("share bundle is not the JSON bundle_to_bytes writes") from None
  return round, ShareBundle(owner, holder, share_from_json(key_share, f"key share of {owner!r}"),
                            share_from_json(seed_share, f"seed share of {owner!r}"))


def _key_hex(value, what: str) -> bytes:
  try:
    return _hex_bytes(value, KEY_BYTES)
  except (TypeError, ValueError):  # SecAggError too
    raise SecAggError(f"{what} must be {2 * KEY_BYTES} hex digits") from None


def _parse_keys(entry, site: str) -> tuple[bytes, bytes]:
  """(mask key, encryption key) from one site's {"mask_key": hex, "enc_key": hex}."""
  if not isinstance(entry, Mapping) or set(entry) != {"mask_key", "enc_key"}:
    raise SecAggError(f"public keys of {site!r} must be exactly {{'mask_key', 'enc_key'}}")
  return (_key_hex(entry["mask_key"], f"mask_key of {site!r}"),
          _key_hex(entry["enc_key"], f"enc_key of {site!r}"))


def _parse_public(public) -> dict[str, tuple[bytes, bytes]]:
  if not isinstance(public, Mapping):
    raise SecAggError(f"public keys must be a {{site: keys}} mapping, got {type(public).__name__}")
  return {s: _parse_keys(public[s], s) for s in _check_ids(public, "public keys")}


def _keys_json(mask_key: bytes, enc_key: bytes) -> dict[str, str]:
  return {"mask_key": mask_key.hex(), "enc_key": enc_key.hex()}


def _check_threshold(threshold, n: int) -> int:
  """A majority, so that two disjoint groups of sites can never each reach it (one could rebuild
  a site's key, the other its self-mask seed), and at least the protocol's minimum."""
  low = max(MIN_SURVIVORS, n // 2 + 1)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) \
      or not low <= threshold <= n:
    raise SecAggError(f"threshold={threshold!r} for {n} sites: must be an integer in [{low}, {n}] "
                      f"(a majority, at least {MIN_SURVIVORS})")
  return int(threshold)


# ----------------------------------------------------------------------------- share sealing

def _share_key(shared: bytes, round: int, owner: str, holder: str) -> bytes:
  """One AES key per (round, owner, holder): a direction and a round never share a key."""
  return _kdf(shared, "share-encryption", round, owner, holder)


def _associated_data(round: int, owner: str, holder: str) -> bytes:
  return json.dumps(["fedjax-lora/secagg/share-bundle/v1", round, owner, holder]).encode()


def _exchange(private: X25519PrivateKey, peer_public: bytes, peer: str) -> bytes:
  try:
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
  except ValueError:  # a low-order point gives the all-zero secret, which X25519 refuses
    raise SecAggError(f"enc_key of {peer!r} is not a usable X25519 public key") from None


def _seal(private: X25519PrivateKey, peer_public: bytes, round: int, owner: str, holder: str,
          plaintext: bytes) -> bytes:
  key = _share_key(_exchange(private, peer_public, holder), round, owner, holder)
  nonce = os.urandom(NONCE_BYTES)
  return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated_data(round, owner, holder))


def _unseal(private: X25519PrivateKey, peer_public: bytes, round: int, owner: str, holder: str,
            blob: bytes) -> bytes:
  """The plaintext; SecAggError naming the owner if the ciphertext was altered, sealed for
  another holder or round, or is not bytes."""
  key = _share_key(_exchange(private, peer_public, owner), round, owner, holder)
  try:
    blob = bytes(blob)
    return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                               _associated_data(round, owner, holder))
  except (InvalidTag, TypeError, ValueError):
    raise SecAggError(f"the share from {owner!r} to {holder!r} in round {round} does not "
                      "decrypt: altered, or sealed for another site or round") from None


# ----------------------------------------------------------------------------- site side

class SiteSecAgg:
  """One site's side of one round, step by step (see the module docstring for the order).

  seed: None draws every secret from the OS; an int or bytes derives them from
  (seed, round, site), for reproducible tests only.
  """

  def __init__(self, site: str, round: int, seed: int | bytes | None = None):
    self.client = SecAggClient(site, round, seed)
    if seed is None:
      self._enc = X25519PrivateKey.generate()
    else:  # the same root as SecAggClient's, under a label of its own
      root = seed if isinstance(seed, bytes) else f"int:{int(seed)}".encode()
      self._enc = X25519PrivateKey.from_private_bytes(
          _kdf(root, "share-encryption-key", self.client.round, self.client.client_id))
    self._public: dict[str, tuple[bytes, bytes]] | None = None  # set by deal
    self._threshold = 0
    self._mask_set: tuple[str, ...] | None = None  # the dealers whose shares arrived
    self._masked = False

  @property
  def site(self) -> str:
    return self.client.client_id

  @property
  def round(self) -> int:
    return self.client.round

  def _own_keys(self) -> tuple[bytes, bytes]:
    return self.client.public_key, self._enc.public_key().public_bytes_raw()

  def advertise(self) -> dict[str, str]:
    """Step 1: this site's two public keys, {"mask_key": hex, "enc_key": hex}."""
    return _keys_json(*self._own_keys())

  def deal(self, public: Mapping[str, Mapping[str, str]], threshold: int) -> dict[str, bytes]:
    """Step 2: {recipient: sealed share bundle} for every site in `public` (itself too)."""
    if self._public is not None:
      raise SecAggError(f"site {self.site!r} already dealt its shares in round {self.round}")
    keys = _parse_public(public)
    if keys.get(self.site) != self._own_keys():
      raise SecAggError(f"the broadcast public keys of {self.site!r} are missing or not this "
                        "site's own")
    threshold = _check_threshold(threshold, len(keys))
    bundles = self.client.shares_for(sorted(keys), threshold)
    self._public, self._threshold = keys, threshold
    return {r: _seal(self._enc, keys[r][1], self.round, self.site, r,
                     bundle_to_bytes(bundles[r], self.round)) for r in sorted(keys)}

  def receive(self, shares: Mapping[str, bytes]) -> None:
    """Step 3: keeps the bundles the dealers sealed for this site; they fix the mask set.

    All or nothing: a bundle that does not decrypt or does not fit refuses the whole delivery.
    """
    if self._public is None:
      raise SecAggError(f"site {self.site!r} must deal before it receives shares")
    if self._mask_set is not None:
      raise SecAggError(f"site {self.site!r} already received its shares in round {self.round}")
    unknown = sorted(set(shares) - set(self._public))
    if unknown:
      raise SecAggError(f"shares from {unknown}, which are not in the broadcast key set")
    if self.site not in shares:
      raise SecAggError(f"the routed shares lack {self.site!r}'s own, which it dealt")
    if len(shares) < self._threshold:
      raise SecAggError(f"only {len(shares)} sites dealt shares, below the threshold "
                        f"{self._threshold}")
    x = sorted(self._public).index(self.site) + 1  # the Shamir point dealt to this site
    bundles = []
    for owner in sorted(shares):
      plain = _unseal(self._enc, self._public[owner][1], self.round, owner, self.site,
                      shares[owner])
      round, bundle = bundle_from_bytes(plain)
      if (round, bundle.owner, bundle.holder) != (self.round, owner, self.site) \
          or bundle.key_share[0] != x or bundle.seed_share[0] != x:
        raise SecAggError(f"the bundle from {owner!r} is not its round {self.round} share for "
                          f"{self.site!r}")
      bundles.append(bundle)
    for bundle in bundles:
      self.client.hold(bundle)
    self._mask_set = tuple(sorted(shares))

  def mask(self, vector: np.ndarray, weight: float, frac_bits: int) -> np.ndarray:
    """Step 4: the masked fixed-point [weight * vector, weight] (uint64), once per round."""
    if self._mask_set is None:
      raise SecAggError(f"site {self.site!r} must receive its shares before masking")
    if self._masked:  # two vectors under the same masks would give away their difference
      raise SecAggError(f"site {self.site!r} already masked its update in round {self.round}")
    y = self.client.mask(vector, weight, {s: self._public[s][0] for s in self._mask_set},
                         frac_bits)
    self._masked = True
    return y

  def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, list]:
    """Step 5: {owner: share} as the coordinator asks: of b_u for survivors, of the key for
    dropped sites; never both kinds for one owner, also across calls."""
    if not self._masked:
      raise SecAggError(f"site {self.site!r} has not masked; it cannot be a survivor")
    survivors = _check_ids(survivors, "survivors")
    dropped = _check_ids(dropped, "dropped") if len(dropped) else ()
    both = sorted(set(survivors) & set(dropped))
    if both:
      raise SecAggError(f"{self.site!r} refuses to reveal both kinds of share of {both}: "
                        "they are listed as survivors and as dropped")
    if set(survivors) | set(dropped) != set(self._mask_set):
      raise SecAggError(f"survivors and dropped must split the mask set {list(self._mask_set)}, "
                        f"got {list(survivors)} and {list(dropped)}")
    if self.site not in survivors:
      raise SecAggError(f"site {self.site!r} is asked to reveal but is not listed as a survivor")
    if len(survivors) < self._threshold:
      raise SecAggError(f"only {len(survivors)} survivors, below the threshold "
                        f"{self._threshold}; nothing may be revealed")
    gone = set(dropped)
    return {o: share_to_json(self.client.reveal(o, dropped=o in gone)) for o in self._mask_set}

  def to_bytes(self) -> bytes:
    """This site's whole round state, every secret included, for a site that runs each step
    in a fresh process. It unmasks this site's update: write it only inside the site's own
    directory, never into a message."""
    return json.dumps({
        "format": _STATE_FORMAT, "client": self.client.export_state(),
        "enc_private": self._enc.private_bytes_raw().hex(),
        "public": None if self._public is None
                  else {s: _keys_json(*k) for s, k in self._public.items()},
        "threshold": self._threshold,
        "mask_set": None if self._mask_set is None else list(self._mask_set),
        "masked": self._masked,
    }, sort_keys=True).encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> SiteSecAgg:
    """The site `to_bytes` saved; SecAggError if the state is malformed or inconsistent."""
    try:
      state = json.loads(bytes(data).decode())
      if state["format"] != _STATE_FORMAT:
        raise SecAggError(f"format {state['format']!r}, expected {_STATE_FORMAT!r}")
      site = cls.__new__(cls)
      site.client = SecAggClient.from_state(state["client"])
      site._enc = X25519PrivateKey.from_private_bytes(
          _key_hex(state["enc_private"], "enc_private"))
      public, mask_set = state["public"], state["mask_set"]
      site._public = None if public is None else _parse_public(public)
      site._threshold = 0 if public is None else _check_threshold(state["threshold"],
                                                                  len(site._public))
      site._mask_set = None if mask_set is None else _check_ids(mask_set, "mask_set")
      site._masked = state["masked"]
      if site._public is not None and site._public.get(site.site) != site._own_keys():
        raise SecAggError(f"the saved public keys of {site.site!r} are not its own")
      if (site._public is None and site._mask_set is not None) or \
          (site._mask_set is not None and not set(site._mask_set) <= set(site._public)) or \
          not isinstance(site._masked, bool) or (site._masked and site._mask_set is None):
        raise SecAggError("its steps are out of order (keys, shares and mask do not fit)")
    except SecAggError as e:
      raise SecAggError(f"saved secure-aggregation site state: {e}") from None
    except KeyError as e:
      raise SecAggError(f"saved secure-aggregation site state lacks field {e}") from None
    except (TypeError, ValueError) as e:  # JSON and key errors; their text could quote a secret
      raise SecAggError(f"saved secure-aggregation site state is malformed "
                        f"({type(e).__name__})") from None
    return site


# ----------------------------------------------------------------------------- server side

class ServerSecAgg:
  """The coordinator's side of one round: it relays and unmasks the sum, and never holds a
  key that opens a share."""

  def __init__(self, sites: Iterable[str], threshold: int, frac_bits: int = DEFAULT_FRAC_BITS,
               *, round: int):
    self.sites = _check_ids(sites, "sites")
    self.threshold = _check_threshold(threshold, len(self.sites))
    self.frac_bits = _check_frac_bits(frac_bits)
    self.round = _check_round(round)
    self._advertised: dict[str, tuple[bytes, bytes]] = {}
    self._broadcast: dict[str, tuple[bytes, bytes]] | None = None  # fixed by public_keys()
    # Made by route(): its clients are the dealers, the only sites whose masks can be removed.
    self._server: SecAggServer | None = None
    self._request: dict[str, list[str]] | None = None  # fixed by reveal_request()

  def add_keys(self, site: str, advertised: Mapping[str, str]) -> None:
    """Step 1: a site's advertised public keys."""
    if site not in self.sites:
      raise SecAggError(f"unknown site {site!r} in round {self.round}")
    if self._broadcast is not None:
      raise SecAggError(f"keys of {site!r} arrived after the key set was broadcast")
    if site in self._advertised:
      raise SecAggError(f"site {site!r} already advertised its keys in round {self.round}")
    self._advertised[site] = _parse_keys(advertised, site)

  def public_keys(self) -> dict[str, dict[str, str]]:
    """Step 2: the key set every site deals to; fixed from the first call on."""
    if self._broadcast is None:
      if len(self._advertised) < self.threshold:
        raise SecAggError(f"only {len(self._advertised)} sites advertised keys, below the "
                          f"threshold {self.threshold}")
      self._broadcast = dict(sorted(self._advertised.items()))
    return {s: _keys_json(*k) for s, k in self._broadcast.items()}

  @property
  def dealers(self) -> tuple[str, ...]:
    """The mask set: the sites whose shares were routed."""
    return () if self._server is None else self._server.client_ids

  def route(self, deals: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """Step 3: {recipient: {sender: ciphertext}} for every dealer; a relay, it opens nothing."""
    if self._broadcast is None:
      raise SecAggError("route before the public keys were broadcast")
    if self._server is not None:
      raise SecAggError(f"shares of round {self.round} were already routed")
    for sender, deal in deals.items():
      if sender not in self._broadcast:
        raise SecAggError(f"shares from {sender!r}, which is not in the broadcast key set")
      if not isinstance(deal, Mapping) or set(deal) != set(self._broadcast):
        raise SecAggError(f"the deal of {sender!r} must address every site of the key set")
      if not all(isinstance(c, bytes) for c in deal.values()):
        raise SecAggError(f"the deal of {sender!r} holds a ciphertext that is not bytes")
    if len(deals) < self.threshold:
      raise SecAggError(f"only {len(deals)} sites dealt shares, below the threshold "
                        f"{self.threshold}")
    self._server = SecAggServer(deals, self.threshold, self.frac_bits, round=self.round)
    for s in self._server.client_ids:
      self._server.add_public_key(s, self._broadcast[s][0])
    dealers = self._server.client_ids
    return {r: {s: deals[s][r] for s in dealers} for r in dealers}

  def add_masked(self, site: str, vector: np.ndarray) -> None:
    """Step 4: a site's masked vector."""
    if self._server is None or site not in self._server.client_ids:
      raise SecAggError(f"site {site!r} dealt no shares in round {self.round}; its masked "
                        "vector could not be unmasked")
    if self._request is not None:
      raise SecAggError(f"masked vector of {site!r} arrived after the reveal request")
    self._server.add_masked(site, vector)

  def reveal_request(self) -> dict[str, list[str]]:
    """Step 5: what every survivor is asked; SecAggError below the threshold."""
    if self._server is None:
      raise SecAggError("reveal request before any shares were routed")
    if self._request is None:
      self._server.require_quorum()  # below the threshold nothing may be revealed
      self._request = {"survivors": list(self._server.survivors),
                       "dropped": list(self._server.dropped)}
    return {k: list(v) for k, v in self._request.items()}

  def aggregate(self, revealed: Mapping[str, Mapping[str, list]]) -> tuple[np.ndarray, float]:
    """Step 6: (sum of weight * update, total weight) over survivors, from
    {holder: {owner: share}} of the survivors that answered."""
    if self._request is None:
      raise SecAggError("aggregate before the reveal request")
    survivors, points = set(self._request["survivors"]), sorted(self._broadcast)
    by_owner: dict[str, list[Share]] = {}
    for holder, shares in sorted(revealed.items()):
      if holder not in survivors:
        raise SecAggError(f"shares revealed by {holder!r}, which is not a survivor")
      if not isinstance(shares, Mapping):
        raise SecAggError(f"the shares revealed by {holder!r} must be an {{owner: share}} map")
      for owner, value in sorted(shares.items()):
        if owner not in self._server.client_ids:
          raise SecAggError(f"{holder!r} revealed a share of {owner!r}, which dealt none")
        share = share_from_json(value, f"the share of {owner!r} revealed by {holder!r}")
        if share[0] != points.index(holder) + 1:  # each holder was dealt its own point
          raise SecAggError(f"the share of {owner!r} revealed by {holder!r} is not the point "
                            f"dealt to {holder!r}")
        by_owner.setdefault(owner, []).append(share)
    return self._server.aggregate(by_owner)
