"""Our LLaMA params -> llama.cpp GGUF files, and GGUF files -> Hugging Face directories.

The GGUF side mirrors llama.cpp's own converter (`convert_hf_to_gguf.py`, LlamaModel), so
llama.cpp, Ollama, LM Studio and transformers read the files: tensors under llama.cpp's
names in torch's [out, in] layout with the Q/K rows permuted to llama.cpp's interleaved
RoPE order, llama3 RoPE scaling as a `rope_freqs.weight` table of per-frequency divisors,
and the tokenizer as a byte-level BPE ("gpt2") vocabulary with merges, token types and
special ids. `models.gguf_checkpoint` is the reading side.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from models import gguf_checkpoint
from models.config import LlamaConfig, rope_inverse_frequencies
from models.hf_checkpoint import CheckpointError

# Name -> (ggml tensor type, llama.cpp file type); resolved lazily so importing stays cheap.
TENSOR_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
}
HF_DTYPES = ("float32", "bfloat16", "float16")
# Our layer leaf -> llama.cpp tensor name; the inverse of gguf_checkpoint.LAYER_TENSORS.
GGUF_LAYER_NAMES = {leaf: name for name, (leaf, _) in gguf_checkpoint.LAYER_TENSORS.items()}
SUPPORTED_TOKENIZERS = ("byte-level BPE fast tokenizers with merges (GPT-2 style: Llama-3, "
                        "SmolLM, Qwen...), written as tokenizer.ggml.model=gpt2")
# llama.cpp's token types (gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# End-of-turn tokens llama.cpp also recognises by name; they end generation in chat use.

TensorTypes = Mapping[str, str] | Callable[[str], str | None] | None


# ---- tensors ---------------------------------------------------------------------------

def llama_tensors(config: LlamaConfig, params: dict) -> dict[str, np.ndarray]:
  """Our params -> {llama.cpp tensor name: float32 array in torch [out, in] layout}."""
  import jax

  host = jax.device_get(params)
  as_f32 = lambda x: np.asarray(x, np.float32)
  out = {"token_embd.weight": as_f32(host["embed"])}
  layers = {leaf: as_f32(v) for leaf, v in host["layers"].items()}
  heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
  for i in range(config.num_layers):
    for leaf, stacked in layers.items():
      w = stacked[i]
      if w.ndim == 2:
        w = w.T  # ours is [in, out]
        if leaf in heads:  # llama.cpp's RoPE pairs rows (2i, 2i+1), HF's (i, i + d/2)
          w = gguf_checkpoint.permute_rows(w, heads[leaf])
      out[f"blk.{i}.{GGUF_LAYER_NAMES[leaf]}.weight"] = np.ascontiguousarray(w)
  out["output_norm.weight"] = as_f32(host["final_norm"])
  if "lm_head" in host:  # llama.cpp leaves the output tensor out when it is the embedding
    out["output.weight"] = np.ascontiguousarray(as_f32(host["lm_head"]).T)
  if config.rope_scaling:
    out["rope_freqs.weight"] = rope_divisors(config)
  return out


def rope_divisors(config: LlamaConfig) -> np.ndarray:
  """llama.cpp's `rope_freqs.weight`: plain inverse frequencies over the llama3-scaled ones."""
  plain = rope_inverse_frequencies(config.replace(rope_scaling=None))
  return (plain / rope_inverse_frequencies(config)).astype(np.float32)


def _ggml_type(name: str):
  import gguf

  if name not in TENSOR_TYPES:
    raise ValueError(f"tensor type {name!r}; supported: {sorted(TENSOR_TYPES)}")
  return gguf.GGMLQuantizationType[TENSOR_TYPES[name][0]]


def _encode(name: str, array: np.ndarray, type_name: str, log):
  """(data, ggml type) for one tensor; 1-D tensors stay F32, as llama.cpp keeps them."""
  import gguf

  if array.ndim < 2:
    return array.astype(np.float32), gguf.GGMLQuantizationType.F32
  qtype = _ggml_type(type_name)
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  if array.shape[-1] % block:
    if log:
      log(f"{name}: row length {array.shape[-1]} is not a multiple of {qtype.name}'s block "
          f"of {block}; written as F16")
    qtype = gguf.GGMLQuantizationType.F16
  return gguf.quants.quantize(array, qtype), qtype


def _type_for(name: str, default: str, tensor_types: TensorTypes) -> str:
  if tensor_types is None:
    return default
  chosen = tensor_types(name) if callable(tensor_types) else tensor_types.get(name)
  return default if chosen is None else chosen


