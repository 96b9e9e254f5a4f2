"""KV-cache decoding equals repeated full forward passes and transformers' greedy generate.

The models are made sharp (large weights) so that positions and cache contents change the
greedy tokens, and EOS ids are picked from tokens the reference really produces, so early
stopping, lengths and padding after EOS are exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import generation, hf_checkpoint, llama
from models import lora as lora_lib
from models.config import LlamaConfig


def _reference_greedy(graphdef, params, adapters, prompt, n, eos=()):
  """Greedy decoding by re-running the full forward pass (no cache) on the growing sequence,
  right-padded to a fixed length so it compiles once."""
  full = jax.jit(lambda toks, m: llama.forward(
      graphdef, params, adapters, toks, attention_mask=m,
      positions=jnp.arange(toks.shape[1])[None])[0])
  width = len(prompt) + n
  seq = list(prompt)
  out = []
  for _ in range(n):
    toks = np.zeros((1, width), np.int32)
    toks[0, :len(seq)] = seq
    m = (np.arange(width) < len(seq))[None].astype(np.int32)
    logits = full(jnp.asarray(toks), jnp.asarray(m))
    nxt = int(jnp.argmax(logits[0, len(seq) - 1]))
    out.append(nxt)
    seq.append(nxt)
    if nxt in eos:
      break
  return out


@pytest.fixture(scope="module")
def sharp_model():
  config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=1, eos_token_id=None)
  graphdef, params = llama.init_model(config, seed=3)
  params = jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, params)
  adapter = lora_lib.init_adapter(config, lora_lib.LoraSpec(rank=2, alpha=4), jax.random.key(1))
  adapter = adapter.replace(params=jax.tree.map(
      lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), adapter.params))
  return config, graphdef, params, (adapter,)


def test_cache_decoding_matches_full_forward_and_batching(sharp_model):
  config, graphdef, params, adapters = sharp_model
  prompts = [[7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]
  free = [_reference_greedy(graphdef, params, adapters, p, 12) for p in prompts]
  assert all(len(set(f)) > 4 for f in free), "reference should not be a constant token"
  eos = (free[0][4],)  # prompt 0 stops at step 5; the others stop where (if) they meet it
  tokens, mask = generation.left_pad(prompts, pad_id=0)
  assert tokens.shape == (3, 16)
  out, lengths = generation.generate(config, graphdef, params, adapters, jnp.asarray(tokens),
                                     jnp.asarray(mask), max_new_tokens=12, eos_ids=eos, pad_id=96)
  assert int(lengths[0]) <= 5
  for i, p in enumerate(prompts):
    ref = _reference_greedy(graphdef, params, adapters, p, 12, eos)
    assert int(lengths[i]) == len(ref)
    assert np.asarray(out[i]).tolist() == ref + [96] * (12 - len(ref))
    # One prompt at a time gives the same tokens as the padded batch.
    t1, m1 = generation.left_pad([p], pad_id=0)
    single, _ = generation.generate(config, graphdef, params, adapters, jnp.asarray(t1),
                                    jnp.asarray(m1), max_new_tokens=12, eos_ids=eos, pad_id=96)
    np.testing.assert_array_equal(single[0], out[i])


def test_matches_transformers_generate(hf_llama):
  torch = pytest.importorskip("torch")
  path, model = hf_llama(num_key_value_heads=2, initializer_range=0.3)
  config, graphdef, params = hf_checkpoint.load_params(path)
  prompts = [[11, 12, 13, 14, 15, 16], [40, 41, 42]]
  tokens, mask = generation.left_pad(prompts, pad_id=0, length=8)

  def hf(eos):
    with torch.no_grad():
      return model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long),
                            max_new_tokens=10, min_new_tokens=0, do_sample=False,
                            pad_token_id=0, eos_token_id=eos).numpy()[:, 8:]

  free = hf(None)
  assert len(set(free[0].tolist())) > 3
  eos = int(free[0][3])
  ref = hf(eos)
  out, lengths = generation.generate(config, graphdef, params, (), jnp.asarray(tokens),
                                     jnp.asarray(mask), max_new_tokens=10, eos_ids=(eos,))
  assert int(lengths[0]) == 4
  for i in range(len(prompts)):
    n = int(lengths[i])
    assert np.asarray(out[i, :n]).tolist() == ref[i, :n].tolist()
    assert (ref[i, n:] == 0).all() and (np.asarray(out[i, n:]) == 0).all()


def test_sampling_is_seeded():
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=2, eos_token_id=None)
  graphdef, params = llama.init_model(config)
  tokens, mask = generation.left_pad([[1, 2, 3]], pad_id=0)
  run = lambda seed: generation.generate(
      config, graphdef, params, (), jnp.asarray(tokens), jnp.asarray(mask), max_new_tokens=16,
      sample=True, temperature=2.0, rng=jax.random.key(seed))[0]
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_left_pad_rejects_empty_prompt():
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generation.left_pad([[1, 2], []], pad_id=0)


def test_right_padding_gives_the_same_tokens_as_left_padding(sharp_model):
  config, graphdef, params, adapters = sharp_model
  prompts = [[7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]
  left_t, left_m = generation.left_pad(prompts, pad_id=0)
  right_t, right_m = generation.right_pad(prompts, pad_id=0)
  assert right_t[1, :2].tolist() == [20, 21] and right_m[1].sum() == 2
  assert left_t[1, -2:].tolist() == [20, 21]
  outs = [generation.generate(config, graphdef, params, adapters, jnp.asarray(t),
                              jnp.asarray(m), max_new_tokens=10, pad_id=96)
          for t, m in ((left_t, left_m), (right_t, right_m))]
  (lo, ll), (ro, rl) = outs
  assert len(set(np.asarray(lo).ravel().tolist())) > 4, "outputs should vary"
  np.testing.assert_array_equal(lo, ro)
  np.testing.assert_array_equal(ll, rl)


def test_greedy_token_is_argmax_with_ties_to_the_first_index():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(32, 50)).astype(np.float32)
  logits[3, [7, 9, 40]] = 10.0                           # a three-way tie at the maximum
  logits[5] = -1.0                                        # all equal
  np.testing.assert_array_equal(np.asarray(generation.greedy_token(jnp.asarray(logits))),
                                np.argmax(logits, axis=-1))


def _lowered_generate_chars(num_layers):
  """Characters of the lowered generate program (prefill and decode loop) at this depth."""
  config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2, eos_token_id=None)
  graphdef, params = llama.abstract_model(config)
  adapter = jax.eval_shape(lambda: lora_lib.init_adapter(
      config, lora_lib.LoraSpec(rank=2, alpha=4), jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  lowered = generation._generate.lower(config, graphdef, params, (adapter,), tokens, tokens,
                                       jax.ShapeDtypeStruct((2,), jnp.int32), max_new_tokens=8, eos_ids=(), sample=False,
                                       temperature=1.0, rng=None, pad_id=0)
  return len(lowered.as_text())


def test_decode_program_does_not_grow_with_depth():
  # Prefill and decoding steps scan one layer body; with the decoding step's layers
  # unrolled, 8 layers lowered to 2.1x the text of 2 (and compile time followed).
  shallow, deep = _lowered_generate_chars(2), _lowered_generate_chars(8)
  assert deep < 1.1 * shallow, (shallow, deep)


@pytest.mark.parametrize("new_tokens", [1, 5])
def test_cached_attention_matches_dot_product_attention(new_tokens):
  # Earlier slots and this call's own tokens under one softmax equal attention over both.
  B, S, H, kv, hd, T = 2, 8, 6, 2, 16, new_tokens
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, T, H, hd)).astype(np.float32)
  k, v = rng.normal(size=(2, B, S + T, kv, hd)).astype(np.float32)
  old_mask = (rng.random((B, 1, 1, S)) < 0.5) | (np.arange(S) == 0)
  new_mask = np.tril(np.ones((T, T), bool))[None, None].repeat(B, 0)
  mask = np.concatenate([np.broadcast_to(old_mask, (B, 1, T, S)), new_mask], axis=-1)
  ref = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=mask)
  # Slots as the cache stores them: keys [B, kv, hd, S], values [B, kv, S, hd].
  got = jax.jit(llama._cached_attention)(
      q, k[:, :S].transpose(0, 2, 3, 1), v[:, :S].transpose(0, 2, 1, 3), old_mask,
      k[:, S:], v[:, S:], new_mask)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_unrolled_layers_decode_the_same_tokens(sharp_model):
  # Decoding follows `config.scan_layers`; unrolled, every cache slot index is static.
  config, graphdef, params, adapters = sharp_model
  unrolled, _ = llama.abstract_model(config.replace(scan_layers=False))
  tokens, mask = generation.left_pad([[7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]],
                                     pad_id=0)
  outs = [generation.generate(config, g, params, adapters, jnp.asarray(tokens),
                              jnp.asarray(mask), max_new_tokens=10, pad_id=96)[0]
          for g in (graphdef, unrolled)]
  assert len(set(np.asarray(outs[0]).ravel().tolist())) > 4, "outputs should vary"
  np.testing.assert_array_equal(*outs)


@pytest.mark.parametrize("length", [128, 300, 384])
def test_blocked_causal_attention_matches_dot_product_attention(length):
  # 384 = three blocks, each over the keys up to its end; 300 ends in a short block;
  # 128 = one block: the plain path.
  B, H, kv, hd = 2, 6, 2, 16
  rng = np.random.default_rng(1)
  q = rng.normal(size=(B, length, H, hd)).astype(np.float32)
  k, v = rng.normal(size=(2, B, length, kv, hd)).astype(np.float32)
  real = np.arange(length)[None] >= np.array([[0], [37]])   # row 1 left-padded
  causal = np.tril(np.ones((length, length), bool))
  mask = ((causal[None] & real[:, None, :]) | np.eye(length, dtype=bool)[None])[:, None]
  ref = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=mask)
  got = jax.jit(llama.causal_attention)(q, k, v, mask)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda q: (f(q, k, v, mask=mask) ** 2).sum())(q)
           for f in (jax.nn.dot_product_attention,
                     lambda q, k, v, mask: llama.causal_attention(q, k, v, mask))]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-4)


def test_row_budgets_stop_each_row_where_its_own_call_would(sharp_model):
  # One program for rows of different budgets: each row equals its own call's output.
  config, graphdef, params, adapters = sharp_model
  prompts = [[7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]
  tokens, mask = generation.left_pad(prompts, pad_id=0)
  out, lengths = generation.generate(config, graphdef, params, adapters, jnp.asarray(tokens),
                                     jnp.asarray(mask), max_new_tokens=9, pad_id=96,
                                     row_budgets=[3, 9, 5])
  assert np.asarray(lengths).tolist() == [3, 9, 5]
  for r, budget in enumerate([3, 9, 5]):
    one, _ = generation.generate(config, graphdef, params, adapters, jnp.asarray(tokens[r:r + 1]),
                                 jnp.asarray(mask[r:r + 1]), max_new_tokens=budget, pad_id=96)
    np.testing.assert_array_equal(np.asarray(out)[r, :budget], np.asarray(one)[0])
    assert (np.asarray(out)[r, budget:] == 96).all()
  with pytest.raises(ValueError, match="row_budgets"):
    generation.generate(config, graphdef, params, adapters, jnp.asarray(tokens),
                        jnp.asarray(mask), max_new_tokens=4, row_budgets=[3, 9, 5])


def test_a_prompt_fed_in_two_calls_through_the_cache_equals_one_full_forward(sharp_model):
  # The second call attends over the first call's cache slots and its own tokens (left
  # padding in row 1); a 300-token first call takes the blocked causal path.
  config, graphdef, params, adapters = sharp_model
  config = config.replace(max_position_embeddings=512)
  graphdef, _ = llama.abstract_model(config)
  rng = np.random.default_rng(5)
  tokens = rng.integers(3, config.vocab_size, (2, 340)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :20] = 0
  full, _ = llama.forward(graphdef, params, adapters, jnp.asarray(tokens),
                          attention_mask=jnp.asarray(mask))
  cache = llama.init_cache(config, 2, 352)
  first, cache = llama.forward(graphdef, params, adapters, jnp.asarray(tokens[:, :300]),
                               attention_mask=jnp.asarray(mask[:, :300]), cache=cache,
                               fresh_cache=True)
  second, cache = llama.forward(graphdef, params, adapters, jnp.asarray(tokens[:, 300:]),
                                attention_mask=jnp.asarray(mask[:, 300:]), cache=cache)
  got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], np.asarray(full)[real], rtol=1e-4, atol=1e-3)
  assert int(cache["index"]) == 340 and np.asarray(cache["valid"]).sum() == 680 - 20
