"""Secure aggregation as deployed messages: every step through JSON values and bytes, shares
sealed so the relaying coordinator cannot read them, dropout, restarts, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedjax_lora.deploy.secagg_wire import (NONCE_BYTES, ServerSecAgg, SiteSecAgg,
                                            _associated_data, _share_key, _unseal,
                                            bundle_from_bytes)
from fedjax_lora.privacy.secagg import (DEFAULT_FRAC_BITS, SecAggError, quantization_bound,
                                        secure_weighted_mean)

SITES = ("alice", "bob", "carol", "dave")
WEIGHTS = {"alice": 120.0, "bob": 37.0, "carol": 5.5, "dave": 300.0}
ROUND, THRESHOLD, SEED = 7, 3, 11


def _updates(d: int = 64) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {s: rng.normal(size=d) for s in SITES}


def _json(value):
  """What arrives after a trip through a JSON message."""
  return json.loads(json.dumps(value))


class _Round:
  """One round among SITES with a relay in between; restart=True sends every site through
  to_bytes/from_bytes before each of its steps, as a site that runs each message in a fresh
  process does."""

  def __init__(self, restart: bool = False, dealers=SITES):
    self.restart = restart
    self.sites = {s: SiteSecAgg(s, ROUND, SEED) for s in SITES}
    self.server = ServerSecAgg(SITES, THRESHOLD, DEFAULT_FRAC_BITS, round=ROUND)
    for s in SITES:
      self.server.add_keys(s, _json(self.site(s).advertise()))
    self.public = _json(self.server.public_keys())
    deals = {s: {r: bytes(c) for r, c in self.site(s).deal(self.public, THRESHOLD).items()}
             for s in dealers}
    self.routed = self.server.route(deals)

  def site(self, s: str) -> SiteSecAgg:
    if self.restart:
      self.sites[s] = SiteSecAgg.from_bytes(self.sites[s].to_bytes())
    return self.sites[s]

  def finish(self, updates, masked) -> tuple[np.ndarray, float]:
    """Receive, mask (only `masked` sites' vectors reach the server), reveal, aggregate."""
    for s in self.routed:
      self.site(s).receive(self.routed[s])
    for s in masked:
      y = self.site(s).mask(updates[s], WEIGHTS[s], DEFAULT_FRAC_BITS)
      self.server.add_masked(s, np.frombuffer(y.tobytes(), dtype=np.uint64))
    request = _json(self.server.reveal_request())
    revealed = {s: _json(self.site(s).reveal(**request)) for s in request["survivors"]}
    return self.server.aggregate(revealed)


def _open_with(secret: bytes, blob: bytes, owner: str, holder: str) -> bytes:
  key = _share_key(secret, ROUND, owner, holder)
  return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                             _associated_data(ROUND, owner, holder))


def test_a_site_that_drops_after_dealing_leaves_the_weighted_sum_of_the_survivors():
  updates, survivors = _updates(), ("alice", "bob", "carol")
  total, weight = _Round().finish(updates, masked=survivors)
  w = np.array([WEIGHTS[s] for s in survivors])
  exact = np.stack([updates[s] for s in survivors]).T @ w
  max_abs = max(float(np.max(np.abs(updates[s]))) for s in survivors)
  bound = quantization_bound(len(survivors), DEFAULT_FRAC_BITS, max_abs, weight)
  assert abs(weight - w.sum()) <= len(survivors) * 2.0 ** -(DEFAULT_FRAC_BITS + 1)
  assert np.max(np.abs(total / weight - exact / w.sum())) <= bound
  in_process = secure_weighted_mean(updates, WEIGHTS, round=ROUND, dropped={"dave"},
                                    threshold=THRESHOLD, seed=SEED)
  assert in_process.survivors == survivors and in_process.dropped == ("dave",)
  assert np.max(np.abs(total / weight - in_process.mean)) <= in_process.quantization_bound


def test_a_site_that_never_deals_is_left_out_of_the_mask_set():
  updates = _updates()
  rnd = _Round(dealers=("alice", "bob", "carol"))
  assert set(rnd.routed) == {"alice", "bob", "carol"} and rnd.server.dealers == tuple(rnd.routed)
  total, weight = rnd.finish(updates, masked=("alice", "bob", "carol"))
  assert rnd.server.reveal_request() == {"survivors": ["alice", "bob", "carol"], "dropped": []}
  exact = sum(WEIGHTS[s] * updates[s] for s in ("alice", "bob", "carol"))
  assert np.max(np.abs(total - exact)) < 1e-4