# ---- tokenizer -------------------------------------------------------------------------

def _byte_level(component) -> bool:
  """Whether a tokenizer.json pre_tokenizer (possibly a Sequence) contains ByteLevel."""
  if not component:
    return False
  if component.get("type") == "Sequence":
    return any(_byte_level(c) for c in component.get("pretokenizers", ()))
  return component.get("type") == "ByteLevel"


def default_pre(tokenizer) -> str:
  """llama.cpp's pre-tokenizer name for this tokenizer when it is unambiguous.

  A lone ByteLevel with its regex is GPT-2's split (llama.cpp's "gpt-2"); anything else
  gets llama.cpp's "default" split, which is close to GPT-2's but not identical: pass `pre`
  (the name llama.cpp uses for the model family, e.g. "llama-bpe", "smollm", "qwen2") when
  known. llama.cpp refuses to load a file whose name it does not know.
  """
  spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
  if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
    return "gpt-2"
  return "default"


def stray_tokens(tokenizer, vocab_size: int) -> dict[int, str]:
  """Added tokens whose ids the model cannot embed (id >= vocab_size).

  transformers' GGUF tokenizer builder adds GPT-2's default "<|endoftext|>" at id
  vocab_size to byte-level vocabularies that lack it (e.g. Llama-3's).
  """
  return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if i >= vocab_size}


def tokenizer_metadata(tokenizer, vocab_size: int,
                       log: Callable[[str], None] | None = None) -> dict:
  """llama.cpp tokenizer fields of a byte-level BPE HF fast tokenizer; rejects others."""
  source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise CheckpointError(f"{source}: tokenizer class {type(tokenizer).__name__} is not a fast "
                          f"(tokenizers) tokenizer; supported: {SUPPORTED_TOKENIZERS}")
  spec = json.loads(backend.to_str())
  model = spec["model"]
  if model.get("type") != "BPE":
    raise CheckpointError(f"{source}: tokenizer model.type={model.get('type')!r} is not "
                          f"supported; supported: {SUPPORTED_TOKENIZERS}")
  if not _byte_level(spec.get("pre_tokenizer")):
    kind = (spec.get("pre_tokenizer") or {}).get("type")
    raise CheckpointError(f"{source}: tokenizer pre_tokenizer={kind!r} is not byte-level (a "
                          f"SentencePiece-style BPE needs scores, not written here); supported: "
                          f"{SUPPORTED_TOKENIZERS}")
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
  if not merges:
    raise CheckpointError(f"{source}: tokenizer model.merges is empty, and llama.cpp's gpt2 "
                          f"tokenizer needs tokenizer.ggml.merges; supported: "
                          f"{SUPPORTED_TOKENIZERS}")
  stray = stray_tokens(tokenizer, vocab_size)
  vocab = {t: i for t, i in tokenizer.get_vocab().items() if i not in stray}
  if max(vocab.values()) >= vocab_size:
    raise CheckpointError(f"{source}: tokenizer has token id {max(vocab.values())}, but the "
                          f"model's vocab_size is {vocab_size}")
  if stray and log:
    log(f"{source}: added tokens {sorted(stray.values())} have ids >= the model's vocab_size "
        f"{vocab_size}; left out")
  # Unfilled ids (a model vocabulary padded past the tokenizer) as llama.cpp names them.
  tokens = [f"[PAD{i}]" for i in range(vocab_size)]
  types = [UNUSED] * vocab_size
  for token, i in vocab.items():
    # A placeholder read back from a GGUF stays unused, so GGUF -> GGUF keeps the types.
    tokens[i], types[i] = token, UNUSED if token == tokens[i] else NORMAL
  for i, added in tokenizer.added_tokens_decoder.items():
    if i in stray:
      continue
    # llama.cpp marks special added tokens, and unmarked ones spelled like <|...|>, CONTROL.
    looks_special = added.content.startswith("<|") and added.content.endswith("|>")
    types[i] = CONTROL if added.special or looks_special else USER_DEFINED
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  full = tokenizer("a")["input_ids"]
  in_vocab = lambda i: i if i is not None and i < vocab_size else None
  bos, eos = in_vocab(tokenizer.bos_token_id), in_vocab(tokenizer.eos_token_id)
  return {
      "tokens": tokens, "types": types, "merges": merges, "bos": bos, "eos": eos,
      "unk": in_vocab(tokenizer.unk_token_id), "pad": in_vocab(tokenizer.pad_token_id),
      # Whether encoding adds BOS/EOS, read off the tokenizer's behaviour, not its flags.
      "add_bos": bos is not None and len(full) > len(plain) and full[0] == bos,
      "add_eos": eos is not None and len(full) > len(plain) and full[-1] == eos,
      "chat_template": tokenizer.chat_template,
  }


