"""PEFT LoRA adapter directories <-> `LoraAdapter`.

Layout written: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.model.layers.{i}.{self_attn|mlp}.{target}.lora_{A|B}.weight`, torch
layout (A [r, in], B [out, r]); ours is A [in, r], B [r, out], so conversion is transposes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from models import lora as lora_lib
from models.config import LlamaConfig
from models.errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\."
                  r"lora_(A|B)(?:\.[\w-]+)?\.weight")


def _group(target: str) -> str:
  return "self_attn" if target in lora_lib.ATTENTION_TARGETS else "mlp"


def peft_key(layer: int, target: str, which: str) -> str:
  return f"base_model.model.model.layers.{layer}.{_group(target)}.{target}.lora_{which}.weight"


def export_adapter(out_dir: str | os.PathLike, adapter: lora_lib.LoraAdapter, num_layers: int,
                   base_model_name_or_path: str | None = None) -> Path:
  """Writes a PEFT LoRA directory that `PeftModel.from_pretrained` loads."""
  spec = adapter.spec
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  layers = spec.layer_indices(num_layers)
  host = jax.device_get(adapter.params)
  tensors = {}
  for target, ab in host.items():
    a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
    if a.ndim != 3:
      raise AdapterError(f"export expects one adapter [layers, in, r]; {target}.a has shape "
                         f"{a.shape} (select a client before exporting)")
    if a.shape[0] != len(layers) or b.shape[0] != len(layers):
      raise AdapterError(f"{target}: adapter holds {a.shape[0]} layers but num_layers="
                         f"{num_layers} and spec.layers={spec.layers} give {len(layers)}")
    for slot, layer in enumerate(layers):
      tensors[peft_key(layer, target, "A")] = np.ascontiguousarray(a[slot].T)
      tensors[peft_key(layer, target, "B")] = np.ascontiguousarray(b[slot].T)
  save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": spec.rank,
      "lora_alpha": spec.alpha,
      "lora_dropout": spec.dropout,
      "target_modules": list(spec.targets),
      "layers_to_transform": None if spec.layers is None else list(spec.layers),
      "layers_pattern": None if spec.layers is None else "layers",
      "bias": "none",
      "use_rslora": spec.use_rslora,
      "use_dora": False,
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "modules_to_save": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path,
  }
  (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
  return out


def _read_config(path: Path) -> dict:
  if not path.is_file():
    raise AdapterError(f"{path}: missing (a PEFT adapter directory needs {ADAPTER_CONFIG})")
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise AdapterError(f"{path}: not valid JSON ({e})") from None

  def unsupported(field, why):
    raise AdapterError(f"{path}: unsupported {field}={cfg.get(field)!r}: {why}")

  if cfg.get("peft_type", "LORA") != "LORA":
    unsupported("peft_type", "only LORA adapters are supported")
  for field in ("use_dora", "fan_in_fan_out"):
    if cfg.get(field):
      unsupported(field, "not implemented")
  if cfg.get("bias", "none") != "none":
    unsupported("bias", "LoRA bias terms are not implemented")
  if cfg.get("modules_to_save"):
    unsupported("modules_to_save", "only LoRA factors are imported")
  for field in ("rank_pattern", "alpha_pattern"):
    if cfg.get(field):
      unsupported(field, "per-module ranks/alphas are not implemented")
  for field in ("r", "lora_alpha"):
    if field not in cfg:
      raise AdapterError(f"{path}: missing field {field!r}")
  return cfg


def import_adapter(adapter_dir: str | os.PathLike, config: LlamaConfig,
                   dtype=jnp.float32) -> lora_lib.LoraAdapter:
  """Reads a PEFT LoRA directory into a `LoraAdapter`; checks every shape against `config`."""
  adapter_dir = Path(adapter_dir)
  cfg = _read_config(adapter_dir / ADAPTER_CONFIG)
  weights = adapter_dir / ADAPTER_WEIGHTS
  if not weights.is_file():
    raise AdapterError(f"{weights}: missing")
  found: dict[tuple[str, int, str], np.ndarray] = {}
  try:
    with safe_open(weights, framework="numpy") as f:
      for key in f.keys():
        m = _KEY.fullmatch(key)
        if m is None:
          raise AdapterError(f"{weights}: tensor {key!r} is not a LLaMA LoRA factor "
                             f"(expected {peft_key(0, 'q_proj', 'A')} style names)")
        layer, _, target, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if layer >= config.num_layers:
          raise AdapterError(f"{weights}: tensor {key} is for layer {layer}, but the base "
                             f"model has {config.num_layers} layers")
        found[(target, layer, which)] = f.get_tensor(key)
  except (SafetensorError, OSError) as e:
    raise AdapterError(f"{weights}: unreadable safetensors file, truncated or corrupt ({e})") from None
  if not found:
    raise AdapterError(f"{weights}: contains no LoRA tensors")

  targets = tuple(t for t in lora_lib.ALL_TARGETS if any(k[0] == t for k in found))
  layers = tuple(sorted({k[1] for k in found}))
  rank = int(cfg["r"])
  declared = cfg.get("layers_to_transform")
  if isinstance(declared, int):
    declared = [declared]
  if declared is not None and tuple(sorted(declared)) != layers:
    raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG}: layers_to_transform={declared} but "
                       f"{weights.name} holds layers {list(layers)}")
  spec = lora_lib.LoraSpec(
      rank=rank, alpha=float(cfg["lora_alpha"]), targets=targets,
      # Keep the exporter's choice: an explicit list stays explicit, so specs round-trip.
      layers=None if declared is None and len(layers) == config.num_layers else layers,
      dropout=float(cfg.get("lora_dropout") or 0.0), use_rslora=bool(cfg.get("use_rslora")))
  params = {}
  for target in targets:
    fan_in, fan_out = lora_lib.projection_shape(config, target)
    a_list, b_list = [], []
    for layer in layers:
      for which, want in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
        key = peft_key(layer, target, which)
        if (target, layer, which) not in found:
          raise AdapterError(f"{weights}: {key} is missing (other layers of {target} have it)")
        got = tuple(found[(target, layer, which)].shape)
        if got != want:
          raise AdapterError(f"{weights}: {key} has shape {got}; the base model and r={rank} "
                             f"need {want}")
      a_list.append(found[(target, layer, "A")].T)
      b_list.append(found[(target, layer, "B")].T)
    params[target] = {"a": jnp.asarray(np.stack(a_list), dtype),
                      "b": jnp.asarray(np.stack(b_list), dtype)}
  return lora_lib.LoraAdapter(params=params, spec=spec)
