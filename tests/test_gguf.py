"""GGUF export and conversion: files we write read back in transformers, in llama.cpp (when
llama-cpp-python is installed) and in our loader, merged fine-tuned models survive
F32/F16/BF16/Q8_0 storage, GGUF -> HF directories load in transformers and peft, and bad
files fail with one error naming the file and the key."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gguf_checkpoint, gguf_export, hf_checkpoint, llama, peft_io
from models import lora as lora_lib
from models.config import LlamaConfig
from models.hf_checkpoint import CheckpointError

VOCAB = 320  # the tokenizer's ~300 ids plus unused padding ids, as llama.cpp pads
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["Patient denies chest pain and shortness of breath.",
          "Started lisinopril 10 mg daily; BP 140/90 at follow-up.",
          "No known drug allergies. Metformin 500 mg twice daily.",
          "The patient reports headache, nausea and dizziness since Monday."] * 8
TEXT = "Patient reports <think>chest pain</think> on lisinopril 10 mg. Ünïcödé ✓"
TEXTS = (TEXT, "<|im_start|>user\nhi<|im_end|>", "  two  spaces\n\nand 1234 don't")
# One file holds F32, F16, Q8_0 and Q4_1 matrices (norms are F32 anyway).
MIXED = {"token_embd": "q8_0", "attn_q": "q4_1", "attn_k": "f16", "attn_v": "q8_0",
         "attn_output": "f32", "ffn_gate": "q4_1", "ffn_up": "f16", "ffn_down": "q8_0",
         "output": "q4_1"}
# Llama-3.1's RoPE scaling: the parameters gguf_checkpoint recognises from rope_freqs.weight.
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192.0}


def mixed_types(name):
  return MIXED.get(name.split(".")[-2])


@pytest.fixture(scope="module")
def bpe_tokenizer():
  """A small trained byte-level BPE (GPT-2 split) with ChatML specials and a user token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>", chat_template=CHATML)
  wrapped.add_tokens(["<think>", "</think>"])  # user-defined (not special) added tokens
  assert len(wrapped) <= VOCAB
  return wrapped


def tiny_config(**overrides):
  kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
  return LlamaConfig(**{**kwargs, **overrides})


def _tokens(seed=0, shape=(2, 12)):
  return np.random.default_rng(seed).integers(3, VOCAB, size=shape)


# One compilation per model shape: files read back give equal graphdefs.
_forward = jax.jit(llama.forward, static_argnums=0)


def _logits(graphdef, params, tokens, adapters=()):
  logits, _ = _forward(graphdef, params, adapters, jnp.asarray(tokens))
  return np.asarray(logits)


def _random_model(config, seed=0):
  """(graphdef, params): normal(0, 0.02) weights, norms near 1 (perturbed so a norm mix-up
  shows). Drawn in numpy: eager jax.random would compile once per shape."""
  graphdef, abstract = llama.abstract_model(config)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
    return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), jnp.float32)
  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def _random_adapter(config, seed=0, rank=4, alpha=8.0):
  """A LoRA adapter on every target with non-zero B, as after fine-tuning."""
  spec = lora_lib.LoraSpec(rank=rank, alpha=alpha)
  rng = np.random.default_rng(seed)
  params = {}
  for target in spec.targets:
    fan_in, fan_out = lora_lib.projection_shape(config, target)
    params[target] = {
        "a": jnp.asarray(rng.uniform(-1, 1, (config.num_layers, fan_in, rank)) / np.sqrt(fan_in),
                         jnp.float32),
        "b": jnp.asarray(0.05 * rng.standard_normal((config.num_layers, rank, fan_out)),
                         jnp.float32)}
  return lora_lib.LoraAdapter(params=params, spec=spec)


def _hf_gguf_model(path):
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _torch_logits(model, tokens):
  import torch

  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens)).logits.numpy()