def _add_tokenizer(writer, meta: dict, config: LlamaConfig, pre: str) -> None:
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(meta["tokens"])
  writer.add_token_types(meta["types"])
  writer.add_token_merges(meta["merges"])
  # The tokenizer's ids first; the model config's where the tokenizer has none.
  fallback = {"bos": config.bos_token_id, "eos": (config.eos_ids or (None,))[0], "unk": None,
              "pad": config.pad_token_id}
  adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
  for key, add in adders.items():
    token_id = meta[key] if meta[key] is not None else fallback[key]
    if token_id is not None:
      add(int(token_id))
  writer.add_add_bos_token(bool(meta["add_bos"]))
  writer.add_add_eos_token(bool(meta["add_eos"]))
  template = meta["chat_template"]
  if isinstance(template, Mapping):  # named templates, as HF stores several
    template = [{"name": k, "template": v} for k, v in template.items()]
  if template:
    writer.add_chat_template(template)


# ---- writing ---------------------------------------------------------------------------

def _add_config(writer, config: LlamaConfig, name: str, file_type: str) -> None:
  import gguf

  writer.add_name(name)
  writer.add_type("model")
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_vocab_size(config.vocab_size)
  writer.add_rope_dimension_count(config.head_dim)
  if config.head_dim != config.hidden_size // config.num_heads:
    writer.add_key_length(config.head_dim)  # only read when it differs from hidden / heads
    writer.add_value_length(config.head_dim)
  writer.add_file_type(gguf.LlamaFileType[TENSOR_TYPES[file_type][1]])
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf_tensors(path: str | os.PathLike, config: LlamaConfig,
                       tensors: Mapping[str, np.ndarray], tokenizer, tensor_type: str = "f16",
                       tensor_types: TensorTypes = None, pre: str | None = None,
                       name: str | None = None, log: Callable[[str], None] | None = None) -> Path:
  """Writes given llama.cpp-named tensors (float32, torch layout) with config and tokenizer.

  `tensor_type` applies to every matrix; `tensor_types` overrides it per tensor, as a
  {name: type} mapping or a callable name -> type (None keeps `tensor_type`). 1-D tensors
  (norms, rope_freqs) are always F32. The file appears only once it is complete.
  """
  import gguf

  _ggml_type(tensor_type)
  if isinstance(tensor_types, Mapping):
    unknown = sorted(set(tensor_types) - set(tensors))
    if unknown:
      raise ValueError(f"tensor_types names tensors that are not written: {unknown}")
  path = Path(path)
  meta = tokenizer_metadata(tokenizer, config.vocab_size, log)
  writer = gguf.GGUFWriter(None, "llama")
  _add_config(writer, config, name or "llama", tensor_type)
  _add_tokenizer(writer, meta, config, pre or default_pre(tokenizer))
  for tensor_name, array in tensors.items():
    data, qtype = _encode(tensor_name, np.asarray(array, np.float32),
                          _type_for(tensor_name, tensor_type, tensor_types), log)
    writer.add_tensor(tensor_name, data, raw_dtype=qtype)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)  # never leave half a file that looks like a model
    raise
  return path


def write_gguf(path: str | os.PathLike, config: LlamaConfig, params: dict, tokenizer,
               tensor_type: str = "f16", tensor_types: TensorTypes = None,
               pre: str | None = None, name: str | None = None,
               log: Callable[[str], None] | None = None) -> Path:
  """Writes `params` (our layout) as a llama.cpp LLaMA GGUF; see `write_gguf_tensors`.

  `tokenizer` is a byte-level BPE HF fast tokenizer; `pre` is llama.cpp's pre-tokenizer
  name (pass the source GGUF's tokenizer.ggml.pre when converting one; default: see
  `default_pre`).
  """
  return write_gguf_tensors(path, config, llama_tensors(config, params), tokenizer,
                            tensor_type, tensor_types, pre, name, log)


# ---- conversions (launch/convert.py) ---------------------------------------------------

def end_of_turn_ids(tokenizer, meta: Mapping) -> list[int]:
  """Ids that end an assistant turn: the file's eot/eom ids and the token its chat template
  closes the assistant turn with (`models.tokenizer.chat_end_of_turn`)."""
  from models.tokenizer import chat_end_of_turn

  ids = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
         if meta.get(k) is not None]
  if getattr(tokenizer, "chat_template", None):
    try:
      ids.append(tokenizer.convert_tokens_to_ids(chat_end_of_turn(tokenizer)))
    except ValueError:
      pass  # a template without a special end of turn: EOS alone ends generation
  return ids


