"""Functional LoRA: merge, two summed adapters, layer subsets, vmap and sharding over clients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora.losses import causal_lm_loss
from models import llama
from models import lora as lora_lib


def _random_adapter(config, spec, seed):
  a = lora_lib.init_adapter(config, spec, jax.random.key(seed))
  return a.replace(params=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 100), x.shape), a.params))


@pytest.fixture
def tiny():
  from models.config import LlamaConfig
  config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=3,
                       num_heads=4, num_kv_heads=2)
  graphdef, params = llama.init_model(config, seed=0)
  tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, 128)
  return config, graphdef, params, tokens


def test_merge_equals_unmerged_and_two_adapters_sum(tiny):
  config, graphdef, params, tokens = tiny
  g = _random_adapter(config, lora_lib.LoraSpec(rank=4, alpha=8), 1)
  l = _random_adapter(config, lora_lib.LoraSpec(rank=2, alpha=2, targets=("v", "gate"), layers=(0, 2)), 2)
  both, _ = llama.forward(graphdef, params, [g, l], tokens)
  merged_g = lora_lib.merge_into_base(params, g)
  only_l, _ = llama.forward(graphdef, merged_g, [l], tokens)
  fully_merged, _ = llama.forward(graphdef, lora_lib.merge_into_base(merged_g, l), [], tokens)
  base, _ = llama.forward(graphdef, params, [], tokens)
  assert float(jnp.abs(both - base).max()) > 1e-3
  np.testing.assert_allclose(both, only_l, atol=1e-5)
  np.testing.assert_allclose(both, fully_merged, atol=1e-5)


def test_fresh_adapter_is_identity_and_untargeted_layers_get_zero_grad(tiny):
  config, graphdef, params, tokens = tiny
  spec = lora_lib.LoraSpec(rank=4, alpha=16, layers=(1,))
  adapter = lora_lib.init_adapter(config, spec, jax.random.key(0))
  a = adapter.params["q_proj"]["a"]
  bound = 1 / np.sqrt(config.hidden_size)
  assert a.shape == (1, 32, 4) and float(jnp.abs(a).max()) <= bound
  base, _ = llama.forward(graphdef, params, [], tokens)
  same, _ = llama.forward(graphdef, params, [adapter], tokens)
  np.testing.assert_array_equal(base, same)

  # A layer-1-only adapter must get exactly the gradient that layer 1 of an all-layer adapter
  # gets when the other layers contribute nothing (B = 0): no leak from untargeted layers.
  subset = _random_adapter(config, spec, 7)
  full_spec = lora_lib.LoraSpec(rank=4, alpha=16)
  full = lora_lib.init_adapter(config, full_spec, jax.random.key(9))
  full = full.replace(params=jax.tree.map(
      lambda f, s: f.at[1].set(s[0]), full.params, subset.params))
  loss = lambda a: causal_lm_loss(llama.forward(graphdef, params, [a], tokens)[0], tokens,
                                  jnp.ones_like(tokens))[0]
  np.testing.assert_allclose(loss(subset), loss(full), rtol=1e-6)
  g_subset, g_full = jax.grad(loss)(subset), jax.grad(loss)(full)
  assert float(jnp.abs(g_full.params["q_proj"]["b"][0]).max()) > 0  # layer 0 would learn
  jax.tree.map(lambda gs, gf: np.testing.assert_allclose(gs[0], gf[1], rtol=1e-5, atol=1e-7),
               g_subset.params, g_full.params)


def test_vmap_over_clients_shares_base(tiny):
  config, graphdef, params, tokens = tiny
  spec = lora_lib.LoraSpec(rank=4, alpha=8, targets=("q", "down"))
  clients = [_random_adapter(config, spec, s) for s in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *clients)

  def client_logits(adapter):
    return llama.forward(graphdef, params, [adapter], tokens)[0]

  batched = jax.jit(jax.vmap(client_logits))(stacked)
  for i, c in enumerate(clients):
    np.testing.assert_allclose(batched[i], client_logits(c), atol=1e-5)
  assert float(jnp.abs(batched[0] - batched[1]).max()) > 1e-3


def test_dropout_is_random_in_training_and_off_without_rng(tiny):
  config, graphdef, params, tokens = tiny
  adapter = _random_adapter(config, lora_lib.LoraSpec(rank=4, alpha=8, dropout=0.5), 3)
  no_drop = llama.forward(graphdef, params, [adapter], tokens)[0]
  k1 = llama.forward(graphdef, params, [adapter], tokens, dropout_rng=jax.random.key(1))[0]
  k1b = llama.forward(graphdef, params, [adapter], tokens, dropout_rng=jax.random.key(1))[0]
  k2 = llama.forward(graphdef, params, [adapter], tokens, dropout_rng=jax.random.key(2))[0]
  np.testing.assert_array_equal(k1, k1b)
  assert float(jnp.abs(k1 - k2).max()) > 1e-4
  assert float(jnp.abs(k1 - no_drop).max()) > 1e-4


def test_client_axis_sharded_over_devices_matches(tiny):
  """Adapters sharded over a `clients` mesh axis, base replicated: same logits as unsharded."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  config, graphdef, params, tokens = tiny
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  spec = lora_lib.LoraSpec(rank=2, alpha=4)
  clients = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[_random_adapter(config, spec, s) for s in range(n)])
  mesh = jax.make_mesh((n,), ("clients",))
  sharded = jax.device_put(clients, NamedSharding(mesh, P("clients")))
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  step = jax.jit(jax.vmap(lambda a, p: llama.forward(graphdef, p, [a], tokens)[0],
                          in_axes=(0, None)))
  out = step(sharded, replicated)
  assert len(out.sharding.device_set) == n
  np.testing.assert_allclose(out, step(clients, params), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_qkv", "save_attn_out", "save_dots_except_mlp"])
def test_remat_policies_keep_gradients(policy):
  from models.config import LlamaConfig
  base_cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2)
  _, params = llama.init_model(base_cfg)
  adapter = lora_lib.init_adapter(base_cfg, lora_lib.LoraSpec(rank=2, alpha=4), jax.random.key(0))
  adapter = adapter.replace(params=jax.tree.map(lambda x: x + 0.1, adapter.params))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)

  def grads(cfg):
    graphdef, _ = llama.abstract_model(cfg)
    loss = lambda a: causal_lm_loss(llama.forward(graphdef, params, [a], tokens)[0], tokens,
                                    jnp.ones_like(tokens))[0]
    return jax.jit(jax.grad(loss))(adapter)

  ref = grads(base_cfg)
  got = grads(base_cfg.replace(remat=policy))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ref, got)
