"""Bad checkpoints, configs and adapters raise errors that name the problem."""

import json

import numpy as np

import jax
import pytest
from safetensors.numpy import load_file, save_file

from models import hf_checkpoint, peft_io
from models import lora as lora_lib
from models.errors import ModelConfigError, UnsupportedConfigError


@pytest.fixture
def checkpoint(hf_llama):
  path, _ = hf_llama(num_key_value_heads=2)
  return path


def test_missing_safetensors(checkpoint):
  (checkpoint / "model.safetensors").unlink()
  with pytest.raises(hf_checkpoint.CheckpointError, match="no model.safetensors"):
    hf_checkpoint.load_params(checkpoint)


def test_truncated_safetensors_names_file(checkpoint):
  f = checkpoint / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"model\.safetensors: .*truncated"):
    hf_checkpoint.load_params(checkpoint)


def test_missing_shard_and_missing_tensor(checkpoint, tmp_path):
  config, _, params = hf_checkpoint.load_params(checkpoint)
  sharded = hf_checkpoint.save_params(tmp_path / "sharded", config, params, max_shard_bytes=60_000)
  shards = sorted(sharded.glob("model-*.safetensors"))
  shards[-1].unlink()
  with pytest.raises(hf_checkpoint.CheckpointError, match=f"{shards[-1].name}: shard listed"):
    hf_checkpoint.load_params(sharded)

  tensors = load_file(checkpoint / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
    hf_checkpoint.load_params(checkpoint)


def test_wrong_tensor_shape_names_tensor(checkpoint):
  cfg = json.loads((checkpoint / "config.json").read_text())
  cfg["intermediate_size"] = 96
  (checkpoint / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape \(\d+, \d+\); config.json implies"):
    hf_checkpoint.load_params(checkpoint)


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "mistral", "model_type='mistral'"),
    ("attention_bias", True, "attention_bias=True"),
    ("sliding_window", 4096, "sliding_window=4096"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
     "rope_parameters.rope_type='yarn'"),
])
def test_unsupported_config_names_field(checkpoint, field, value, message):
  cfg = json.loads((checkpoint / "config.json").read_text())
  cfg[field] = value
  (checkpoint / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedConfigError, match=f"config.json: unsupported {message}"):
    hf_checkpoint.load_params(checkpoint)


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(hf_checkpoint.CheckpointError, match="no such directory"):
    hf_checkpoint.load_params(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf_checkpoint.CheckpointError, match="config.json: missing"):
    hf_checkpoint.load_params(tmp_path / "empty")


def test_bad_adapter_configs(checkpoint, tmp_path):
  config = hf_checkpoint.load_config(checkpoint)
  adapter = lora_lib.init_adapter(config, lora_lib.LoraSpec(rank=4, alpha=8), jax.random.key(0))
  out = peft_io.export_adapter(tmp_path / "a", adapter, config.num_layers)
  cfg_path = out / peft_io.ADAPTER_CONFIG
  good = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**good, "use_dora": True}))
  with pytest.raises(peft_io.AdapterError, match="unsupported use_dora=True"):
    peft_io.import_adapter(out, config)
  cfg_path.write_text("{not json")
  with pytest.raises(peft_io.AdapterError, match="adapter_config.json: not valid JSON"):
    peft_io.import_adapter(out, config)
  cfg_path.write_text(json.dumps(good))
  tensors = load_file(out / peft_io.ADAPTER_WEIGHTS)
  del tensors[peft_io.peft_key(1, "v_proj", "B")]
  save_file(tensors, out / peft_io.ADAPTER_WEIGHTS)
  with pytest.raises(peft_io.AdapterError, match=r"layers\.1\.self_attn\.v_proj\.lora_B\.weight is missing"):
    peft_io.import_adapter(out, config)
  with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
    lora_lib.LoraSpec(targets=("qkv",))


def test_hub_id_offline_gives_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hf_checkpoint.CheckpointError, match="could not be downloaded"):
    hf_checkpoint.resolve_model_dir("meta-llama/Llama-3.2-1B")


def test_resave_replaces_old_layout_and_ambiguous_layout_is_rejected(checkpoint, tmp_path):
  config, _, params = hf_checkpoint.load_params(checkpoint)
  out = tmp_path / "resave"
  hf_checkpoint.save_params(out, config, params, max_shard_bytes=60_000)
  changed = jax.tree.map(lambda x: x + 1, params)
  hf_checkpoint.save_params(out, config, changed)  # single file now; old shards must go
  assert not (out / hf_checkpoint.INDEX_FILE).exists()
  assert not list(out.glob("model-*-of-*.safetensors"))
  _, _, again = hf_checkpoint.load_params(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               changed, again)
  (out / hf_checkpoint.INDEX_FILE).write_text("{}")
  with pytest.raises(hf_checkpoint.CheckpointError, match="both model.safetensors and"):
    hf_checkpoint.load_params(out)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("hidden_size"), r"missing required field\(s\) \['hidden_size'\]"),
    (lambda c: c.update(num_key_value_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
    (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "unsupported rope_scaling=.*disagrees with rope_parameters"),
    (lambda c: c.update(rope_parameters={**c["rope_parameters"], "partial_rotary_factor": 0.5}),
     "unsupported rope_parameters.partial_rotary_factor=0.5"),
])
def test_inconsistent_config_names_file_and_field(checkpoint, edit, message):
  cfg = json.loads((checkpoint / "config.json").read_text())
  edit(cfg)
  (checkpoint / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelConfigError, match=f"config.json: .*{message}"):
    hf_checkpoint.load_params(checkpoint)
