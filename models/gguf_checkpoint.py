"""GGUF files (llama.cpp, Ollama, LM Studio) -> our LlamaConfig, params and tokenizer.

Torch-free: metadata and tensors are read with the `gguf` package and every tensor type
its `gguf.quants.dequantize` knows (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the
K-quants, ...) is dequantized to float32 on load, then cast to the config's dtype.

Two layout facts of llama.cpp's converter (`convert_hf_to_gguf.py`, LlamaModel.permute):
the rows of attn_q / attn_k are permuted from HF's rotate-half RoPE order to llama.cpp's
interleaved order, per head (row h*d + 2*i + j <- row h*d + j*d/2 + i); we undo it so our
rotate-half RoPE applies unchanged. Tensor dims are listed fastest first (ne[0] = the
input features), so a weight reads back as torch's [out, in], which we transpose.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from models import llama, quant
from models.config import LlamaConfig
from models.hf_checkpoint import CheckpointError

MAGIC = b"GGUF"
ARCHITECTURES = ("llama",)
FLOAT_TYPES = ("F32", "F16", "BF16")  # loaded as float whatever quantize says

# GGUF tensor name (layer part as {}) -> (our leaf, whether it is a [out, in] matrix).
LAYER_TENSORS = {
    "attn_norm": ("attn_norm", False),
    "attn_q": ("q_proj", True),
    "attn_k": ("k_proj", True),
    "attn_v": ("v_proj", True),
    "attn_output": ("o_proj", True),
    "ffn_norm": ("mlp_norm", False),
    "ffn_gate": ("gate_proj", True),
    "ffn_up": ("up_proj", True),
    "ffn_down": ("down_proj", True),
}
GLOBAL_TENSORS = {"token_embd.weight": "embed", "output_norm.weight": "final_norm",
                  "output.weight": "lm_head"}
# llama.cpp stores Llama-3.1/3.2 RoPE scaling as a per-frequency divisor table
# (rope_freqs.weight) instead of its parameters; these are the published parameter sets,
# recognised by reproducing the table.
LLAMA3_ROPE_CANDIDATES = tuple(
    (("factor", f), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
     ("original_max_position_embeddings", 8192.0)) for f in (8.0, 32.0, 16.0, 4.0))


def is_gguf(path: str | os.PathLike) -> bool:
  """A regular file that starts with the GGUF magic."""
  path = Path(path)
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == MAGIC


def open_reader(path: str | os.PathLike):
  """A `gguf.GGUFReader`, with bad files reported as one CheckpointError naming the file."""
  import gguf

  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such GGUF file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != MAGIC:
    raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
  try:
    return gguf.GGUFReader(str(path), "r")
  except Exception as e:  # the reader raises ValueError/IndexError/... on a cut file
    raise CheckpointError(f"{path}: unreadable GGUF file, truncated or corrupt "
                          f"({type(e).__name__}: {e})") from None


def metadata(reader) -> dict:
  """Every key-value field as a Python value (arrays as lists)."""
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except Exception:  # a field the installed gguf cannot decode; nothing we read needs it
      continue
  return out


def config_from_metadata(meta: dict, tensor_names, source: str, rope_freqs=None,
                         **overrides) -> LlamaConfig:
  """LlamaConfig from GGUF metadata keys; errors name the file and the key."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise CheckpointError(f"{source}: unsupported general.architecture={arch!r}; supported: "
                          f"{ARCHITECTURES}")

  def need(key):
    value = meta.get(f"{arch}.{key}")
    if value is None:
      raise CheckpointError(f"{source}: missing metadata key {arch}.{key}")
    return value

  hidden = int(need("embedding_length"))
  heads = int(need("attention.head_count"))
  kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
  rope_dim = meta.get(f"{arch}.rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != head_dim:
    raise CheckpointError(f"{source}: {arch}.rope.dimension_count={rope_dim} differs from the "
                          f"head size {head_dim}; partial RoPE is not implemented")
  scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling_type not in ("none", None):
    raise CheckpointError(f"{source}: unsupported {arch}.rope.scaling.type={scaling_type!r}; "
                          "supported: none, or llama3 frequencies in rope_freqs.weight")
  tokens = meta.get("tokenizer.ggml.tokens")
  vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
  if vocab is None:
    raise CheckpointError(f"{source}: missing metadata key {arch}.vocab_size (and no "
                          "tokenizer.ggml.tokens to count)")
  as_id = lambda key: None if meta.get(key) is None else int(meta[key])
  kwargs = dict(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
      tie_word_embeddings="output.weight" not in tensor_names,
      max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
      bos_token_id=as_id("tokenizer.ggml.bos_token_id"),
      eos_token_id=as_id("tokenizer.ggml.eos_token_id"),
      pad_token_id=as_id("tokenizer.ggml.padding_token_id"))
  kwargs.update(overrides)
  try:
    config = LlamaConfig(**kwargs)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{source}: {e}") from None
  if rope_freqs is not None:
    config = _match_llama3_rope(config, np.asarray(rope_freqs, np.float32), source)
  return config


def _match_llama3_rope(config: LlamaConfig, table: np.ndarray, source: str) -> LlamaConfig:
  from models.config import rope_inverse_frequencies

  plain = rope_inverse_frequencies(config.replace(rope_scaling=None))
  for candidate in LLAMA3_ROPE_CANDIDATES:
    scaled = config.replace(rope_scaling=candidate)
    if np.allclose(plain / table, rope_inverse_frequencies(scaled), rtol=1e-4):
      return scaled
  raise CheckpointError(f"{source}: tensor rope_freqs.weight matches no known llama3 RoPE "
                        "scaling (factor 4, 8, 16 or 32 with low/high 1/4 over 8192)")


def read_config(path: str | os.PathLike, **overrides) -> LlamaConfig:
  reader = open_reader(path)
  return _config(reader, str(path), **overrides)


def _config(reader, source: str, **overrides) -> LlamaConfig:
  tensors = {t.name: t for t in reader.tensors}
  rope = tensors.get("rope_freqs.weight")
  freqs = _dequantize(rope, source) if rope is not None else None
  return config_from_metadata(metadata(reader), set(tensors), source, freqs, **overrides)


def _dequantize(tensor, source: str) -> np.ndarray:
  from gguf import quants

  try:
    return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
  except NotImplementedError:
    raise CheckpointError(f"{source}: tensor {tensor.name} has type "
                          f"{tensor.tensor_type.name}, which gguf.quants cannot dequantize"
                          ) from None
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{source}: tensor {tensor.name} ({tensor.tensor_type.name}) is "
                          f"unreadable, truncated or corrupt ({e})") from None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head interleaving of Q/K rows ([out, in], torch layout)."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's order from HF's rotate-half order (the inverse of `unpermute_rows`)."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_params(path: str | os.PathLike, config: LlamaConfig | None = None,
                log: Callable[[str], None] | None = None,
                quantize: "quant.QuantConfig | None" = None) -> tuple[LlamaConfig, object, dict]:
  """(config, graphdef, params) from a GGUF file, in `config.param_dtype` (float32 default).

  `config` overrides only numerics/execution fields; its shapes must match the file's.
  `quantize`: nf4 / int8 quantize the projections after dequantizing them; keep holds
  the file's Q4_0 / Q4_1 / Q8_0 blocks of the projections, embedding and head as stored.
  """
  quantize = quantize or quant.QuantConfig()
  keep = quantize.mode == "keep"
  import jax.numpy as jnp

  source = str(path)
  reader = open_reader(path)
  file_config = _config(reader, source)
  if config is None:
    config = file_config
  else:
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings")
    for field in shape_fields:
      if getattr(config, field) != getattr(file_config, field):
        raise CheckpointError(f"{source}: the file has {field}={getattr(file_config, field)}, "
                              f"the given config {getattr(config, field)}")
  graphdef, abstract = llama.abstract_model(config)
  dtype = config.jnp_param_dtype
  L = config.num_layers
  stacked = {k: np.empty(v.shape, v.dtype) for k, v in abstract["layers"].items()}
  filled = {k: np.zeros(L, bool) for k in stacked}
  params: dict = {}
  unknown = []
  kept: dict = {}  # leaf -> {layer: (GGUF type, split block arrays)}
  not_kept = []    # keep: an embedding or head of a type it cannot hold, dequantized
  for tensor in reader.tensors:
    name = tensor.name
    if name == "rope_freqs.weight":
      continue  # already folded into config.rope_scaling
    if name in GLOBAL_TENSORS:
      leaf, layer, matrix = GLOBAL_TENSORS[name], None, name == "output.weight"
    else:
      parts = name.split(".")
      if (len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit()
          or parts[2] not in LAYER_TENSORS or parts[3] != "weight"):
        unknown.append(name)
        continue
      layer = int(parts[1])
      leaf, matrix = LAYER_TENSORS[parts[2]]
      if layer >= L:
        raise CheckpointError(f"{source}: tensor {name} is for block {layer}, but "
                              f"llama.block_count is {L}")
    want = abstract[leaf] if layer is None else abstract["layers"][leaf]
    want_shape = tuple(want.shape if layer is None else want.shape[1:])
    file_shape = want_shape[::-1] if matrix else want_shape  # matrices as torch [out, in]
    if keep and (matrix or leaf == "embed"):
      # llama.cpp often stores the head (or a tied embedding) as Q6_K in Q4 files: those
      # are dequantized like float tensors; only the projections must be kept.
      if leaf in ("embed", "lm_head") and tensor.tensor_type.name not in quant.GGUF_LAYOUTS:
        parts = None
        if tensor.tensor_type.name not in FLOAT_TYPES:
          not_kept.append(f"{leaf} ({tensor.tensor_type.name})")
      else:
        parts = _kept_blocks(tensor, leaf, file_shape, config, source)
      if parts is not None:
        if layer is None:
          params[leaf] = quant.from_gguf(parts, tensor.tensor_type.name)
        else:
          kept.setdefault(leaf, {})[layer] = (tensor.tensor_type.name, parts)
          filled[leaf][layer] = True
        continue
    array = _dequantize(tensor, source)
    if tuple(array.shape) != file_shape:
      raise CheckpointError(f"{source}: tensor {name} has shape {tuple(array.shape)}; the "
                            f"metadata implies {file_shape}")
    if leaf == "q_proj":
      array = unpermute_rows(array, config.num_heads)
    elif leaf == "k_proj":
      array = unpermute_rows(array, config.num_kv_heads)
    if matrix:
      array = array.T
    if layer is None:
      params[leaf] = jnp.asarray(array.astype(dtype))
    else:
      stacked[leaf][layer] = array
      filled[leaf][layer] = True
  if unknown:
    raise CheckpointError(f"{source}: tensors this LLaMA implementation does not know: "
                          f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
  missing = [n for n, leaf in GLOBAL_TENSORS.items() if leaf in abstract and leaf not in params]
  inverse = {leaf: g for g, (leaf, _) in LAYER_TENSORS.items()}
  missing += [f"blk.{i}.{inverse[leaf]}.weight" for leaf, ok in filled.items()
              for i in np.flatnonzero(~ok)]
  if missing:
    raise CheckpointError(f"{source}: missing tensors {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  for leaf, by_layer in kept.items():
    stacked[leaf] = _stack_kept(leaf, by_layer, L, source)
  params["layers"] = quant.quantize_layers(stacked, quantize)
  if log:
    types = sorted({t.tensor_type.name for t in reader.tensors})
    formats = quant.formats(params)
    if keep:
      held = (f"{len(formats)} weights kept as stored ({', '.join(sorted(set(formats.values())))}), "
              f"the rest dequantized to {dtype}")
      if not_kept:
        held += f"; {', '.join(not_kept)} dequantized: a type keep does not hold"
    else:
      held = f"dequantized to {dtype}" + (
          f", projections quantized to {quantize.describe()}" if quantize.active else "")
    log(f"loaded {config.num_params() / 1e6:.1f}M parameters from {source} "
        f"(GGUF {'/'.join(types)}, {held})")
  return config, graphdef, params


def _kept_blocks(tensor, leaf: str, file_shape, config: LlamaConfig, source: str):
  """quantize=keep: a matrix's blocks split as stored (rows in our RoPE order), or None for a
  float tensor (loaded as float like any other)."""
  type_name = tensor.tensor_type.name
  if type_name in FLOAT_TYPES:
    return None
  if type_name not in quant.GGUF_LAYOUTS:
    raise CheckpointError(
        f"{source}: tensor {tensor.name} is {type_name}; quantize=keep holds "
        f"{', '.join(quant.GGUF_LAYOUTS)} blocks as stored. Use quantize=none (dequantize on "
        "load) or nf4 / int8 (requantize after dequantizing)")
  raw = np.asarray(tensor.data)
  _, block_bytes = quant.GGUF_LAYOUTS[type_name]
  rows, cols = file_shape
  if raw.shape != (rows, cols // 32 * block_bytes) or cols % 32:
    raise CheckpointError(f"{source}: tensor {tensor.name} ({type_name}) holds {raw.shape} "
                          f"bytes; the metadata implies {file_shape} weights in 32-blocks of "
                          f"{block_bytes} bytes")
  parts = quant.split_gguf_rows(raw, type_name)
  heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(leaf)
  if heads:  # per-head row order, as for float weights; blocks run along the columns
    parts = {k: unpermute_rows(v, heads) for k, v in parts.items()}
  return parts


def _stack_kept(leaf: str, by_layer: dict, num_layers: int, source: str):
  """One QuantizedWeight [L, ...] from every layer's blocks, which must share one type."""
  types = {layer: t for layer, (t, _) in by_layer.items()}
  inverse = {ours: g for g, (ours, _) in LAYER_TENSORS.items()}
  if len(by_layer) != num_layers or len(set(types.values())) > 1:
    first = min(types)
    other = next((l for l in range(num_layers) if types.get(l) != types[first]), None)
    raise CheckpointError(
        f"{source}: quantize=keep stacks one type per weight across blocks, but "
        f"blk.{first}.{inverse[leaf]}.weight is {types[first]} and "
        f"blk.{other}.{inverse[leaf]}.weight is {types.get(other, 'a float type')}; "
        "use quantize=none or nf4 for this file")
  type_name = types[0]
  parts = {k: np.stack([by_layer[l][1][k] for l in range(num_layers)])
           for k in by_layer[0][1]}
  return quant.from_gguf(parts, type_name)


def load_tokenizer(path: str | os.PathLike):
  """The file's tokenizer (vocabulary, merges, special tokens, chat template) as a
  transformers fast tokenizer, built by transformers' own GGUF tokenizer converter."""
  from transformers import AutoTokenizer

  from models.tokenizer import TokenizerError

  path = Path(path)
  open_reader(path)  # the same one-line errors for a missing, foreign or cut file
  try:
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  except Exception as e:
    raise TokenizerError(f"{path}: the GGUF tokenizer could not be built "
                         f"({type(e).__name__}: {e})") from None
