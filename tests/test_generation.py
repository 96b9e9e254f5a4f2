"""KV-cache decoding equals repeated full forward passes and transformers' greedy generate."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from models import generation, hf_checkpoint, llama
from models import lora as lora_lib
from models.config import LlamaConfig


def _reference_greedy(graphdef, params, adapters, prompt, n, eos):
  """Greedy decoding by re-running the full forward pass (no cache) on the growing sequence,
  right-padded to a fixed length so it compiles once."""
  full = jax.jit(lambda toks, m: llama.forward(graphdef, params, adapters, toks, attention_mask=m)[0])
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


def test_cache_decoding_matches_full_forward_and_batching():
  config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=1, eos_token_id=5)
  graphdef, params = llama.init_model(config, seed=3)
  params = jax.tree.map(lambda x: x * 4 if x.ndim == 3 else x, params)  # sharper logits
  adapter = lora_lib.init_adapter(config, lora_lib.LoraSpec(rank=2, alpha=4), jax.random.key(1))
  adapter = adapter.replace(params=jax.tree.map(lambda x: x + 0.3, adapter.params))
  prompts = [[7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]
  tokens, mask = generation.left_pad(prompts, pad_id=0)
  assert tokens.shape == (3, 16)
  out, lengths = generation.generate(config, graphdef, params, [adapter], jnp.asarray(tokens),
                                     jnp.asarray(mask), max_new_tokens=12, eos_ids=(5,))
  for i, p in enumerate(prompts):
    ref = _reference_greedy(graphdef, params, [adapter], p, 12, (5,))
    assert int(lengths[i]) == len(ref)
    assert np.asarray(out[i, :len(ref)]).tolist() == ref
    # One prompt at a time gives the same tokens as the padded batch.
    t1, m1 = generation.left_pad([p], pad_id=0)
    single, _ = generation.generate(config, graphdef, params, [adapter], jnp.asarray(t1),
                                    jnp.asarray(m1), max_new_tokens=12, eos_ids=(5,))
    np.testing.assert_array_equal(single[0], out[i])


def test_matches_transformers_generate(hf_llama):
  path, model = hf_llama(num_key_value_heads=2)
  config, graphdef, params = hf_checkpoint.load_params(path)
  prompts = [[11, 12, 13, 14, 15, 16], [40, 41, 42]]
  tokens, mask = generation.left_pad(prompts, pad_id=0, length=8)
  out, lengths = generation.generate(config, graphdef, params, (), jnp.asarray(tokens),
                                     jnp.asarray(mask), max_new_tokens=10,
                                     eos_ids=config.eos_ids)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long),
                         max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=config.eos_ids[0]).numpy()[:, 8:]
  for i in range(len(prompts)):
    n = int(lengths[i])
    assert np.asarray(out[i, :n]).tolist() == ref[i, :n].tolist()


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
