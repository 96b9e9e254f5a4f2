"""Logit parity of our Flax LLaMA with transformers.LlamaForCausalLM through the real loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity with transformers needs the [torch] extra")

from models import hf_checkpoint, llama


def _batch(seed=0, vocab=256, shape=(2, 16), pad_row_len=11):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=shape)
  mask = np.ones(shape, np.int64)
  mask[1, pad_row_len:] = 0  # right-padded second row
  tokens[1, pad_row_len:] = 0
  positions = np.broadcast_to(np.arange(shape[1]), shape).copy()
  return tokens, mask, positions


def _compare(path, torch_model, scan_layers=True, atol=1e-4):
  config = hf_checkpoint.load_config(path, scan_layers=scan_layers)
  config, graphdef, params = hf_checkpoint.load_params(path, config)
  tokens, mask, positions = _batch(vocab=config.vocab_size)
  ours, _ = jax.jit(llama.forward, static_argnums=0)(
      graphdef, params, (), jnp.asarray(tokens), positions=jnp.asarray(positions),
      attention_mask=jnp.asarray(mask))
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], rtol=1e-4, atol=atol)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(hf_llama, kv_heads, tied):
  path, model = hf_llama(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
  _compare(path, model)


def test_llama3_rope_scaling(hf_llama):
  from tests.conftest import LLAMA3_ROPE
  path, model = hf_llama(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)
  config = hf_checkpoint.load_config(path)
  assert config.rope_scaling is not None
  _compare(path, model)


def test_unrolled_layers_match_scan(hf_llama):
  path, model = hf_llama(num_key_value_heads=2)
  _compare(path, model, scan_layers=False)


def test_save_roundtrip_loads_in_transformers(hf_llama, tmp_path):
  import transformers
  path, model = hf_llama(num_key_value_heads=2)
  config, _, params = hf_checkpoint.load_params(path)
  out = hf_checkpoint.save_params(tmp_path / "resaved", config, params, max_shard_bytes=60_000)
  assert (out / hf_checkpoint.INDEX_FILE).is_file(), "small shard size should force sharding"
  reloaded = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
  tokens, mask, positions = _batch()
  with torch.no_grad():
    a = model(input_ids=torch.tensor(tokens)).logits.numpy()
    b = reloaded(input_ids=torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # And our own loader reads the sharded layout back bit-exactly.
  _, _, again = hf_checkpoint.load_params(out)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_bf16_load_casts_weights(hf_llama):
  path, model = hf_llama(num_key_value_heads=2)
  config = hf_checkpoint.load_config(path, param_dtype="bfloat16", dtype="bfloat16")
  config, graphdef, params = hf_checkpoint.load_params(path, config)
  assert params["layers"]["q_proj"].dtype == jnp.bfloat16
  tokens, mask, positions = _batch()
  logits, _ = llama.forward(graphdef, params, (), jnp.asarray(tokens))
  assert logits.dtype == jnp.float32
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens)).logits.numpy()
  # bf16 is compared by distribution, not elementwise: small KL, same top-1 mostly.
  p = jax.nn.softmax(jnp.asarray(ref), -1)
  kl = jnp.sum(p * (jax.nn.log_softmax(jnp.asarray(ref), -1) - jax.nn.log_softmax(logits, -1)), -1)
  assert float(kl.max()) < 0.05


def test_left_padded_batch_with_default_positions(hf_llama):
  """Left padding (as in batched generation): default positions count real tokens only."""
  path, model = hf_llama(num_key_value_heads=2)
  config, graphdef, params = hf_checkpoint.load_params(path)
  tokens, _, _ = _batch()
  mask = np.ones_like(tokens)
  mask[1, :5] = 0
  ours, _ = llama.forward(graphdef, params, (), jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions)).logits.numpy()
  real = mask.astype(bool)
  assert np.isfinite(np.asarray(ours)).all(), "fully padded query rows must not produce NaN"
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], rtol=1e-4, atol=1e-4)


def test_bf16_checkpoint_written_by_torch_loads_exactly(hf_llama, tmp_path):
  path, model = hf_llama(num_key_value_heads=2)
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  config = hf_checkpoint.load_config(tmp_path / "bf16", param_dtype="bfloat16")
  _, _, params = hf_checkpoint.load_params(tmp_path / "bf16", config)
  q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  assert params["layers"]["q_proj"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params["layers"]["q_proj"][1], np.float32), q)
