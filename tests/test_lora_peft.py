"""LoRA parity with peft: logits, gradients of A and B, export to and import from PEFT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peft parity needs the [torch] extra")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402

from fedjax_lora.losses import causal_lm_loss
from models import hf_checkpoint, llama, peft_io
from models import lora as lora_lib

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _inputs(seed=0, shape=(2, 12), pad_from=8):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 256, size=shape)
  mask = np.ones(shape, np.int64)
  mask[1, pad_from:] = 0
  tokens[1, pad_from:] = 0
  return tokens, mask


def _peft_model(hf_llama, tmp_path, **lora_kwargs):
  """A tiny HF model wrapped by peft with random (non-zero) A and B, saved with peft."""
  path, base = hf_llama(num_key_value_heads=2)
  kwargs = dict(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False, lora_dropout=0.0)
  kwargs.update(lora_kwargs)
  torch.manual_seed(1)
  model = peft.get_peft_model(base, peft.LoraConfig(**kwargs)).eval()
  model.save_pretrained(tmp_path / "peft_adapter")
  return path, model, tmp_path / "peft_adapter"


def _torch_loss_and_grads(model, tokens, mask):
  labels = torch.tensor(np.where(mask == 1, tokens, -100))
  model.zero_grad()
  out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), labels=labels)
  out.loss.backward()
  grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if "lora_" in n}
  return out.logits.detach().numpy(), out.loss.item(), grads


def _jax_loss(graphdef, params, adapter, tokens, mask):
  logits, _ = llama.forward(graphdef, params, [adapter], tokens, attention_mask=mask)
  return causal_lm_loss(logits, tokens, mask)[0], logits


@pytest.mark.parametrize("lora_kwargs", [
    {},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1],
     "layers_pattern": "layers"},
])
def test_logits_and_grads_match_peft(hf_llama, tmp_path, lora_kwargs):
  path, model, adapter_dir = _peft_model(hf_llama, tmp_path, **lora_kwargs)
  config, graphdef, params = hf_checkpoint.load_params(path)
  adapter = peft_io.import_adapter(adapter_dir, config)
  if "layers_to_transform" in lora_kwargs:
    assert adapter.spec.layers == (1,)
    assert adapter.spec.targets == ("q_proj", "v_proj", "down_proj")
  assert float(jnp.abs(adapter.params["q_proj"]["b"]).max()) > 0, "B must be non-trivial"

  tokens, mask = _inputs()
  ref_logits, ref_loss, ref_grads = _torch_loss_and_grads(model, tokens, mask)
  (loss, logits), grads = jax.value_and_grad(
      lambda a: _jax_loss(graphdef, params, a, jnp.asarray(tokens), jnp.asarray(mask)),
      has_aux=True)(adapter)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], ref_logits[real], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)

  layers = adapter.spec.layer_indices(config.num_layers)
  for target in adapter.spec.targets:
    for slot, layer in enumerate(layers):
      group = "self_attn" if target in lora_lib.ATTENTION_TARGETS else "mlp"
      prefix = f"base_model.model.model.layers.{layer}.{group}.{target}"
      np.testing.assert_allclose(np.asarray(grads.params[target]["a"][slot]),
                                 ref_grads[f"{prefix}.lora_A.default.weight"].T, atol=1e-5, rtol=1e-4)
      np.testing.assert_allclose(np.asarray(grads.params[target]["b"][slot]),
                                 ref_grads[f"{prefix}.lora_B.default.weight"].T, atol=1e-5, rtol=1e-4)


def test_export_loads_in_peft_and_import_roundtrips(hf_llama, tmp_path):
  path, _ = hf_llama(num_key_value_heads=2)
  config, graphdef, params = hf_checkpoint.load_params(path)
  spec = lora_lib.LoraSpec(rank=4, alpha=16, targets=("q", "k", "o", "up"), layers=(0,))
  adapter = lora_lib.init_adapter(config, spec, jax.random.key(0))
  # Non-zero B so the adapter changes the output.
  adapter = adapter.replace(params=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter.params))
  out = peft_io.export_adapter(tmp_path / "ours", adapter, config.num_layers, str(path))

  base = transformers.LlamaForCausalLM.from_pretrained(path).float().eval()
  model = peft.PeftModel.from_pretrained(base, out).eval()
  tokens, mask = _inputs()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  ours, _ = llama.forward(graphdef, params, [adapter], jnp.asarray(tokens),
                          attention_mask=jnp.asarray(mask))
  plain, _ = llama.forward(graphdef, params, [], jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  assert np.abs(np.asarray(plain) - np.asarray(ours))[real].max() > 1e-3, "adapter had no effect"
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], rtol=1e-4, atol=1e-4)

  back = peft_io.import_adapter(out, config)
  assert back.spec == adapter.spec
  explicit = adapter.replace(spec=lora_lib.LoraSpec(rank=4, alpha=16, targets=spec.targets,
                                                    layers=(0, 1)))
  explicit = explicit.replace(params=jax.tree.map(lambda x: jnp.concatenate([x, x]),
                                                  adapter.params))
  out2 = peft_io.export_adapter(tmp_path / "explicit", explicit, config.num_layers)
  assert peft_io.import_adapter(out2, config).spec == explicit.spec
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               adapter.params, back.params)


def test_mismatched_adapter_is_rejected_by_name(hf_llama, tmp_path):
  small_path, _ = hf_llama(num_key_value_heads=2)
  wide_path, _ = hf_llama(num_key_value_heads=2, hidden_size=96, intermediate_size=160)
  small = hf_checkpoint.load_config(small_path)
  wide = hf_checkpoint.load_config(wide_path)
  adapter = lora_lib.init_adapter(wide, lora_lib.LoraSpec(rank=4, alpha=8), jax.random.key(0))
  out = peft_io.export_adapter(tmp_path / "wide", adapter, wide.num_layers)
  with pytest.raises(peft_io.AdapterError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape"):
    peft_io.import_adapter(out, small)
  with pytest.raises(ValueError, match=r"q_proj\.a has shape"):
    lora_lib.check_adapter(small, adapter)