def _generation_config(config: LlamaConfig, eos: list[int]) -> dict:
  eos = list(dict.fromkeys(eos))  # ordered, without repeats
  return {"bos_token_id": config.bos_token_id,
          "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
          "pad_token_id": config.pad_token_id}


def gguf_to_hf_dir(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
                   log: Callable[[str], None] | None = None) -> Path:
  """A GGUF file -> an HF LLaMA directory: config.json, model.safetensors in `dtype`, the
  tokenizer (with its chat template) and generation_config.json."""
  import jax

  from models import hf_checkpoint

  if dtype not in HF_DTYPES:
    raise ValueError(f"dtype {dtype!r}; supported: {HF_DTYPES}")
  t0 = time.perf_counter()
  config, _, params = gguf_checkpoint.load_params(src, log=log)
  t_weights = time.perf_counter()
  tokenizer = gguf_checkpoint.load_tokenizer(src)
  meta = gguf_checkpoint.metadata(gguf_checkpoint.open_reader(src))
  t1 = time.perf_counter()
  stray = stray_tokens(tokenizer, config.vocab_size)
  if stray and log:
    log(f"warning: {src}: the tokenizer transformers builds has tokens the model cannot embed "
        f"{stray} (ids >= vocab_size {config.vocab_size}); they are written as they are")
  config = config.replace(param_dtype=dtype)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  out = hf_checkpoint.save_params(out, config, params)
  tokenizer.save_pretrained(str(out))
  generation = _generation_config(config, [*config.eos_ids, *end_of_turn_ids(tokenizer, meta)])
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
  if log:
    log(f"read {src} in {t1 - t0:.1f}s (weights {t_weights - t0:.1f}s, tokenizer "
        f"{t1 - t_weights:.1f}s); wrote {out} as {dtype} in {time.perf_counter() - t1:.1f}s")
  return out


def load_base(path: Path, log: Callable[[str], None] | None = None, quantize=None):
  """(config, params, tokenizer, pre, name) from a local HF directory or GGUF file (see
  `checkpoints.resolve`; for a named base pass its cached GGUF, `bases.gguf_path`, so
  llama.cpp's pre-tokenizer name carries over). `quantize` (models.quant.QuantConfig):
  the base as a quantized run held it."""
  from models import hf_checkpoint
  from models.tokenizer import load_tokenizer

  path = Path(path)
  if path.is_file():
    config, _, params = gguf_checkpoint.load_params(path, log=log, quantize=quantize)
    meta = gguf_checkpoint.metadata(gguf_checkpoint.open_reader(path))
    return (config, params, gguf_checkpoint.load_tokenizer(path),
            meta.get("tokenizer.ggml.pre"), meta.get("general.name") or path.stem)
  config, _, params = hf_checkpoint.load_params(path, log=log, quantize=quantize)
  return config, params, load_tokenizer(path), None, path.name


def merged_to_gguf(base: str | os.PathLike, out: str | os.PathLike,
                   adapter: str | os.PathLike | None = None, tensor_type: str = "f16",
                   pre: str | None = None, log: Callable[[str], None] | None = None,
                   quantize=None) -> Path:
  """Base (local HF dir or GGUF) plus an optional PEFT adapter merged in -> one GGUF file.

  quantize: the models.quant.QuantConfig the adapter was trained with; the base is held
  that way and dequantized before merging (what the adapter saw, plus its update).
  """
  from models import lora, peft_io, quant

  say = log or (lambda _: None)
  t0 = time.perf_counter()
  config, params, tokenizer, source_pre, name = load_base(base, log, quantize)
  if adapter is not None:
    lora_adapter = peft_io.import_adapter(adapter, config)
    params = lora.merge_into_base(params, lora_adapter, log=say)
    spec = lora_adapter.spec
    say(f"merged {adapter}: rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}), "
        f"targets {','.join(spec.targets)}, layers "
        f"{'all' if spec.layers is None else list(spec.layers)}")
  params = quant.to_float(params, say, "writing")  # no adapter: the base as it was held
  t1 = time.perf_counter()
  path = write_gguf(out, config, params, tokenizer, tensor_type, pre=pre or source_pre,
                    name=name, log=log)
  say(f"wrote {path} ({tensor_type}, {path.stat().st_size:,} bytes) in "
      f"{time.perf_counter() - t1:.1f}s; loading and merging took {t1 - t0:.1f}s")
  return path
