"""Hugging Face LLaMA checkpoints <-> our params, without torch.

Reads config.json and single or sharded safetensors (with model.safetensors.index.json)
straight into numpy/JAX in the requested dtype, and writes the same format back so
`transformers.LlamaForCausalLM.from_pretrained` loads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from models import llama, quant
from models.config import LlamaConfig
from models.errors import CheckpointError, QuantizationError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")

# HF key regex -> (our path inside the params dict, whether to transpose).
_LAYER = r"model\.layers\.(\d+)\."
KEY_TABLE: tuple[tuple[re.Pattern, tuple[str, ...], bool], ...] = tuple(
    (re.compile(pattern), path, transpose) for pattern, path, transpose in [
        (r"model\.embed_tokens\.weight", ("embed",), False),
        (r"model\.norm\.weight", ("final_norm",), False),
        (r"lm_head\.weight", ("lm_head",), True),
        (_LAYER + r"input_layernorm\.weight", ("layers", "attn_norm"), False),
        (_LAYER + r"post_attention_layernorm\.weight", ("layers", "mlp_norm"), False),
        (_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", ("layers", None), True),
        (_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", ("layers", None), True),
    ])
# Buffers some exporters include; they carry no learned weights.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def resolve_model_dir(name_or_path: str) -> Path:
  """A local directory, or a hub id downloaded (config, safetensors, tokenizer) when online."""
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
  if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is None:
    raise CheckpointError(f"{name_or_path}: no such directory")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
  except Exception as e:  # offline machines end here
    raise CheckpointError(f"{name_or_path}: not a local directory and could not be downloaded "
                          f"from the Hugging Face hub ({type(e).__name__}: {e})") from None


def load_config(model_dir: str | os.PathLike, **overrides) -> LlamaConfig:
  path = Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{path}: missing (every checkpoint directory needs a config.json)")
  return LlamaConfig.from_json_file(path, **overrides)


def generation_eos_ids(model_dir: str | os.PathLike) -> tuple[int, ...]:
  """EOS ids from generation_config.json (Llama-3 instruct models list several), if present."""
  path = Path(model_dir) / "generation_config.json"
  if not path.is_file():
    return ()
  try:
    eos = json.loads(path.read_text()).get("eos_token_id")
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _tensor_files(model_dir: Path) -> dict[str, Path]:
  """Map tensor name -> safetensors file, from the index or the single file."""
  index = model_dir / INDEX_FILE
  single = model_dir / SINGLE_FILE
  if index.is_file() and single.is_file():
    raise CheckpointError(f"{model_dir}: both {SINGLE_FILE} and {INDEX_FILE} exist, so it is "
                          "ambiguous which weights are current; remove the stale one")
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
    files = {name: model_dir / fname for name, fname in weight_map.items()}
    for f in sorted(set(files.values())):
      if not f.is_file():
        raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
    return files
  if not single.is_file():
    found = sorted(p.name for p in model_dir.iterdir())
    hint = (" (only PyTorch .bin weights found: convert them to safetensors)"
            if any(n.endswith(".bin") for n in found) else "")
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}; found {found}")
  try:
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{single}: unreadable safetensors file, truncated or corrupt ({e})") from None


def _read_tensors(files: dict[str, Path]):
  """Yields (name, numpy array), opening each file once; truncation names the file."""
  by_file: dict[Path, list[str]] = {}
  for name, f in files.items():
    by_file.setdefault(f, []).append(name)
  for f, names in by_file.items():
    try:
      with safe_open(f, framework="numpy") as handle:
        available = set(handle.keys())
        for name in names:
          if name not in available:
            raise CheckpointError(f"{f}: tensor {name!r} listed in the index is not in this shard")
          yield name, handle.get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None


def _route(name: str):
  """(path, layer index or None, transpose) for an HF tensor name, or None if unknown."""
  for pattern, path, transpose in KEY_TABLE:
    m = pattern.fullmatch(name)
    if m is None:
      continue
    if path[0] != "layers":
      return path, None, transpose
    layer = int(m.group(1))
    leaf = path[1] if path[1] is not None else m.group(2)
    return ("layers", leaf), layer, transpose
  return None


def load_params(model_dir: str | os.PathLike, config: LlamaConfig | None = None,
                log: Callable[[str], None] | None = None,
                quantize: "quant.QuantConfig | None" = None) -> tuple[LlamaConfig, object, dict]:
  """Loads (config, graphdef, params) in `config.param_dtype`; checks every shape and key.

  `quantize` (nf4 / int8) quantizes the projections leaf by leaf as they reach the device.
  """
  quantize = quantize or quant.QuantConfig()
  if quantize.mode == "keep":
    raise QuantizationError(f"{model_dir}: quantize=keep holds a GGUF file's blocks as stored; "
                            "this is an HF checkpoint directory of float weights. Use "
                            "quantize=nf4 or int8, or give the .gguf file")
  model_dir = resolve_model_dir(str(model_dir))
  config = config or load_config(model_dir)
  graphdef, abstract = llama.abstract_model(config)
  files = _tensor_files(model_dir)
  dtype = config.jnp_param_dtype
  L = config.num_layers
  # Stacked host buffers filled layer by layer: peak host memory ~ one copy of the model.
  stacked = {k: np.empty(v.shape, v.dtype) for k, v in abstract["layers"].items()}
  seen: set[str] = set()
  params: dict = {}
  unknown = []
  for name, array in _read_tensors(files):
    route = _route(name)
    if route is None:
      if not _IGNORED_KEYS.fullmatch(name):
        unknown.append(f"{name} (in {files[name].name})")
      continue
    path, layer, transpose = route
    if path == ("lm_head",) and config.tie_word_embeddings:
      continue  # some tied checkpoints still store the head; embeddings are authoritative
    if layer is not None and layer >= L:
      raise CheckpointError(f"{files[name]}: tensor {name} is for layer {layer}, "
                            f"but config.json has num_hidden_layers={L}")
    want = abstract[path[0]] if layer is None else abstract["layers"][path[1]]
    want_shape = tuple(want.shape if layer is None else want.shape[1:])
    if transpose:
      want_shape = want_shape[::-1]  # compare in the file's [out, in] layout
    if tuple(array.shape) != want_shape:
      raise CheckpointError(f"{files[name]}: tensor {name} has shape {tuple(array.shape)}; "
                            f"config.json implies {want_shape}")
    if transpose:
      array = array.T
    if layer is None:
      params[path[0]] = jnp.asarray(np.asarray(array).astype(dtype))
    else:
      stacked[path[1]][layer] = array  # casts into the buffer's dtype
    seen.add(name)
  if unknown:
    raise CheckpointError(f"{model_dir}: tensors this LLaMA implementation does not know: "
                          f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
  expected = [_hf_name(("layers", k), i) for k in stacked for i in range(L)]
  expected += [_hf_name((k,), None) for k in abstract if k != "layers"]
  missing = [name for name in expected if name not in seen]
  if missing:
    raise CheckpointError(f"{model_dir}: missing tensors {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  params["layers"] = quant.quantize_layers(stacked, quantize)
  if log:
    held = f", projections {quantize.describe()}" if quantize.active else ""
    log(f"loaded {config.num_params() / 1e6:.1f}M parameters from {model_dir} as {dtype}{held}")
  return config, graphdef, params


def _hf_name(path: tuple[str, ...], layer: int | None) -> str:
  if path[0] != "layers":
    return {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
            "lm_head": "lm_head.weight"}[path[0]]
  leaf = path[1]
  prefix = f"model.layers.{layer}."
  if leaf == "attn_norm":
    return prefix + "input_layernorm.weight"
  if leaf == "mlp_norm":
    return prefix + "post_attention_layernorm.weight"
  group = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
  return f"{prefix}{group}.{leaf}.weight"


def to_hf_tensors(config: LlamaConfig, params: dict) -> dict[str, np.ndarray]:
  """Our params -> HF tensor dict (torch layout, [out, in])."""
  out = {}
  for key in ("embed", "final_norm", "lm_head"):
    if key in params:
      array = np.asarray(params[key])
      out[_hf_name((key,), None)] = array.T if key == "lm_head" else array
  for leaf, stacked in params["layers"].items():
    stacked = np.asarray(stacked)
    for i in range(config.num_layers):
      array = stacked[i]
      out[_hf_name(("layers", leaf), i)] = array.T if array.ndim == 2 else array
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_params(out_dir: str | os.PathLike, config: LlamaConfig, params: dict,
                tokenizer_dir: str | os.PathLike | None = None,
                max_shard_bytes: int = 5 * 2**30) -> Path:
  """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors = to_hf_tensors(config, jax.device_get(params))
  # Remove weights of an earlier save so the directory has exactly one current layout.
  for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  if len(shards) == 1:
    save_file(shards[0], out / SINGLE_FILE, metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, out / fname, metadata={"format": "pt"})
      weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
  (out / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2))
  if tokenizer_dir is not None:
    for fname in TOKENIZER_FILES:
      src = Path(tokenizer_dir) / fname
      if src.is_file() and src.resolve() != (out / fname).resolve():
        shutil.copy(src, out / fname)
  return out


