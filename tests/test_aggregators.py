"""Server aggregators: each rule's defining property against an independent numpy computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora import aggregators as agg_lib
from fedjax_lora.aggregators import flora_stack, validation_weights
from fedjax_lora.algorithms import ALGORITHMS, get_aggregator

TARGETS = ("q_proj", "down_proj")
N_LAYERS, D_IN, D_OUT, RANK = 2, 6, 5, 3


def make_global(seed=0, rank=RANK):
  rng = np.random.default_rng(seed)
  return {t: {"a": rng.normal(size=(N_LAYERS, D_IN, rank)).astype(np.float32),
              "b": rng.normal(size=(N_LAYERS, rank, D_OUT)).astype(np.float32)} for t in TARGETS}


def make_clients(global_params, k, seed=1, spread=0.5):
  rng = np.random.default_rng(seed)
  return {t: {f: (x[None] + spread * rng.normal(size=(k,) + x.shape)).astype(np.float32)
              for f, x in ab.items()} for t, ab in global_params.items()}


_CACHE: dict = {}


def aggregator(name, **options):
  """One instance and one jitted apply per (name, options): compiling is the cost here."""
  key = (name, tuple(sorted(options.items())))
  if key not in _CACHE:
    agg = get_aggregator(name, **options)
    _CACHE[key] = (agg, jax.jit(agg.apply))
  return _CACHE[key][0]


def run(agg, global_params, clients, weights, present, state=None, extras=None):
  state = agg.init(global_params) if state is None else state
  fn = next((f for a, f in _CACHE.values() if a is agg), None) or jax.jit(agg.apply)
  extras = dict(extras or {})
  if "rank_mask" in extras:
    extras["rank_mask"] = jnp.asarray(extras["rank_mask"]).astype(bool)
  out = fn(global_params, clients, jnp.asarray(weights, jnp.float32), jnp.asarray(present, bool),
           state, extras)
  return jax.tree.map(np.asarray, out)


def np_weighted(clients, p):
  return {t: {f: np.tensordot(p, x, axes=1) for f, x in ab.items()} for t, ab in clients.items()}


def assert_tree_close(got, want, rtol=1e-5, atol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def set_client(clients, k, value):
  return {t: {f: np.concatenate([x[:k], np.full_like(x[k:k + 1], value), x[k + 1:]])
              for f, x in ab.items()} for t, ab in clients.items()}


def scale_client_delta(global_params, clients, k, factor):
  out = {}
  for t, ab in clients.items():
    out[t] = {}
    for f, x in ab.items():
      x = x.copy()
      x[k] = global_params[t][f] + factor * (x[k] - global_params[t][f])
      out[t][f] = x
  return out


# ---------------------------------------------------------------- FedAvg family

def test_fedavg_identical_clients_is_identity():
  g = make_global()
  clients = jax.tree.map(lambda x: np.stack([x] * 3), g)
  new, state, metrics = run(aggregator("fedavg"), g, clients, [0.2, 0.3, 0.5], [1, 1, 1])
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(g)):
    np.testing.assert_array_equal(got, want)
  assert state == {}
  assert metrics["factor_error"] == pytest.approx(0.0, abs=1e-6)


def test_fedavg_follows_token_count_weights_and_logs_factor_error():
  g = make_global()
  clients = make_clients(g, 3)
  tokens = np.array([100.0, 300.0, 600.0])
  p = tokens / tokens.sum()
  new, _, metrics = run(aggregator("fedavg"), g, clients, p, [1, 1, 1])
  assert_tree_close(new, np_weighted(clients, p))
  # Factor-averaging error, densely: sum over targets and layers of ||Σ p A B − Ā B̄||_F.
  want = 0.0
  for ab in clients.values():
    exact = np.einsum("k,knio,->nio", p, np.einsum("knir,knro->knio", ab["a"], ab["b"]), 1.0)
    naive = np.einsum("nir,nro->nio", np.tensordot(p, ab["a"], 1), np.tensordot(p, ab["b"], 1))
    want += np.linalg.norm(exact - naive, axis=(1, 2)).sum()
  assert metrics["factor_error"] == pytest.approx(want, rel=1e-4)
  assert metrics["delta_norm"] > 0


def test_fedavg_uniform_weights_equal_the_mean():
  g = make_global()
  clients = make_clients(g, 4)
  new, _, _ = run(aggregator("fedavg"), g, clients, [0.25] * 4, [1] * 4)
  assert_tree_close(new, jax.tree.map(lambda x: x.mean(0), clients))


def test_fedavg_absent_client_has_no_influence():
  g = make_global()
  clients = make_clients(g, 3)
  junk = set_client(clients, 1, np.nan)
  new, _, metrics = run(aggregator("fedavg"), g, junk, [0.4, 0.0, 0.6], [1, 0, 1])
  want = np_weighted({t: {f: x[[0, 2]] for f, x in ab.items()} for t, ab in clients.items()},
                     np.array([0.4, 0.6]))
  assert_tree_close(new, want)
  assert np.isfinite(metrics["factor_error"]) and metrics["present_clients"] == 2


def test_validation_weights_softmax_and_size_term():
  losses = np.array([1.2, 0.4, 2.0, 0.1])
  n = np.array([100.0, 50.0, 300.0, 1e9])
  present = np.array([True, True, True, False])
  vw = jax.jit(validation_weights)
  w = np.asarray(vw(losses, n, present, 0.0, 1.0))
  e = np.exp(-losses[:3])
  np.testing.assert_allclose(w[:3], e / e.sum(), rtol=1e-6)
  assert w[3] == 0.0 and w.sum() == pytest.approx(1.0)
  assert w[1] > w[0] > w[2]  # lower validation loss, higher weight
  w1 = np.asarray(vw(losses, n, present, 1.0, 1.0))
  e1 = n[:3] * np.exp(-losses[:3])
  np.testing.assert_allclose(w1[:3], e1 / e1.sum(), rtol=1e-5)
  wh = np.asarray(vw(losses, n, present, 0.5, 1.0))
  eh = np.sqrt(n[:3]) * np.exp(-losses[:3])
  np.testing.assert_allclose(wh[:3], eh / eh.sum(), rtol=1e-5)
  wt = np.asarray(vw(losses, n, present, 0.0, 2.0))
  e2 = np.exp(-losses[:3] / 2.0)
  np.testing.assert_allclose(wt[:3], e2 / e2.sum(), rtol=1e-6)
  # Large losses must not underflow (log-sum-exp), a diverged client gets weight 0.
  big = np.asarray(vw(np.array([1000.0, 1001.0, np.nan, 5.0]), np.ones(4),
                      np.array([True, True, True, False]), 0.0, 1.0))
  np.testing.assert_allclose(big, [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0, 0.0],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    validation_weights(losses, n, present, temperature=0.0)


def test_ffa_lora_keeps_a_and_fedsa_lora_keeps_b():
  g = make_global()
  clients = make_clients(g, 3)
  p = np.array([0.5, 0.25, 0.25])
  avg = np_weighted(clients, p)
  ffa = aggregator("ffa_lora")
  new, _, _ = run(ffa, g, clients, p, [1, 1, 1])
  assert ffa.sends == ("b",)
  for t in TARGETS:
    np.testing.assert_array_equal(new[t]["a"], g[t]["a"])
    np.testing.assert_allclose(new[t]["b"], avg[t]["b"], rtol=1e-5, atol=1e-6)
  fedsa = aggregator("fedsa_lora")
  new, _, _ = run(fedsa, g, clients, p, [1, 1, 1])
  assert fedsa.sends == ("a",)
  for t in TARGETS:
    np.testing.assert_array_equal(new[t]["b"], g[t]["b"])
    np.testing.assert_allclose(new[t]["a"], avg[t]["a"], rtol=1e-5, atol=1e-6)


def test_ffa_lora_shared_a_gives_zero_factor_error():
  g = make_global()
  clients = make_clients(g, 3)
  clients = {t: {"a": np.stack([g[t]["a"]] * 3), "b": ab["b"]} for t, ab in clients.items()}
  _, _, metrics = run(aggregator("ffa_lora"), g, clients, [0.2, 0.3, 0.5], [1, 1, 1])
  assert metrics["factor_error"] == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- server optimizers

def test_fedavgm_without_momentum_is_fedavg_and_momentum_accumulates():
  g = make_global()
  clients = make_clients(g, 3)
  p = np.array([0.2, 0.3, 0.5])
  plain, _, _ = run(aggregator("fedavg"), g, clients, p, [1, 1, 1])
  m0, _, _ = run(aggregator("fedavgm", server_lr=1.0, momentum=0.0), g, clients, p, [1, 1, 1])
  assert_tree_close(m0, plain)
  agg = aggregator("fedavgm", server_lr=0.5, momentum=0.9)
  x1, s1, _ = run(agg, g, clients, p, [1, 1, 1])
  clients2 = make_clients(x1, 3, seed=7)
  x2, _, _ = run(agg, x1, clients2, p, [1, 1, 1], state=s1)
  for t in TARGETS:
    for f in "ab":
      d1 = np.tensordot(p, clients[t][f] - g[t][f], 1)
      d2 = np.tensordot(p, clients2[t][f] - x1[t][f], 1)
      np.testing.assert_allclose(x2[t][f], x1[t][f] + 0.5 * (0.9 * d1 + d2), rtol=1e-5,
                                 atol=1e-5)


def test_fedadam_with_zero_server_lr_leaves_model_unchanged():
  g = make_global()
  clients = make_clients(g, 3)
  for name in ("fedadam", "fedyogi"):
    new, _, _ = run(aggregator(name, server_lr=0.0), g, clients, [0.2, 0.3, 0.5], [1, 1, 1])
    assert_tree_close(new, g, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_match_reddi_algorithm_2(name):
  lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
  options = dict(server_lr=lr, beta1=b1, tau=tau)
  if name != "fedadagrad":
    options["beta2"] = b2
  agg = aggregator(name, **options)
  g = make_global()
  p = np.array([0.6, 0.4])
  x, state = g, None
  m = {t: {f: np.zeros_like(v) for f, v in ab.items()} for t, ab in g.items()}
  v = {t: {f: np.full_like(v, tau ** 2) for f, v in ab.items()} for t, ab in g.items()}
  want = g
  for rnd in range(3):
    clients = make_clients(x, 2, seed=10 + rnd)
    new, state, _ = run(agg, x, clients, p, [1, 1], state=state)
    nxt = {}
    for t in TARGETS:
      nxt[t] = {}
      for f in "ab":
        d = np.tensordot(p, clients[t][f] - x[t][f], 1)
        m[t][f] = b1 * m[t][f] + (1 - b1) * d
        if name == "fedadam":
          v[t][f] = b2 * v[t][f] + (1 - b2) * d ** 2
        elif name == "fedyogi":
          v[t][f] = v[t][f] - (1 - b2) * d ** 2 * np.sign(v[t][f] - d ** 2)
        else:
          v[t][f] = v[t][f] + d ** 2
        nxt[t][f] = want[t][f] + lr * m[t][f] / (np.sqrt(v[t][f]) + tau)
    want = nxt
    assert_tree_close(new, want, rtol=1e-4, atol=1e-5)
    x = new


def test_scaffold_update_and_control_formula():
  g = make_global()
  clients = make_clients(g, 3)
  dc = make_clients(jax.tree.map(np.zeros_like, g), 3, seed=5)
  dc_junk = set_client(dc, 2, np.nan)
  present = np.array([True, True, False])
  agg = aggregator("scaffold", server_lr=0.5)
  state = agg.init(g)
  c0 = make_clients(jax.tree.map(np.zeros_like, g), 1, seed=9)
  state = {"control": jax.tree.map(lambda x: x[0], c0)}
  # Weights are ignored: SCAFFOLD takes the plain mean over the present clients.
  new, new_state, _ = run(agg, g, set_client(clients, 2, np.nan), [0.9, 0.1, 0.0], present,
                          state=state,
                          extras={"control_delta": dc_junk, "num_clients": jnp.float32(5.0)})
  for t in TARGETS:
    for f in "ab":
      np.testing.assert_allclose(new[t][f], g[t][f] + 0.5 * (clients[t][f][:2] - g[t][f]).mean(0),
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(new_state["control"][t][f],
                                 state["control"][t][f] + dc[t][f][:2].sum(0) / 5.0,
                                 rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="control_delta"):
    run(agg, g, clients, [0.5, 0.5, 0.0], present)


# ---------------------------------------------------------------- robust rules

def _honest_range(g, clients, honest):
  lo = jax.tree.map(lambda x: x[honest].min(0), clients)
  hi = jax.tree.map(lambda x: x[honest].max(0), clients)
  return lo, hi


@pytest.mark.parametrize("name, options", [("median", {}), ("trimmed_mean", {"trim": 0.2})])
def test_median_and_trimmed_mean_ignore_a_scaled_client(name, options):
  g = make_global()
  clients = make_clients(g, 6)
  evil = scale_client_delta(g, clients, 0, 1e6)
  evil = set_client(evil, 5, 1e9)  # absent: must not even count
  present = np.array([1, 1, 1, 1, 1, 0], bool)
  new, _, _ = run(aggregator(name, **options), g, evil, np.full(6, 0.2) * present, present)
  lo, hi = _honest_range(g, clients, [1, 2, 3, 4])
  for n_, l, h in zip(jax.tree.leaves(new), jax.tree.leaves(lo), jax.tree.leaves(hi)):
    assert np.all(n_ >= l - 1e-5) and np.all(n_ <= h + 1e-5)
  # Independent numpy statistic over the 5 present clients.
  for t in TARGETS:
    for f in "ab":
      vals = np.sort(evil[t][f][:5] - g[t][f], axis=0)
      stat = np.median(vals, 0) if name == "median" else vals[1:4].mean(0)  # floor(0.2*5)=1
      np.testing.assert_allclose(new[t][f], g[t][f] + stat, rtol=1e-5, atol=1e-5)


def test_trimmed_mean_counts_only_present_clients():
  g = make_global()
  clients = make_clients(g, 4)
  # m = 3 present, trim 0.4 -> drop floor(1.2) = 1 each side -> the median of three.
  present = np.array([1, 0, 1, 1], bool)
  new, _, _ = run(aggregator("trimmed_mean", trim=0.4), g, set_client(clients, 1, -1e9),
                  [0.3, 0, 0.3, 0.4], present)
  want = jax.tree.map(lambda x: np.median(x[[0, 2, 3]], 0), clients)
  assert_tree_close(new, want)


def test_norm_clip_bounds_each_delta():
  g = make_global()
  clients = make_clients(g, 3)
  clients = scale_client_delta(g, clients, 0, 100.0)
  p = np.array([0.5, 0.3, 0.2])
  bound = 2.0
  new, _, metrics = run(aggregator("norm_clip", max_norm=bound), g, clients, p, [1, 1, 1])
  deltas = [np.sqrt(sum(np.sum((clients[t][f][k] - g[t][f]) ** 2) for t in TARGETS for f in "ab"))
            for k in range(3)]
  factors = np.minimum(1.0, bound / np.array(deltas))
  want = {t: {f: g[t][f] + np.tensordot(p * factors, clients[t][f] - g[t][f], 1) for f in "ab"}
          for t in TARGETS}
  assert_tree_close(new, want)
  assert metrics["clipped"] == float(np.sum(np.array(deltas) > bound))
  # A single present client: the model moves by exactly max_norm.
  new1, _, _ = run(aggregator("norm_clip", max_norm=bound), g, clients, [1, 0, 0], [1, 0, 0])
  moved = np.sqrt(sum(np.sum((new1[t][f] - g[t][f]) ** 2) for t in TARGETS for f in "ab"))
  assert moved == pytest.approx(bound, rel=1e-5)


# ---------------------------------------------------------------- heterogeneous ranks

def np_product_sum(clients, p, mask=None):
  out = {}
  for t, ab in clients.items():
    a, b = ab["a"], ab["b"]
    if mask is not None:
      a = a * mask[:, None, None, :]
      b = b * mask[:, None, :, None]
    out[t] = np.einsum("k,knir,knro->nio", p, a, b)
  return out


def test_flora_stack_product_equals_weighted_product_sum():
  g = make_global()
  clients = make_clients(g, 3)
  p = np.array([0.5, 0.2, 0.3])
  stacked = jax.tree.map(np.asarray, flora_stack(clients, p))
  want = np_product_sum(clients, p)
  for t in TARGETS:
    assert stacked[t]["a"].shape == (N_LAYERS, D_IN, 3 * RANK)
    np.testing.assert_allclose(stacked[t]["a"] @ stacked[t]["b"], want[t], rtol=1e-5, atol=1e-5)


def test_flora_merges_products_into_base_delta_and_restarts():
  g = make_global()
  agg = aggregator("flora")
  state = agg.init(g)
  mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)
  p = np.array([0.5, 0.2, 0.3])
  total = {t: np.zeros((N_LAYERS, D_IN, D_OUT)) for t in TARGETS}
  x = g
  for rnd in range(2):
    clients = make_clients(x, 3, seed=20 + rnd)
    junk = {t: {"a": np.where(mask[:, None, None, :] > 0, ab["a"], 7.0),
                "b": np.where(mask[:, None, :, None] > 0, ab["b"], np.nan)}
            for t, ab in clients.items()}
    x, state, _ = run(agg, x, junk, p, [1, 1, 1], state=state,
                      extras={"rank_mask": jnp.asarray(mask, bool)})
    inc = np_product_sum(clients, p, mask)
    for t in TARGETS:
      total[t] += inc[t]
      np.testing.assert_allclose(state["base_delta"][t], total[t], rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(x[t]["a"], g[t]["a"])
      np.testing.assert_array_equal(x[t]["b"], 0.0)


def _best_rank(m, r):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r], np.sqrt(np.sum(s[r:] ** 2))


def test_flexlora_full_rank_reproduces_delta_w():
  g = make_global(rank=4)
  clients = make_clients(g, 3)
  mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], np.float32)  # rank(ΔW) <= 4
  p = np.array([0.3, 0.3, 0.4])
  new, _, metrics = run(aggregator("flexlora"), g, clients, p, [1, 1, 1],
                        extras={"rank_mask": mask})
  want = np_product_sum(clients, p, mask)
  for t in TARGETS:
    np.testing.assert_allclose(np.einsum("nir,nro->nio", new[t]["a"], new[t]["b"]), want[t],
                               rtol=1e-4, atol=1e-4)
  assert metrics["svd_residual"] == pytest.approx(0.0, abs=1e-4)


def test_flexlora_truncation_is_the_best_low_rank_approximation():
  g = make_global()
  clients = make_clients(g, 3)
  p = np.array([0.5, 0.25, 0.25])
  new, _, metrics = run(aggregator("flexlora"), g, clients, p, [1, 1, 1])
  dense = np_product_sum(clients, p)
  residual = 0.0
  for t in TARGETS:
    for layer in range(N_LAYERS):
      a, b = new[t]["a"][layer], new[t]["b"][layer]
      np.testing.assert_allclose(b @ b.T, np.eye(RANK), atol=1e-4)  # B = V^T: orthonormal rows
      for r in (1, 2, RANK):  # a client truncated to r gets the best rank-r approximation
        best, res = _best_rank(dense[t][layer], r)
        np.testing.assert_allclose(a[:, :r] @ b[:r], best, rtol=1e-4, atol=1e-4)
      residual += res
  assert metrics["svd_residual"] == pytest.approx(residual, rel=1e-4)


def test_hetlora_ignores_masked_components_and_weights_by_norm():
  g = make_global(rank=4)
  clients = make_clients(g, 3)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], np.float32)  # nobody holds comp 3
  clean = {t: {"a": ab["a"] * mask[:, None, None, :], "b": ab["b"] * mask[:, None, :, None]}
           for t, ab in clients.items()}
  junk = {t: {"a": np.where(mask[:, None, None, :] > 0, ab["a"], 1e6),
              "b": np.where(mask[:, None, :, None] > 0, ab["b"], np.nan)}
          for t, ab in clients.items()}
  p = np.array([0.2, 0.5, 0.3])
  agg = aggregator("hetlora")
  new, _, _ = run(agg, g, junk, p, [1, 1, 1], extras={"rank_mask": mask > 0})
  new_clean, _, _ = run(agg, g, clean, p, [1, 1, 1], extras={"rank_mask": mask > 0})
  assert_tree_close(new, new_clean, rtol=0, atol=0)
  norms = np.sqrt([sum(np.sum(np.einsum("nir,nro->nio", clean[t]["a"][k], clean[t]["b"][k]) ** 2)
                       for t in TARGETS) for k in range(3)])
  w = p * norms / np.sum(p * norms)
  for t in TARGETS:
    a = np.tensordot(w, clean[t]["a"], 1)
    b = np.tensordot(w, clean[t]["b"], 1)
    a[..., 3], b[:, 3, :] = g[t]["a"][..., 3], g[t]["b"][:, 3, :]  # uncovered: kept
    np.testing.assert_allclose(new[t]["a"], a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new[t]["b"], b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- registry and jit

def test_unknown_names_and_bad_options_raise():
  with pytest.raises(ValueError, match="unknown algorithm 'fedfoo'.*fedavg"):
    get_aggregator("fedfoo")
  with pytest.raises(ValueError, match="momentum"):
    get_aggregator("fedadam", momentum=0.9)
  with pytest.raises(ValueError, match="beta2"):
    get_aggregator("fedadagrad", beta2=0.99)
  with pytest.raises(ValueError, match="no options"):
    get_aggregator("median", trim=0.1)
  with pytest.raises(ValueError, match="trim"):
    get_aggregator("trimmed_mean", trim=0.5)
  with pytest.raises(ValueError, match="momentum"):
    get_aggregator("fedavgm", momentum=1.0)
  with pytest.raises(ValueError, match="tau"):
    get_aggregator("fedyogi", tau=0.0)
  with pytest.raises(ValueError, match="max_norm"):
    get_aggregator("norm_clip", max_norm=-1.0)
  with pytest.raises(ValueError, match="parts"):
    agg_lib.fedavg(parts=("c",))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_aggregator_jits_keeps_structure_and_ignores_absent(name):
  g = make_global()
  agg = aggregator(name)
  assert agg.name == name and set(agg.sends) <= {"a", "b"}
  clients = make_clients(g, 3)
  extras = {}
  if name == "scaffold":
    extras = {"num_clients": jnp.float32(4.0), "control_delta": clients}
  if name in ("hetlora", "flexlora", "flora"):
    extras = {"rank_mask": np.ones((3, RANK), bool)}
  present = [True, False, True]
  p = [0.5, 0.0, 0.5]
  state = agg.init(g)
  junk = set_client(clients, 1, np.nan)
  out_a = run(agg, g, junk, p, present, state,
              {**extras, "control_delta": junk} if "control_delta" in extras else extras)
  out_b = run(agg, g, set_client(clients, 1, -3.0), p, present, state, extras)
  new, new_state, metrics = out_a
  assert jax.tree.structure(new) == jax.tree.structure(g)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for got, ref in zip(jax.tree.leaves(new), jax.tree.leaves(g)):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.all(np.isfinite(got))
  assert all(np.ndim(v) == 0 for v in metrics.values())
  assert_tree_close(out_a[:2], out_b[:2], rtol=0, atol=0)
  # A round in which nobody reports leaves the global model and the server state alone.
  none, none_state, _ = run(agg, g, junk, [0.0] * 3, [False] * 3, state, extras)
  assert_tree_close(none, g, rtol=0, atol=0)
  assert_tree_close(none_state, jax.tree.map(np.asarray, state), rtol=0, atol=0)
