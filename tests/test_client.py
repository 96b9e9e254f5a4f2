"""Client update pieces: the HF learning-rate schedule, gradient accumulation, SCAFFOLD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora.client import ClientConfig, client_update, learning_rate, scaffold_control
from models import llama
from models.config import LlamaConfig
from models.lora import LoraSpec, init_adapter


def hf_cosine_with_warmup(step, total, warmup, peak):
  """transformers.get_cosine_schedule_with_warmup's lambda, written out independently."""
  if step < warmup:
    return peak * step / max(1, warmup)
  progress = (step - warmup) / max(1, total - warmup)
  return peak * max(0.0, 0.5 * (1.0 + np.cos(np.pi * progress)))


@pytest.mark.parametrize("total", [1, 7, 40, 333])
def test_schedule_matches_hf_cosine_with_warmup(total):
  cfg = ClientConfig(learning_rate=2e-4, warmup_fraction=0.05)
  warmup = int(np.ceil(0.05 * total))
  for step in range(total):
    got = float(learning_rate(cfg, jnp.int32(step), jnp.int32(total)))
    np.testing.assert_allclose(got, hf_cosine_with_warmup(step, total, warmup, 2e-4),
                               rtol=1e-5, atol=2e-9)  # float32 near lr 0


@pytest.fixture(scope="module")
def tiny():
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  graphdef, base = llama.init_model(cfg, seed=0)
  spec = LoraSpec(rank=4, alpha=8.0)
  params = init_adapter(cfg, spec, jax.random.key(0)).params
  params = jax.tree.map(lambda x: x + 0.01, params)  # non-zero B so both factors get gradients
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 64, size=(4, 12)).astype(np.int32)
  mask = np.ones((4, 12), bool)
  mask[1, 9:] = False  # ragged rows: accumulation must weight by tokens, not by rows
  return graphdef, base, spec, params, {"tokens": tokens, "attention_mask": mask,
                                        "loss_mask": mask.astype(np.float32)}


def test_accumulation_equals_one_big_batch(tiny):
  graphdef, base, spec, params, batch = tiny
  cfg = ClientConfig(learning_rate=1e-2, schedule="constant")
  run = lambda b: client_update(graphdef, base, {"global": params}, {"global": spec}, b,
                                jnp.ones((1,), bool), jax.random.key(0), cfg)
  big = jax.tree.map(lambda x: x[None, None], batch)            # [S=1, A=1, B=4, L]
  split = jax.tree.map(lambda x: x.reshape(1, 2, 2, -1), batch)  # [S=1, A=2, B=2, L]
  (p1, _, m1), (p2, _, m2) = run(big), run(split)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  np.testing.assert_allclose(m1["train_loss"], m2["train_loss"], rtol=1e-6)


def test_ffa_trains_only_b_and_prox_pulls_towards_the_anchor(tiny):
  graphdef, base, spec, params, batch = tiny
  steps = jax.tree.map(lambda x: np.stack([x[None]] * 4), batch)  # 4 steps, A=1
  def run(**kw):
    cfg = ClientConfig(learning_rate=5e-2, schedule="constant", **kw)
    return client_update(graphdef, base, {"global": params}, {"global": spec}, steps,
                         jnp.ones((4,), bool), jax.random.key(0), cfg, anchor=params)[0]
  ffa = run(train_factors=("b",))
  np.testing.assert_array_equal(ffa["global"]["q_proj"]["a"], params["q_proj"]["a"])
  assert not np.allclose(ffa["global"]["q_proj"]["b"], params["q_proj"]["b"])
  dist = lambda out: sum(float(jnp.sum((x - y) ** 2)) for x, y in
                         zip(jax.tree.leaves(out["global"]), jax.tree.leaves(params)))
  assert dist(run(prox_mu=100.0)) < dist(run())


def test_scaffold_control_is_the_mean_update_direction():
  x = {"w": jnp.array([1.0, 2.0])}
  y = {"w": jnp.array([0.5, 2.5])}
  c, ck = {"w": jnp.array([0.1, 0.0])}, {"w": jnp.array([0.0, 0.2])}
  got = scaffold_control(c, ck, x, y, jnp.float32(0.25))
  np.testing.assert_allclose(got["w"], ck["w"] - c["w"] + (x["w"] - y["w"]) / 0.25)