# ---- transformers reads our files ------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_reads_mixed_type_gguf(hf_llama, tmp_path, bpe_tokenizer, kv_heads, tied):
  import gguf

  path, _ = hf_llama(vocab_size=VOCAB, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
  config, _, params = hf_checkpoint.load_params(path)
  out = gguf_export.write_gguf(tmp_path / "mixed.gguf", config, params, bpe_tokenizer,
                               tensor_types=mixed_types)
  written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
  assert {"F32", "F16", "Q8_0", "Q4_1"} <= set(written.values())
  for name, kind in written.items():
    assert kind == (mixed_types(name) or "f32").upper(), name
  assert ("output.weight" in written) != tied

  config2, graphdef, ours = gguf_checkpoint.load_params(out)
  assert (config2.num_kv_heads, config2.tie_word_embeddings) == (kv_heads, tied)
  tokens = _tokens()
  theirs = _torch_logits(_hf_gguf_model(out), tokens)
  np.testing.assert_allclose(_logits(graphdef, ours, tokens), theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads,tied", [(2, False), (1, True)])
def test_llama_cpp_reads_our_gguf(tmp_path, bpe_tokenizer, kv_heads, tied):
  """llama.cpp itself (llama-cpp-python, when installed): same logits and token ids."""
  llama_cpp = pytest.importorskip("llama_cpp")

  config = tiny_config(num_kv_heads=kv_heads, tie_word_embeddings=tied,
                       rope_scaling=LLAMA3_ROPE if tied else None)
  graphdef, params = _random_model(config, seed=kv_heads)
  out = gguf_export.write_gguf(tmp_path / "m.gguf", config, params, bpe_tokenizer, "f32")
  tokens = _tokens(shape=(1, 16))
  # F32 KV cache (type 0): llama.cpp's default F16 cache alone moves logits by ~2e-4.
  model = llama_cpp.Llama(str(out), logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                          type_k=0, type_v=0, verbose=False)
  model.eval(tokens[0].tolist())
  theirs = np.asarray(model.scores[:tokens.shape[1]])
  np.testing.assert_allclose(theirs, _logits(graphdef, params, tokens)[0], atol=1e-5)
  for text in TEXTS:
    ids = model.tokenize(text.encode(), add_bos=True, special=True)
    assert ids == bpe_tokenizer(text)["input_ids"], text


def test_tokenizer_roundtrips_through_gguf(tmp_path, bpe_tokenizer):
  config = tiny_config()
  _, params = _random_model(config)
  out = gguf_export.write_gguf(tmp_path / "t.gguf", config, params, bpe_tokenizer)
  meta = gguf_checkpoint.metadata(gguf_checkpoint.open_reader(out))
  assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
  assert meta["tokenizer.ggml.add_bos_token"] and not meta["tokenizer.ggml.add_eos_token"]
  types = meta["tokenizer.ggml.token_type"]
  vocab = bpe_tokenizer.get_vocab()
  assert [types[vocab[t]] for t in SPECIALS] == [gguf_export.CONTROL] * len(SPECIALS)
  assert types[vocab["<think>"]] == gguf_export.USER_DEFINED
  assert types[-1] == gguf_export.UNUSED and meta["tokenizer.ggml.tokens"][-1] == f"[PAD{VOCAB - 1}]"

  back = gguf_checkpoint.load_tokenizer(out)
  assert back.chat_template == CHATML
  assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 0)
  for text in TEXTS:
    assert back(text)["input_ids"] == bpe_tokenizer(text)["input_ids"], text
  chat = [{"role": "user", "content": "BP 140/90?"}]
  assert (back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
          == bpe_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


# ---- merged fine-tuned models, exported and read back ----------------------------------

def test_merged_export_reads_back(tmp_path, bpe_tokenizer):
  from gguf import GGMLQuantizationType, quants

  config = tiny_config()
  graphdef, base = _random_model(config, seed=3)
  adapter = _random_adapter(config)
  merged = lora_lib.merge_into_base(base, adapter)
  tokens = _tokens()
  want = _logits(graphdef, merged, tokens)
  effect = np.abs(want - _logits(graphdef, base, tokens)).max()
  assert effect > 0.1, "adapter had no effect"
  np.testing.assert_allclose(want, _logits(graphdef, base, tokens, [adapter]), atol=1e-5)
  expected = gguf_export.llama_tensors(config, merged)
  scale = np.abs(want).max()
  # Storage error on logits relative to their scale, about 4x (F16), 3x (BF16, Q8_0) what
  # was measured (6e-4, 3.5e-3, 1.6e-2); a Q/K permutation or transposition error is of
  # order 1. Q4_0 (measured 0.23) is checked for the stored values only.
  bounds = {"f32": 1e-5 / scale, "f16": 2.5e-3, "bf16": 1e-2, "q8_0": 5e-2, "q4_0": None}
  for kind, bound in bounds.items():
    out = gguf_export.write_gguf(tmp_path / f"merged_{kind}.gguf", config, merged, bpe_tokenizer,
                                 kind)
    _, graphdef2, back = gguf_checkpoint.load_params(out)
    if bound is not None:
      error = np.abs(_logits(graphdef2, back, tokens) - want).max()
      assert error <= bound * scale, (kind, error / scale)
      assert error < 0.05 * effect, "the fine-tune must survive the storage"
    # Exactly the stored values: each tensor quantized and dequantized by gguf-py.
    qtype = GGMLQuantizationType[kind.upper()]
    for name, array in gguf_export.llama_tensors(config, back).items():
      stored = expected[name] if array.ndim == 1 else quants.dequantize(
          quants.quantize(expected[name], qtype), qtype)
      np.testing.assert_array_equal(array, stored, err_msg=f"{kind} {name}")


def test_llama3_rope_scaling_roundtrips(tmp_path, bpe_tokenizer):
  config = tiny_config(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True)
  graphdef, params = _random_model(config, seed=1)
  out = gguf_export.write_gguf(tmp_path / "rope.gguf", config, params, bpe_tokenizer, "f32")
  tensors = {t.name: t for t in gguf_checkpoint.open_reader(out).tensors}
  assert tensors["rope_freqs.weight"].tensor_type.name == "F32"
  assert "output.weight" not in tensors
  back_config, graphdef2, back = gguf_checkpoint.load_params(out)
  assert back_config.rope_scaling == config.rope_scaling
  tokens = _tokens()
  np.testing.assert_allclose(_logits(graphdef2, back, tokens), _logits(graphdef, params, tokens),
                             atol=1e-5)


def test_rows_not_filling_blocks_fall_back_to_f16(tmp_path, bpe_tokenizer):
  config = tiny_config(hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=2)
  graphdef, params = _random_model(config)
  messages = []
  out = gguf_export.write_gguf(tmp_path / "odd.gguf", config, params, bpe_tokenizer, "q8_0",
                               log=messages.append)
  written = {t.name: t.tensor_type.name for t in gguf_checkpoint.open_reader(out).tensors}
  assert written["blk.0.attn_q.weight"] == "F16"  # rows of 48 inputs: not whole 32-blocks
  assert written["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96 inputs
  assert any("blk.0.attn_q.weight" in m and "F16" in m for m in messages)
  _, graphdef2, back = gguf_checkpoint.load_params(out)
  tokens = _tokens()
  np.testing.assert_allclose(_logits(graphdef2, back, tokens), _logits(graphdef, params, tokens),
                             atol=0.02 * np.abs(_logits(graphdef, params, tokens)).max())


# ---- GGUF -> HF directory --------------------------------------------------------------

def test_gguf_to_hf_dir_loads_in_transformers_and_peft(hf_llama, tmp_path, bpe_tokenizer):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers
  from safetensors import safe_open

  path, _ = hf_llama(vocab_size=VOCAB, num_key_value_heads=2)
  config, _, params = hf_checkpoint.load_params(path)
  src = gguf_export.write_gguf(tmp_path / "src.gguf", config, params, bpe_tokenizer,
                               tensor_types=mixed_types)
  out = gguf_export.gguf_to_hf_dir(src, tmp_path / "hf")
  gguf_config, graphdef, ours = gguf_checkpoint.load_params(src)
  model = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
  tokens = _tokens()
  np.testing.assert_allclose(_torch_logits(model, tokens), _logits(graphdef, ours, tokens),
                             rtol=1e-4, atol=1e-4)

  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.chat_template == CHATML
  assert tok(TEXT)["input_ids"] == bpe_tokenizer(TEXT)["input_ids"]
  generation = json.loads((out / "generation_config.json").read_text())
  vocab = bpe_tokenizer.get_vocab()
  assert generation["eos_token_id"] == [vocab["</s>"], vocab["<|im_end|>"]]
  assert generation["bos_token_id"] == vocab["<s>"]

  adapter = _random_adapter(gguf_config)
  adapter_dir = peft_io.export_adapter(tmp_path / "adapter", adapter, gguf_config.num_layers)
  peft_model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, _logits(graphdef, ours, tokens, [adapter]),
                             rtol=1e-4, atol=1e-4)

  bf16 = gguf_export.gguf_to_hf_dir(src, tmp_path / "hf_bf16", dtype="bfloat16")
  assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with safe_open(bf16 / "model.safetensors", framework="numpy") as f:
    q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
  assert q.dtype.name == "bfloat16"
  np.testing.assert_array_equal(q, np.asarray(ours["layers"]["q_proj"][1].T, q.dtype))


def test_merged_to_gguf_from_hf_dir_and_from_gguf(tmp_path, bpe_tokenizer):
  config = tiny_config()
  graphdef, base = _random_model(config, seed=2)
  hf_dir = hf_checkpoint.save_params(tmp_path / "base", config, base)
  bpe_tokenizer.save_pretrained(str(hf_dir))
  adapter = _random_adapter(config)
  adapter_dir = peft_io.export_adapter(tmp_path / "adapter", adapter, config.num_layers)
  tokens = _tokens()
  want = _logits(graphdef, base, tokens, [adapter])
  messages = []
  from_hf = gguf_export.merged_to_gguf(hf_dir, tmp_path / "a.gguf", adapter_dir, "f32",
                                       log=messages.append)
  assert any("rank 4, alpha 8" in m for m in messages)
  # A GGUF base keeps its name and tokenizer fields; the second merge adds the adapter again.
  from_gguf = gguf_export.merged_to_gguf(from_hf, tmp_path / "b.gguf", adapter_dir, "f32",
                                         log=messages.append)
  # transformers' GGUF tokenizer adds "<|endoftext|>" past the vocabulary; it is left out.
  assert any("<|endoftext|>" in m and "left out" in m for m in messages)
  first, second = (gguf_checkpoint.metadata(gguf_checkpoint.open_reader(p))
                   for p in (from_hf, from_gguf))
  tokenizer_keys = [k for k in first if k.startswith("tokenizer.")]
  assert len(tokenizer_keys) >= 10 and "tokenizer.ggml.unknown_token_id" not in first
  assert {k: second.get(k) for k in tokenizer_keys} == {k: first[k] for k in tokenizer_keys}
  assert second["general.name"] == "base"
  _, graphdef_a, a = gguf_checkpoint.load_params(from_hf)
  np.testing.assert_allclose(_logits(graphdef_a, a, tokens), want, atol=1e-5)
  twice = lora_lib.merge_into_base(lora_lib.merge_into_base(base, adapter), adapter)
  _, graphdef_b, b = gguf_checkpoint.load_params(from_gguf)
  np.testing.assert_allclose(_logits(graphdef_b, b, tokens), _logits(graphdef, twice, tokens),
                             atol=1e-5)


# ---- bad input -------------------------------------------------------------------------

@pytest.fixture
def good_gguf(tmp_path, bpe_tokenizer):
  config = tiny_config()
  _, params = _random_model(config)
  tensors = gguf_export.llama_tensors(config, params)

  def write(name, drop=(), replace=None):
    chosen = {k: v for k, v in tensors.items() if k not in drop}
    chosen.update(replace or {})
    return gguf_export.write_gguf_tensors(tmp_path / name, config, chosen, bpe_tokenizer, "f32")
  return write


def _raises(path, *fragments):
  with pytest.raises(CheckpointError) as info:
    gguf_export.gguf_to_hf_dir(path, path.parent / "hf_out")
  message = str(info.value)
  assert "\n" not in message and str(path) in message, message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_bad_files_name_the_file_and_the_key(tmp_path, good_gguf):
  import gguf

  text = tmp_path / "notes.gguf"
  text.write_text("not a model")
  _raises(text, "not a GGUF file")
  _raises(tmp_path / "absent.gguf", "no such GGUF file")

  whole = good_gguf("whole.gguf").read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(whole[:len(whole) // 2])
  _raises(cut, "truncated")

  foreign = tmp_path / "gpt2.gguf"
  writer = gguf.GGUFWriter(foreign, "gpt2")
  writer.add_block_count(2)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  _raises(foreign, "general.architecture='gpt2'")

  bare = tmp_path / "bare.gguf"
  writer = gguf.GGUFWriter(bare, "llama")
  writer.add_block_count(2)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  _raises(bare, "missing metadata key llama.embedding_length")

  _raises(good_gguf("missing.gguf", drop=["blk.1.ffn_up.weight"]), "blk.1.ffn_up.weight",
          "missing tensors")
  _raises(good_gguf("shape.gguf", replace={"blk.0.attn_k.weight": np.zeros((64, 64), np.float32)}),
          "blk.0.attn_k.weight", "(64, 64)", "(32, 64)")


def test_unsupported_tokenizers_are_named(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from models.tokenizer import build_byte_tokenizer

  config = tiny_config(vocab_size=272)
  _, params = _random_model(config)
  no_merges = build_byte_tokenizer(tmp_path / "bytes")
  with pytest.raises(CheckpointError, match=r"model\.merges is empty.*supported: byte-level BPE"):
    gguf_export.write_gguf(tmp_path / "x.gguf", config, params, no_merges)
  sentencepiece = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1, "▁": 2, "a": 3},
                                       merges=[("▁", "a")], byte_fallback=True))
  sentencepiece.pre_tokenizer = pre_tokenizers.Metaspace()
  with pytest.raises(CheckpointError, match=r"pre_tokenizer='Metaspace' is not byte-level"):
    gguf_export.write_gguf(tmp_path / "x.gguf", config, params,
                           PreTrainedTokenizerFast(tokenizer_object=sentencepiece))
  assert not (tmp_path / "x.gguf").exists()


def test_cli_bad_base_is_one_error_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "launch.convert", "--to=gguf", f"--base={tmp_path / 'nope'}",
       f"--out={tmp_path / 'out.gguf'}"], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and str(tmp_path / "nope") in errors[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out.gguf").exists()
