"""Differential privacy: DP-SGD in the client, RDP accounting, client-level DP-FedAvg."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora.algorithms import get_aggregator
from fedjax_lora.client import ClientConfig, _row_losses, client_update
from fedjax_lora.privacy.dp_sgd import clip_per_example, dp_gradient
from models.lora import LoraAdapter
from tests.test_client import tiny  # noqa: F401  (the shared tiny model and ragged batch)


def tree_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


def clip_between(norms, clipped=1):
  """A clip halfway between two adjacent norms, so that exactly the `clipped` largest exceed it.

  A clip equal to one of the norms (a median, say) would leave "is that row clipped" to the
  last ulp of two different computations of its norm; halfway across a checked gap leaves a
  margin of several percent on both sides.
  """
  ordered = np.sort(np.asarray(norms, np.float64))[::-1]
  hi, lo = ordered[clipped - 1], ordered[clipped]
  assert hi > 1.1 * lo, (norms, clipped)  # a clear gap, so the midpoint is far from both
  return float((lo + hi) / 2)


def per_example_grads(graphdef, base, spec, params, batch):
  def loss(p, row):
    mean, count = _row_losses(graphdef, base, [LoraAdapter(p, spec)],
                              jax.tree.map(lambda x: x[None], row))
    return mean[0], count[0]
  return jax.jit(jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0)))(params, batch)


# --- DP-SGD in the client ---------------------------------------------------------------

def test_per_example_clipping_bound_and_padding_rows(tiny):
  graphdef, base, spec, params, batch = tiny
  batch = {k: np.asarray(v).copy() for k, v in batch.items()}
  batch["loss_mask"][3] = 0.0  # a padding row: no supervised token
  grads, _ = per_example_grads(graphdef, base, spec, params, batch)
  norms = np.array([tree_norm(jax.tree.map(lambda g: g[i], grads)) for i in range(4)])
  assert norms[3] == 0.0 and np.all(norms[:3] > 0)  # padding contributes nothing
  clip = clip_between(norms[:3], clipped=2)            # some rows clipped, some not
  clipped, got_norms = clip_per_example(grads, clip)
  np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
  for i in range(4):
    g = jax.tree.map(lambda x: np.asarray(x[i]), grads)
    c = jax.tree.map(lambda x: np.asarray(x[i]), clipped)
    assert tree_norm(c) <= clip + 1e-6
    want = g if norms[i] <= clip else jax.tree.map(lambda x: x * clip / norms[i], g)
    for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)
  # inf means no clipping at all.
  unclipped, _ = clip_per_example(grads, math.inf)
  for x, y in zip(jax.tree.leaves(unclipped), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(x, y)


def test_dp_gradient_is_the_mean_of_clipped_masked_grads_over_the_fixed_batch(tiny):
  graphdef, base, spec, params, batch = tiny
  batch = {k: np.asarray(v).copy() for k, v in batch.items()}
  batch["loss_mask"][2] = 0.0  # padding: still divides by the fixed A·B = 4, not by 3 rows
  grads, _ = per_example_grads(graphdef, base, spec, params, batch)
  masks = {t: {"a": jnp.float32(0.0), "b": jnp.float32(1.0)} for t in params}  # ffa: B only
  masked = jax.tree.map(lambda g, m: g * m, grads, masks)
  b_norms = np.array([tree_norm(jax.tree.map(lambda g: g[i], masked)) for i in range(4)])
  clip = clip_between(b_norms[[0, 1, 3]])  # the real rows' largest norm alone is clipped
  cfg = ClientConfig(dp_clip=clip, loss_weighting="examples")

  def row_loss(p, row):
    mean, count = _row_losses(graphdef, base, [LoraAdapter(p, spec)],
                              jax.tree.map(lambda x: x[None], row))
    return mean[0], count[0]

  split = jax.tree.map(lambda x: x.reshape((2, 2) + x.shape[1:]), batch)  # A=2, B=2
  got, (_, tokens, real, clipped) = jax.jit(
      lambda p, b: dp_gradient(row_loss, p, b, masks, cfg, jax.random.key(0)))(params, split)
  # Only the trained factor counts in the norm: A is frozen and contributes nothing.
  scale = np.minimum(1.0, clip / np.maximum(b_norms, 1e-30))
  for t in params:
    np.testing.assert_array_equal(got[t]["a"], 0.0)
    want = np.tensordot(scale, np.asarray(grads[t]["b"]), axes=1) / 4
    np.testing.assert_allclose(got[t]["b"], want, rtol=1e-5, atol=1e-9)
  assert float(real) == 3 and float(clipped) == np.sum(b_norms > clip) == 1
  assert float(tokens) == float(np.sum(batch["loss_mask"][:, 1:]))


def test_dp_noise_std_is_sigma_clip_over_batch_size():
  params = {"t": {"a": jnp.zeros((60, 50)), "b": jnp.zeros((50, 120))}}
  masks = {"t": {"a": jnp.float32(0.0), "b": jnp.float32(1.0)}}
  batch = {"loss_mask": jnp.ones((3, 4, 5))}  # A=3, B=4

  def no_signal(p, row):  # zero gradient: the output is pure noise
    return 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(p)), jnp.sum(row["loss_mask"])

  sigma, clip = 1.7, 0.3
  cfg = ClientConfig(dp_clip=clip, dp_noise_multiplier=sigma, loss_weighting="examples")
  fn = jax.jit(lambda key: dp_gradient(no_signal, params, batch, masks, cfg, key)[0])
  g1, g2 = fn(jax.random.key(1)), fn(jax.random.key(2))
  np.testing.assert_array_equal(g1["t"]["a"], 0.0)  # frozen factor: no noise
  b = np.asarray(g1["t"]["b"])
  np.testing.assert_allclose(b.std(), sigma * clip / 12, rtol=0.03)
  assert abs(b.mean()) < 3 * sigma * clip / 12 / math.sqrt(b.size)
  assert not np.allclose(b, g2["t"]["b"])


def test_dp_without_noise_or_clip_equals_example_weighted_training(tiny):
  graphdef, base, spec, params, batch = tiny
  steps = jax.tree.map(lambda x: np.stack([x.reshape((2, 2) + x.shape[1:])] * 2), batch)
  def run(**kw):  # S=2 steps of A=2 micro-batches of B=2 real rows
    cfg = ClientConfig(learning_rate=1e-2, schedule="constant", **kw)
    return client_update(graphdef, base, {"global": params}, {"global": spec}, steps,
                         jnp.ones((2,), bool), jax.random.key(0), cfg)
  plain, _, m_plain = run(loss_weighting="examples")
  dp, _, m_dp = run(loss_weighting="examples", dp_clip=math.inf)
  tokens, _, _ = run()
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(dp)):
    np.testing.assert_allclose(x, y, atol=1e-5)
  # The ragged row makes the two weightings differ, so the check above has teeth.
  assert max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(tokens))) > 1e-5
  assert "dp_clipped_fraction" not in m_plain and float(m_dp["dp_clipped_fraction"]) == 0.0
  np.testing.assert_allclose(m_dp["train_loss"], m_plain["train_loss"], rtol=1e-6)
  assert set(m_dp) == set(m_plain) | {"dp_clipped_fraction"}


def test_dp_client_update_freezes_a_counts_real_rows_and_uses_the_rng(tiny):
  graphdef, base, spec, params, batch = tiny
  batch = {k: np.asarray(v).copy() for k, v in batch.items()}
  batch["loss_mask"][3] = 0.0  # padding row: not an example, not counted as clipped
  steps = jax.tree.map(lambda x: x[None, None], batch)
  cfg = ClientConfig(learning_rate=1e-2, schedule="constant", train_factors=("b",),
                     loss_weighting="examples", dp_clip=1e-6, dp_noise_multiplier=1.0)
  run = jax.jit(lambda key: client_update(graphdef, base, {"global": params}, {"global": spec},
                                          steps, jnp.ones((1,), bool), key, cfg))
  (p1, _, m1), (p2, _, _) = run(jax.random.key(0)), run(jax.random.key(1))
  assert float(m1["dp_clipped_fraction"]) == 1.0  # 3 of 3 real rows, not 3 of 4
  for t in params:
    np.testing.assert_array_equal(p1["global"][t]["a"], params[t]["a"])
  assert not np.allclose(p1["global"]["q_proj"]["b"], p2["global"]["q_proj"]["b"])


def test_client_config_validates_dp_options():
  with pytest.raises(ValueError, match="dp_clip"):
    ClientConfig(dp_clip=-1.0, loss_weighting="examples")
  with pytest.raises(ValueError, match="dp_noise_multiplier"):
    ClientConfig(dp_noise_multiplier=1.0, loss_weighting="examples")          # no clip
  with pytest.raises(ValueError, match="dp_noise_multiplier"):
    ClientConfig(dp_clip=math.inf, dp_noise_multiplier=1.0, loss_weighting="examples")
  with pytest.raises(ValueError, match="loss_weighting"):
    ClientConfig(dp_clip=1.0)
  with pytest.raises(ValueError, match="loss_weighting"):
    ClientConfig(loss_weighting="rows")
  assert ClientConfig(dp_clip=1.0, dp_noise_multiplier=0.5, loss_weighting="examples").dp
  assert not ClientConfig().dp


# --- accounting ---------------------------------------------------------------------------

def test_epsilon_matches_an_independent_accountant_and_calibration_round_trips():
  dp_accounting = pytest.importorskip("dp_accounting")
  from dp_accounting import pld, rdp
  from fedjax_lora.privacy import accounting as acc
  q, sigma, steps, delta = 0.01, 1.0, 1000, 1e-5
  event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
  orders = [1 + x / 20 for x in range(1, 200)] + list(range(11, 257))
  ref = rdp.RdpAccountant(orders)
  ref.compose(event, steps)  # composed by count, not as a SelfComposedDpEvent
  eps = acc.dp_sgd_epsilon(sigma, q, steps, delta)
  np.testing.assert_allclose(eps, ref.get_epsilon(delta), rtol=0.02)
  tight = pld.PLDAccountant()
  tight.compose(event, steps)
  assert tight.get_epsilon(delta) <= eps <= 1.3 * tight.get_epsilon(delta)  # RDP is looser

  assert acc.dp_sgd_epsilon(sigma, q, 0, delta) == 0.0
  assert acc.dp_sgd_epsilon(0.0, q, 10, delta) == math.inf
  assert acc.dp_sgd_epsilon(2 * sigma, q, steps, delta) < eps

  target = 2.0
  s = acc.calibrate_noise(target, q, steps, delta)
  assert acc.dp_sgd_epsilon(s, q, steps, delta) <= target
  assert acc.dp_sgd_epsilon(s - 2 * acc.CALIBRATION_TOL, q, steps, delta) > target
  assert acc.dp_sgd_epsilon(s, q, steps, delta) > 0.99 * target

  sites = acc.site_epsilons(sigma, {"a": 0.01, "b": 0.02}, {"a": steps}, delta)
  assert sites == {"a": eps, "b": 0.0}
  assert acc.client_level_epsilon(sigma, 1, 100, steps, delta) == eps
  with pytest.raises(ValueError, match="delta"):
    acc.dp_sgd_epsilon(sigma, q, steps, 0.0)
  with pytest.raises(ValueError, match="sampling_rate"):
    acc.dp_sgd_epsilon(sigma, 1.5, steps, delta)
  with pytest.raises(ValueError, match="clients_per_round"):
    acc.client_level_epsilon(sigma, 6, 5, steps, delta)
  with pytest.raises(ValueError, match="steps_so_far"):
    acc.site_epsilons(sigma, {"a": q}, {"c": 3}, delta)


# --- DP-FedAvg ----------------------------------------------------------------------------

def tree(rng, k=None, scale=1.0):
  shape = lambda *s: s if k is None else (k,) + s
  return {"q_proj": {"a": scale * rng.normal(size=shape(2, 6, 3)).astype(np.float32),
                     "b": scale * rng.normal(size=shape(2, 3, 5)).astype(np.float32)}}


def apply(agg, g, clients, weights, present, extras=None):
  out = jax.jit(agg.apply)(g, clients, jnp.asarray(weights, jnp.float32),
                           jnp.asarray(present, bool), agg.init(g), extras or {})
  return jax.tree.map(np.asarray, out)


def test_dp_fedavg_without_noise_is_the_uniform_mean_and_clips_each_client():
  rng = np.random.default_rng(0)
  g, clients = tree(rng), tree(rng, k=4)
  present = np.array([True, True, False, True])
  weights = [0.7, 0.1, 0.0, 0.2]  # ignored: uniform by design
  deltas = jax.tree.map(lambda y, x: y - x[None], clients, g)
  norms = np.sqrt(sum(np.sum(d.reshape(4, -1) ** 2, axis=1) for d in jax.tree.leaves(deltas)))

  new, _, m = apply(get_aggregator("dp_fedavg", clip=1e6), g, clients, weights, present)
  for x, y, d in zip(jax.tree.leaves(new), jax.tree.leaves(g), jax.tree.leaves(deltas)):
    np.testing.assert_allclose(x, y + d[present].mean(axis=0), rtol=1e-5, atol=1e-6)
  assert m["clipped"] == 0 and m["noise_std"] == 0 and m["present_clients"] == 3
  np.testing.assert_allclose(m["max_client_delta_norm"], norms[present].max(), rtol=1e-5)

  clip, q_n, lr = clip_between(norms[present]), 4.0, 0.5
  agg = get_aggregator("dp_fedavg", clip=clip, expected_clients=q_n, server_lr=lr)
  junk = jax.tree.map(lambda x: x.copy(), clients)
  for leaf in jax.tree.leaves(junk):
    leaf[2] = np.nan  # an absent client cannot leak in, not even as NaN
  new, _, m = apply(agg, g, junk, weights, present)
  scale = np.where(present, np.minimum(1.0, clip / norms), 0.0)
  for x, y, d in zip(jax.tree.leaves(new), jax.tree.leaves(g), jax.tree.leaves(deltas)):
    np.testing.assert_allclose(x, y + lr * np.tensordot(scale, d, axes=1) / q_n,
                               rtol=1e-5, atol=1e-6)
  assert m["clipped"] == np.sum(present & (norms > clip))
  # Each client's clipped contribution is within the sensitivity bound.
  for k in np.flatnonzero(present):
    one = np.zeros(4, bool)
    one[k] = True
    solo, _, _ = apply(agg, g, clients, weights, one)
    moved = tree_norm(jax.tree.map(lambda x, y: x - y, solo, g))
    assert moved <= lr * clip / q_n * (1 + 1e-5)


def test_dp_fedavg_noise_std_and_key():
  big = lambda k=None: {"t": {"a": np.zeros(((k,) if k else ()) + (1, 100, 50), np.float32),
                              "b": np.zeros(((k,) if k else ()) + (1, 50, 100), np.float32)}}
  g, clients = big(), big(3)
  z, clip, q_n = 2.0, 0.5, 4.0
  agg = get_aggregator("dp_fedavg", clip=clip, noise_multiplier=z, expected_clients=q_n)
  present = [True, False, True]
  new, _, m = apply(agg, g, clients, [1, 1, 1], present, {"noise_key": jax.random.key(3)})
  noise = np.concatenate([x.ravel() for x in jax.tree.leaves(new)])
  np.testing.assert_allclose(noise.std(), z * clip / q_n, rtol=0.03)
  np.testing.assert_allclose(m["noise_std"], z * clip / q_n, rtol=1e-6)
  # Same key, different absent client: identical result.
  other = jax.tree.map(lambda x: x.copy(), clients)
  for leaf in jax.tree.leaves(other):
    leaf[1] = 7.0
  again, _, _ = apply(agg, g, other, [1, 1, 1], present, {"noise_key": jax.random.key(3)})
  for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="noise_key"):
    apply(agg, g, clients, [1, 1, 1], present)


def test_dp_fedavg_rejects_bad_options():
  with pytest.raises(ValueError, match="clip"):
    get_aggregator("dp_fedavg", clip=0.0)
  with pytest.raises(ValueError, match="clip"):
    get_aggregator("dp_fedavg", clip=math.inf)
  with pytest.raises(ValueError, match="noise_multiplier"):
    get_aggregator("dp_fedavg", noise_multiplier=-1.0)
  with pytest.raises(ValueError, match="expected_clients"):
    get_aggregator("dp_fedavg", expected_clients=-2.0)