def test_the_relay_cannot_read_a_share_it_routes():
  rnd = _Round()
  blob = rnd.routed["bob"]["alice"]
  enc = {s: bytes.fromhex(rnd.public[s]["enc_key"]) for s in SITES}
  mask = {s: bytes.fromhex(rnd.public[s]["mask_key"]) for s in SITES}
  # The holder's key opens it (so the tries below fail for want of a key, not of a format).
  plain = _unseal(rnd.sites["bob"]._enc, enc["alice"], ROUND, "alice", "bob", blob)
  assert bundle_from_bytes(plain)[1].owner == "alice"
  assert b"alice" not in blob and b"share" not in blob
  fresh = X25519PrivateKey.generate()
  guesses = [fresh.exchange(X25519PublicKey.from_public_bytes(enc[s])) for s in SITES]
  guesses += [fresh.exchange(X25519PublicKey.from_public_bytes(mask[s])) for s in SITES]
  guesses += list(enc.values()) + list(mask.values()) + [enc["alice"] + enc["bob"], bytes(32)]
  for secret in guesses:
    with pytest.raises(InvalidTag):
      _open_with(secret, blob, "alice", "bob")


@pytest.mark.parametrize("where", [0, NONCE_BYTES + 3, -1])  # nonce, ciphertext, tag
def test_a_share_with_one_flipped_byte_is_refused_naming_its_owner(where):
  rnd = _Round()
  bad = bytearray(rnd.routed["bob"]["alice"])
  bad[where] ^= 0x01
  with pytest.raises(SecAggError, match="share from 'alice' to 'bob'"):
    rnd.sites["bob"].receive({**rnd.routed["bob"], "alice": bytes(bad)})
  rnd.sites["bob"].receive(rnd.routed["bob"])  # all or nothing: the intact delivery still fits


def test_a_share_delivered_to_the_wrong_site_is_refused_naming_its_owner():
  rnd = _Round()
  with pytest.raises(SecAggError, match="share from 'alice' to 'carol'"):
    rnd.sites["carol"].receive({**rnd.routed["carol"], "alice": rnd.routed["bob"]["alice"]})


def test_a_site_restarted_between_every_step_gives_the_same_aggregate():
  updates, survivors = _updates(), ("alice", "bob", "carol")
  total, weight = _Round().finish(updates, masked=survivors)
  total_r, weight_r = _Round(restart=True).finish(updates, masked=survivors)
  assert np.array_equal(total, total_r) and weight == weight_r


def test_an_altered_saved_site_state_is_refused():
  state = SiteSecAgg("alice", ROUND, SEED).to_bytes()
  with pytest.raises(SecAggError, match="site state is malformed"):
    SiteSecAgg.from_bytes(state[:-5])
  other = json.loads(state)
  other["format"] = "something else"
  with pytest.raises(SecAggError, match="format 'something else'"):
    SiteSecAgg.from_bytes(json.dumps(other).encode())


def test_a_site_never_reveals_both_kinds_of_share_for_one_owner():
  rnd = _Round()
  for s in SITES:
    rnd.sites[s].receive(rnd.routed[s])
  alice = rnd.sites["alice"]
  alice.mask(_updates()["alice"], WEIGHTS["alice"], DEFAULT_FRAC_BITS)
  first = alice.reveal(["alice", "bob", "carol"], ["dave"])
  assert alice.reveal(["alice", "bob", "carol"], ["dave"]) == first  # the same ask is harmless
  with pytest.raises(SecAggError, match="refuses to reveal both"):
    alice.reveal(["alice", "bob", "carol", "dave"], [])
  with pytest.raises(SecAggError, match="refuses to reveal both kinds of share of \\['dave'\\]"):
    alice.reveal(["alice", "bob", "carol", "dave"], ["dave"])
  restarted = SiteSecAgg.from_bytes(alice.to_bytes())
  with pytest.raises(SecAggError, match="refuses to reveal both"):
    restarted.reveal(["alice", "bob", "carol", "dave"], [])


def test_nothing_is_revealed_below_the_threshold():
  rnd = _Round()
  updates = _updates()
  for s in SITES:
    rnd.sites[s].receive(rnd.routed[s])
  for s in ("alice", "bob"):
    rnd.server.add_masked(s, rnd.sites[s].mask(updates[s], WEIGHTS[s], DEFAULT_FRAC_BITS))
  with pytest.raises(SecAggError, match="below the threshold 3"):
    rnd.server.reveal_request()
  with pytest.raises(SecAggError, match="below the threshold 3; nothing may be revealed"):
    rnd.sites["alice"].reveal(["alice", "bob"], ["carol", "dave"])
  with pytest.raises(SecAggError, match="before the reveal request"):
    rnd.server.aggregate({})


def test_a_site_refuses_a_minority_threshold_and_a_second_mask():
  fresh = {s: SiteSecAgg(s, ROUND, SEED) for s in SITES}
  public = {s: site.advertise() for s, site in fresh.items()}
  with pytest.raises(SecAggError, match=r"threshold=2 for 4 sites: must be an integer in \[3, 4\]"):
    fresh["alice"].deal(public, 2)
  rnd = _Round()
  with pytest.raises(SecAggError, match="already dealt"):
    rnd.sites["alice"].deal(rnd.public, THRESHOLD)
  alice = rnd.sites["alice"]
  alice.receive(rnd.routed["alice"])
  alice.mask(_updates()["alice"], 1.0, DEFAULT_FRAC_BITS)
  with pytest.raises(SecAggError, match="already masked"):
    alice.mask(_updates()["bob"], 1.0, DEFAULT_FRAC_BITS)
