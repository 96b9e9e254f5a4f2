"""Simulated secure aggregation: exact unmasking, mask hiding, dropout recovery, Shamir."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from fedjax_lora.privacy.secagg import (SecAggClient, SecAggError, SecAggServer, dequantize, prg,
                                        quantize, reconstruct_secret, secure_weighted_mean,
                                        split_secret)
from fedjax_lora.privacy.secagg._shamir import _interpolate_at_zero

IDS = ("alice", "bob", "carol", "dave", "erin")
WEIGHTS = {"alice": 120.0, "bob": 37.0, "carol": 5.5, "dave": 300.0, "erin": 0.25}


def _updates(d: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {c: rng.normal(size=d) for c in IDS}


def _exact_mean(updates, weights, ids) -> np.ndarray:
  w = np.array([weights[c] for c in ids])
  return np.stack([updates[c] for c in ids]).T @ w / w.sum()


def test_masked_sum_matches_weighted_mean_within_bound():
  updates = _updates(1000)
  res = secure_weighted_mean(updates, WEIGHTS, round=3, seed=11)
  exact = _exact_mean(updates, WEIGHTS, IDS)
  assert res.survivors == IDS and res.dropped == ()
  assert res.quantization_bound < 1e-5
  assert np.max(np.abs(res.mean - exact)) <= res.quantization_bound
  assert res.total_weight == pytest.approx(sum(WEIGHTS.values()), abs=1e-6)
  # Without a seed (OS randomness) the result is the same up to rounding.
  fresh = secure_weighted_mean(updates, WEIGHTS, round=3)
  assert np.max(np.abs(fresh.mean - exact)) <= fresh.quantization_bound


def test_masked_vector_is_independent_of_update():
  d = 20000
  ramp = np.linspace(-1.0, 1.0, d)
  spike = np.zeros(d)
  spike[::2] = 1.0
  base = _updates(d)
  seen = {}
  for name, update in [("ramp", ramp), ("spike", spike)]:
    res = secure_weighted_mean({**base, "alice": update}, WEIGHTS, round=0, seed=5)
    seen[name] = res.masked["alice"][:-1].astype(np.float64) / 2.0**64  # in [0, 1)
    assert abs(np.corrcoef(seen[name], update)[0, 1]) < 0.05
    assert abs(seen[name].mean() - 0.5) < 0.01
    assert abs(seen[name].var() - 1 / 12) < 0.005
  hist = {k: np.histogram(v, bins=16, range=(0, 1))[0] / d for k, v in seen.items()}
  assert np.max(np.abs(hist["ramp"] - hist["spike"])) < 0.01
  assert np.max(np.abs(hist["ramp"] - 1 / 16)) < 0.01


def test_masks_are_fresh_each_round():
  updates = _updates(64)
  a = secure_weighted_mean(updates, WEIGHTS, round=1, seed=2).masked["bob"]
  b = secure_weighted_mean(updates, WEIGHTS, round=2, seed=2).masked["bob"]
  again = secure_weighted_mean(updates, WEIGHTS, round=1, seed=2).masked["bob"]
  assert np.array_equal(a, again)  # the seed makes a round reproducible
  assert np.mean(a == b) < 0.01


@pytest.mark.parametrize("dropped", [{"carol"}, {"alice", "dave"}])
def test_dropout_after_masking_is_recovered(dropped):
  updates = _updates(500, seed=1)
  res = secure_weighted_mean(updates, WEIGHTS, round=7, dropped=dropped, seed=3)
  survivors = tuple(c for c in IDS if c not in dropped)
  assert res.survivors == survivors and set(res.dropped) == dropped
  assert set(res.masked) == set(survivors)  # the server never saw the dropped vectors
  exact = _exact_mean(updates, WEIGHTS, survivors)
  assert np.max(np.abs(res.mean - exact)) <= res.quantization_bound
  assert res.total_weight == pytest.approx(sum(WEIGHTS[c] for c in survivors), abs=1e-6)


def test_too_few_survivors_raises():
  with pytest.raises(SecAggError, match="below the threshold 3"):
    secure_weighted_mean(_updates(8), WEIGHTS, round=0, dropped={"alice", "bob", "carol"})
  with pytest.raises(SecAggError, match="below the threshold 5"):
    secure_weighted_mean(_updates(8), WEIGHTS, round=0, dropped={"erin"}, threshold=5)


def test_bad_values_raise():
  updates = _updates(8)
  updates["bob"] = updates["bob"].copy()
  updates["bob"][3] = np.nan
  with pytest.raises(SecAggError, match=r"'bob'.*non-finite value nan at index 3"):
    secure_weighted_mean(updates, WEIGHTS, round=0)
  with pytest.raises(SecAggError, match="weight must be finite"):
    secure_weighted_mean(_updates(8), {**WEIGHTS, "erin": float("inf")}, round=0)
  big = {**_updates(8), "carol": np.full(8, 1e12)}
  with pytest.raises(SecAggError, match="outside the safe fixed-point range"):
    secure_weighted_mean(big, WEIGHTS, round=0)
  with pytest.raises(SecAggError, match="non-finite"):
    quantize(np.array([1.0, np.inf]))


def test_quantize_roundtrip_and_range():
  x = np.array([-3.25, 0.0, 1e-9, 2.0**-24, 1234.5])
  back = dequantize(quantize(x, 24), 24)
  assert np.max(np.abs(back - x)) <= 2.0**-25
  assert quantize(np.array([-1.0]), 0)[0] == np.uint64(2**64 - 1)  # two's complement
  limit = (2**63 - 1) // 5
  ok = np.array([float(limit - 2**10)])  # a float just inside the 5-client limit
  q = quantize(ok, 0, num_clients=5)
  assert int(q[0]) * 5 < 2**63
  with pytest.raises(SecAggError, match="safe fixed-point range"):
    quantize(np.array([float(limit) * 1.001]), 0, num_clients=5)


def test_shamir_threshold():
  secret = bytes(range(32))
  n, t = 5, 3
  shares = split_secret(secret, n, t, random.Random(0))
  for subset in itertools.combinations(shares, t):
    assert reconstruct_secret(list(subset), 32) == secret
  assert reconstruct_secret(shares, 32) == secret
  for subset in itertools.combinations(shares, t - 1):
    with pytest.raises(SecAggError, match="too few shares"):
      reconstruct_secret(list(subset), 32)
    # The field element t-1 shares interpolate to is not the secret.
    assert _interpolate_at_zero(list(subset)) != int.from_bytes(secret, "big")
  # A tampered share shifts the secret (here by the Lagrange weight 3 of x = 1).
  forged = [(shares[0][0], shares[0][1] + 1)] + shares[1:t]
  assert reconstruct_secret(forged, 32) != secret
  with pytest.raises(SecAggError, match="1 <= t <= n"):
    split_secret(secret, 3, 4)


def _run_round(updates, d, frac_bits=24):
  """Clients and server wired by hand, so tests can look at per-client state."""
  clients = {c: SecAggClient(c, 4, seed=9) for c in IDS}
  server = SecAggServer(IDS, 3, frac_bits, round=4)
  for c in IDS:
    server.add_public_key(c, clients[c].public_key)
  for c in IDS:
    for peer, bundle in clients[c].shares_for(IDS, 3).items():
      clients[peer].hold(bundle)
  masked = {c: clients[c].mask(updates[c], WEIGHTS[c], server.public_keys, frac_bits)
            for c in IDS}
  return clients, server, masked


def test_pairwise_masks_cancel_exactly():
  d = 300
  updates = _updates(d)
  clients, _, masked = _run_round(updates, d)
  total = np.zeros(d + 1, dtype=np.uint64)
  expected = np.zeros(d + 1, dtype=np.uint64)
  for c in IDS:
    total += masked[c] - prg(clients[c]._self_seed, d + 1)  # remove self masks only
    expected += quantize(np.append(WEIGHTS[c] * updates[c], WEIGHTS[c]), 24, num_clients=len(IDS))
  assert np.array_equal(total, expected)
  # Each pairwise-masked vector on its own is still far from its quantized input.
  lone = masked["alice"] - prg(clients["alice"]._self_seed, d + 1)
  assert np.mean(lone == quantize(np.append(WEIGHTS["alice"] * updates["alice"], 120.0), 24,
                                  num_clients=5)) < 0.01


def test_client_never_reveals_both_shares():
  clients, _, _ = _run_round(_updates(4), 4)
  bob = clients["bob"]
  bob.reveal("alice", dropped=False)
  bob.reveal("alice", dropped=False)  # repeating the same kind is harmless
  with pytest.raises(SecAggError, match="refuses to reveal both"):
    bob.reveal("alice", dropped=True)
  bob.reveal("carol", dropped=True)
  with pytest.raises(SecAggError, match="refuses to reveal both"):
    bob.reveal("carol", dropped=False)


def test_server_rejects_bad_input_and_short_shares():
  updates = _updates(6)
  clients, server, masked = _run_round(updates, 6)
  with pytest.raises(SecAggError, match="without a registered key"):
    SecAggServer(IDS, 3, round=4).add_masked("alice", masked["alice"])
  server.add_masked("alice", masked["alice"])
  with pytest.raises(SecAggError, match="already sent"):
    server.add_masked("alice", masked["alice"])
  with pytest.raises(SecAggError, match="has length 3"):
    server.add_masked("bob", masked["bob"][:3])
  for c in ("bob", "carol"):
    server.add_masked(c, masked[c])
  revealed = {o: [clients[h].reveal(o, o in server.dropped) for h in ("alice", "bob")]
              for o in IDS}
  with pytest.raises(SecAggError, match="need 3 shares"):
    server.aggregate(revealed)
