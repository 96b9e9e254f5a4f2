"""Quantized frozen bases (models/quant): NF4 is QLoRA's code book and bitsandbytes' bytes,
GGUF blocks decode as gguf-py decodes them, a quantized model computes exactly what a float
model holding the dequantized weights computes (logits, adapter gradients, vmapped
clients, fsdp shards), no dense copy of the base is kept in a training step, and settings
that cannot work are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora import comm
from models import gguf_checkpoint, gguf_export, llama, lora, quant
from models.config import LlamaConfig
from models.errors import CheckpointError, QuantizationError
from models.quant import _blocks
from tests.test_gguf import VOCAB, bpe_tokenizer  # noqa: F401 (a fixture)

CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2)
MODES = {"nf4": quant.QuantConfig("nf4"), "nf4_double": quant.QuantConfig("nf4", double_quant=True),
         "int8": quant.QuantConfig("int8", block_size=32)}
# One file holding every kept format, a float projection and an untied quantized head.
GGUF_TYPES = {"token_embd": "q8_0", "attn_q": "q4_0", "attn_k": "q4_1", "attn_v": "q8_0",
              "attn_output": "q4_0", "ffn_gate": "q4_1", "ffn_up": "f16", "ffn_down": "q8_0",
              "output": "q4_1"}


def _weights(shape, seed=0, scale=0.05):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _random_base(config=CONFIG, seed=0):
  """Random weights with norms away from 1, so a norm mix-up cannot pass."""
  graphdef, params = llama.init_model(config, seed=seed)
  params["final_norm"] = params["final_norm"] + 0.1
  return graphdef, params


def _adapter(config=CONFIG, seed=1):
  a = lora.init_adapter(config, lora.LoraSpec(rank=4, alpha=8.0), jax.random.key(seed))
  # B = 0 would make the adapter's A gradients vanish: give B values too.
  params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(seed + 1),
                                                               x.shape), a.params)
  return a.replace(params=params)


def _tokens(seed=0, shape=(2, 12), vocab=VOCAB):
  return jax.random.randint(jax.random.key(seed), shape, 3, vocab)


def _loss_and_grads(graphdef, base, adapter, tokens):
  def loss(a):
    logits, _ = llama.forward(graphdef, base, a, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), logits
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapter)
  return value, logits, grads.params


def _assert_close(a, b, atol, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# ---- the formats -----------------------------------------------------------------------


def test_nf4_code_book_is_the_normalised_normal_quantiles_of_the_qlora_definition():
  from jax.scipy.special import ndtri

  offset = 0.9677083  # QLoRA appendix E / bitsandbytes create_normal_map
  positive = ndtri(jnp.linspace(offset, 0.5, 9)[:-1])
  negative = -ndtri(jnp.linspace(offset, 0.5, 8)[:-1])
  values = jnp.sort(jnp.concatenate([positive, jnp.zeros(1), negative]))
  np.testing.assert_allclose(quant.NF4, values / jnp.max(values), atol=2e-7)
  assert quant.NF4[7] == 0.0 and quant.NF4[0] == -1.0 and quant.NF4[-1] == 1.0


def test_nf4_rounds_to_the_nearest_code_of_each_blocks_absmax_scaled_weights():
  w = _weights((6, 256), seed=3)
  w[1, 64:128] = 0.0  # an all-zero block decodes to zeros
  codes, absmax = _blocks.quantize_nf4(jnp.asarray(w), 64)
  blocks = w.reshape(6, 4, 64)
  want_absmax = np.abs(blocks).max(-1)
  normed = blocks / np.where(want_absmax == 0, 1, want_absmax)[..., None]
  want = np.abs(normed[..., None] - quant.NF4).argmin(-1).reshape(6, 256)
  np.testing.assert_array_equal(np.asarray(absmax), want_absmax)
  np.testing.assert_array_equal(np.asarray(_blocks.unpack_pairs(codes)), want)
  assert codes.dtype == jnp.uint8 and codes.shape == (6, 128)  # two codes per byte
  decoded = quant.NF4[want].reshape(6, 4, 64) * want_absmax[..., None]
  np.testing.assert_array_equal(np.asarray(_blocks.values("nf4", 64, codes, absmax)),
                                decoded.reshape(6, 256))


def test_nf4_bytes_and_absmax_equal_bitsandbytes_quantize_4bit():
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes.functional")
  w = _weights((96, 256), seed=4)
  w[3, :64] = 0.0
  w[5, 128:192] *= 40.0  # blocks of very different scales
  q, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
  codes, absmax = _blocks.quantize_nf4(jnp.asarray(w), 64)
  np.testing.assert_array_equal(np.asarray(codes), q.numpy().reshape(96, 128))
  np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy().reshape(96, 4))
  np.testing.assert_array_equal(np.asarray(_blocks.values("nf4", 64, codes, absmax)),
                                bnb.dequantize_4bit(q, state).numpy())


def test_int8_is_symmetric_blockwise_absmax_over_127_levels():
  w = _weights((4, 128), seed=5)
  codes, scale = _blocks.quantize_int8(jnp.asarray(w), 32)
  blocks = w.reshape(4, 4, 32)
  want_scale = np.abs(blocks).max(-1) / 127
  np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-7)
  want = np.round(blocks / want_scale[..., None]).reshape(4, 128)
  np.testing.assert_array_equal(np.asarray(codes), want)
  error = np.asarray(_blocks.values("int8", 32, codes, scale)) - w
  assert np.all(np.abs(error).reshape(4, 4, 32) <= want_scale[..., None] / 2 * (1 + 1e-6))


def test_double_quantization_keeps_each_scale_within_float8_precision_of_its_block():
  scales = jnp.asarray(np.abs(_weights((96, 9), seed=6)) + 0.01)  # 864 scales: a ragged 256
  q, second, mean = _blocks.quantize_scales(scales)
  assert q.dtype == jnp.float8_e4m3fn and second.shape == (4,) and mean.shape == ()
  back = np.asarray(_blocks.dequantize_scales(q, second, mean))
  centred = np.asarray(scales - mean).reshape(-1)
  bound = np.repeat(np.asarray(second) * 448, 256)[:centred.size] * 2.0 ** -4  # 3 mantissa bits
  assert np.all(np.abs(back.reshape(-1) - np.asarray(scales).reshape(-1)) <= bound)
  assert np.abs(back - np.asarray(scales)).max() > 0  # it is lossy: the test can fail


@pytest.mark.parametrize("type_name", sorted(quant.GGUF_LAYOUTS))
def test_gguf_blocks_split_as_stored_decode_exactly_as_gguf_py_dequantizes(type_name):
  from gguf import GGMLQuantizationType, quants

  w = _weights((8, 128), seed=7)
  qtype = GGMLQuantizationType[type_name]
  raw = quants.quantize(w, qtype)
  parts = quant.split_gguf_rows(raw, type_name)
  assert sum(p.nbytes for p in parts.values()) == raw.nbytes  # the same bits, no more
  fmt, _ = quant.GGUF_LAYOUTS[type_name]
  ours = _blocks.values(fmt, 32, jnp.asarray(parts["codes"]), jnp.asarray(parts["scales"]),
                        None if "offsets" not in parts else jnp.asarray(parts["offsets"]))
  np.testing.assert_allclose(np.asarray(ours), quants.dequantize(raw, qtype), rtol=0,
                             atol=1e-7)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_each_dequantized_weight_lies_within_half_a_code_step_of_the_original(mode):
  # Against the original float weights in our [L, in, out] layout: a transposed or
  # misplaced block (square q_proj included) would be far outside its bound.
  qc = MODES[mode]
  _, base = _random_base()
  back = quant.dequantize_base(quant.quantize_base(base, qc))
  half_step = np.max(np.diff(quant.NF4)) / 2 if mode == "nf4" else 0.5 / 127
  for target in quant.PROJECTIONS:
    w = np.swapaxes(np.asarray(base["layers"][target]), -1, -2)  # [L, out, in]: blocks on in
    err = np.abs(np.swapaxes(np.asarray(back["layers"][target]), -1, -2) - w)
    blocks = lambda x: x.reshape(*x.shape[:-1], -1, qc.block_size)
    bound = half_step * np.abs(blocks(w)).max(-1, keepdims=True) * (1 + 1e-6)
    assert np.all(blocks(err) <= bound), target
    assert err.max() > 0


# ---- the model on a quantized base -----------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_quantized_model_logits_and_adapter_grads_equal_the_float_model_of_its_values(mode):
  graphdef, base = _random_base()
  packed = quant.quantize_base(base, MODES[mode])
  projections = lambda b: quant.base_bytes({k: b["layers"][k] for k in quant.PROJECTIONS})
  assert projections(packed) < projections(base) / 3  # float32: 4 bytes; int8 1.125; nf4 0.56
  dense = quant.dequantize_base(packed)
  adapter, tokens = _adapter(), _tokens()
  got = _loss_and_grads(graphdef, packed, adapter, tokens)
  want = _loss_and_grads(graphdef, dense, adapter, tokens)
  _assert_close(got, want, atol=2e-6)
  # ... and the quantization is real: the float model of the original weights differs.
  original = _loss_and_grads(graphdef, base, adapter, tokens)
  assert np.abs(np.asarray(original[1]) - np.asarray(got[1])).max() > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bytes_by_arithmetic_from_the_shapes_equal_the_bytes_held(dtype):
  graphdef, base = llama.init_model(CONFIG.replace(param_dtype=dtype))
  for qc in [quant.QuantConfig(), *MODES.values()]:
    packed = quant.quantize_base(base, qc)
    assert quant.base_bytes(packed) == quant.estimate_bytes(CONFIG, qc, dtype), qc
    # full fine-tuning's bytes (the communication baseline) stay those of the float model
    assert comm.model_bytes(packed) == comm.model_bytes(base)


def test_vmapped_clients_over_one_quantized_base_equal_per_client_calls():
  graphdef, base = _random_base()
  packed = quant.quantize_base(base, MODES["nf4"])
  adapters = [_adapter(seed=s) for s in (1, 5, 9)]
  tokens = jnp.stack([_tokens(seed=s) for s in (0, 1, 2)])
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *adapters)

  def grads(base, adapter, tokens):
    def loss(a):
      logits, _ = llama.forward(graphdef, base, a, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 5])
    return jax.value_and_grad(loss)(adapter)

  vmapped = jax.jit(jax.vmap(grads, in_axes=(None, 0, 0)))(packed, stacked, tokens)
  for k, adapter in enumerate(adapters):
    alone = jax.jit(grads)(packed, adapter, tokens[k])
    _assert_close(jax.tree.map(lambda x: x[k], vmapped), alone, atol=1e-6)


def test_a_training_step_keeps_no_dense_copy_of_the_quantized_projections():
  # 8 layers whose dense projections (18.9 MB float32) dwarf a [1, 16] batch's activations.
  # Saving each layer's dequantized weight for the backward pass (what plain autodiff
  # through the scan does: 25 MB of temporaries) would need more than all of them; the
  # custom VJP rebuilds each layer's weight instead (5.3 MB measured).
  config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=8,
                       num_heads=4, num_kv_heads=2)
  graphdef, base = llama.init_model(config)
  dense_bytes = sum(base["layers"][k].nbytes for k in quant.PROJECTIONS)
  packed = quant.quantize_base(base, MODES["nf4"])
  adapter = lora.init_adapter(config, lora.LoraSpec(rank=4), jax.random.key(0))
  tokens = jnp.zeros((1, 16), jnp.int32)
  loss = lambda a, b: jnp.mean(llama.forward(graphdef, b, a, tokens)[0])
  compiled = jax.jit(jax.grad(loss)).lower(adapter, packed).compile()
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes < dense_bytes / 3  # the packed base itself
  assert memory.temp_size_in_bytes < dense_bytes / 2


def test_fsdp_shards_the_quantized_rows_and_the_sharded_model_computes_the_same():
  from fedjax_lora import mesh as mesh_lib

  graphdef, base = _random_base()
  packed = quant.quantize_base(base, MODES["nf4"])
  mesh = mesh_lib.make_mesh(1, 4)
  sharded = mesh_lib.shard_base(packed, mesh)
  q = sharded["layers"]["q_proj"]
  rows = jax.sharding.PartitionSpec(None, "fsdp", None)
  assert q.codes.sharding.spec == rows and q.scales.sharding.spec == rows
  assert len({d for s in q.codes.addressable_shards for d in [s.device]}) == 4
  adapter, tokens = _adapter(), _tokens()
  _assert_close(_loss_and_grads(graphdef, sharded, adapter, tokens),
                _loss_and_grads(graphdef, packed, adapter, tokens), atol=1e-6)


# ---- GGUF keep ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory, bpe_tokenizer):  # noqa: F811 (the imported fixture)
  _, params = _random_base(CONFIG.replace(tie_word_embeddings=False))
  path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
  gguf_export.write_gguf(path, CONFIG, params, bpe_tokenizer, "f32",
                         tensor_types=lambda name: GGUF_TYPES.get(name.split(".")[-2]))
  return path


def test_gguf_keep_holds_the_files_blocks_and_computes_what_dequantize_on_load_does(mixed_gguf):
  _, graphdef, kept = gguf_checkpoint.load_params(mixed_gguf, quantize=quant.QuantConfig("keep"))
  _, graphdef2, loaded = gguf_checkpoint.load_params(mixed_gguf)
  assert quant.formats(kept) == {
      "embed": "q8_0", "lm_head": "q4_1", "layers.q_proj": "q4_0", "layers.k_proj": "q4_1",
      "layers.v_proj": "q8_0", "layers.o_proj": "q4_0", "layers.gate_proj": "q4_1",
      "layers.down_proj": "q8_0"}
  assert not isinstance(kept["layers"]["up_proj"], quant.QuantizedWeight)  # F16 in the file
  # The same values, held two ways (float rounding of d * q + m apart).
  _assert_close(quant.dequantize_base(kept), loaded, atol=1e-6)
  adapter, tokens = _adapter(), _tokens()
  _assert_close(_loss_and_grads(graphdef, kept, adapter, tokens),
                _loss_and_grads(graphdef2, loaded, adapter, tokens), atol=2e-6)


def test_gguf_keep_refuses_what_it_cannot_hold_naming_the_tensor(tmp_path, bpe_tokenizer,  # noqa: F811
                                                                  hf_llama):
  _, params = _random_base(CONFIG.replace(tie_word_embeddings=False))
  one_layer_q8 = tmp_path / "mixed_layers.gguf"
  gguf_export.write_gguf(one_layer_q8, CONFIG, params, bpe_tokenizer, "q4_0",
                         tensor_types=lambda n: "q8_0" if n == "blk.1.ffn_down.weight" else None)
  with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight is Q4_0 and "
                                            r"blk\.1\.ffn_down\.weight is Q8_0"):
    gguf_checkpoint.load_params(one_layer_q8, quantize=quant.QuantConfig("keep"))
  hf_dir, _ = hf_llama()
  from models import hf_checkpoint
  with pytest.raises(QuantizationError, match="HF checkpoint directory.*nf4 or int8"):
    hf_checkpoint.load_params(hf_dir, quantize=quant.QuantConfig("keep"))


def test_settings_that_cannot_work_are_named():
  with pytest.raises(QuantizationError, match="quantize='nf5'"):
    quant.QuantConfig("nf5")
  with pytest.raises(QuantizationError, match="quant_double_quant applies to quantize=nf4"):
    quant.QuantConfig("int8", double_quant=True)
  with pytest.raises(QuantizationError, match="quant_block_size=3"):
    quant.QuantConfig("nf4", block_size=3)
  with pytest.raises(QuantizationError, match="quant_block_size=32 applies to quantize=nf4"):
    quant.QuantConfig("keep", block_size=32)
  _, base = _random_base()
  with pytest.raises(QuantizationError, match=r"layers\.down_proj: 128 input features .* "
                                              r"quant_block_size=96"):
    quant.quantize_base(base, quant.QuantConfig("nf4", block_size=96))


def test_federation_configs_that_cannot_work_are_refused_naming_the_field():
  import configs.federate as federate_config
  from fedjax_lora import experiment
  from fedjax_lora.errors import ConfigError

  c = federate_config.get_config("tiny")
  c.model.quantize = "nf5"
  with pytest.raises(ConfigError, match=r"config\.model\.quantize='nf5': expected one of"):
    experiment.check_config(c)
  c.model.quantize, c.algorithm = "nf4", "flora"
  with pytest.raises(ConfigError, match="flora adds every round's update into the base"):
    experiment.check_config(c)
  c.model.quantize, c.algorithm = "keep", "fedavg"
  with pytest.raises(ConfigError, match="config.model.path is empty"):
    experiment.check_config(c)


def test_merging_into_a_quantized_base_dequantizes_it_first_and_says_so():
  _, base = _random_base()
  packed = quant.quantize_base(base, MODES["nf4"])
  adapter = _adapter()
  said = []
  merged = lora.merge_into_base(packed, adapter, log=said.append)
  assert said[0].startswith("merging into a quantized base") and "layers.q_proj nf4" in said[0]
  assert not quant.is_quantized(merged)
  _assert_close(merged, lora.merge_into_base(quant.dequantize_base(packed), adapter), atol=0)


def test_quant_benchmark_writes_every_mode_it_measures(mixed_gguf, tmp_path):
  import json
  import os
  import subprocess
  import sys

  done = subprocess.run(
      [sys.executable, "-m", "launch.quant_benchmark", f"--base={mixed_gguf}",
       f"--out={tmp_path}", "--name=q", "--modes=nf4,gguf_keep", "--loss_steps=0",
       "--batch_size=1", "--seq_len=16", "--steps=1", "--repeats=1", "--clients=2"],
      capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"},
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr[-2000:]
  doc = json.loads((tmp_path / "q.json").read_text())
  assert list(doc["modes"]) == ["nf4", "gguf_keep"]
  assert doc["modes"]["nf4"]["base_bytes"] == quant.estimate_bytes(
      CONFIG.replace(tie_word_embeddings=False), quant.QuantConfig("nf4"), "bfloat16")
  assert doc["modes"]["gguf_keep"]["formats"]["layers.k_proj"] == "q4_1"
  for r in doc["modes"].values():
    assert r["train"]["tokens_per_s"] > 0 and r["memory_vmap_K2"]["peak_mb"] > 0
  assert "| nf4 |" in (tmp_path / "q.md").read_text()
  assert set(doc["arithmetic"]) == {"smollm2_135m", "llama3_2_1b", "llama3_8b"}


def test_merged_export_after_qlora_is_the_dequantized_base_plus_the_update(mixed_gguf, tmp_path):
  from models import peft_io

  qc = quant.QuantConfig("nf4", block_size=32)
  config, _, base = gguf_checkpoint.load_params(mixed_gguf)
  adapter = _adapter(config)
  adapter_dir = peft_io.export_adapter(tmp_path / "adapter", adapter, config.num_layers, "base")
  said = []
  out = gguf_export.merged_to_gguf(mixed_gguf, tmp_path / "merged.gguf", adapter_dir, "f32",
                                   log=said.append, quantize=qc)
  assert any(s.startswith("merging into a quantized base") and "(as peft's merge_and_unload "
             "does)" in s for s in said)
  _, _, merged = gguf_checkpoint.load_params(out)
  want = lora.merge_into_base(quant.quantize_base(base, qc), adapter)
  _assert_close(merged["layers"], want["layers"], atol=1e-6)
  # not the float base's merge: what the adapter was trained against differs from it
  plain = lora.merge_into_base(base, adapter)["layers"]["q_proj"]
  assert np.abs(np.asarray(plain) - np.asarray(merged["layers"]["q_proj"])).max() > 1e-4
  # no adapter: the base as the run held it, written as float
  said.clear()
  out = gguf_export.merged_to_gguf(mixed_gguf, tmp_path / "base.gguf", None, "f32",
                                   log=said.append, quantize=qc)
  assert any(s.startswith("writing a quantized base") for s in said)
  _assert_close(gguf_checkpoint.load_params(out)[2]["layers"],
                quant.dequantize_base(quant.quantize_base(base, qc))["layers"], atol=1e-6)
