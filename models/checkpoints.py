"""One entry for every place that accepts a base model: an HF checkpoint directory, a
`.gguf` file, a named base (models/bases.py), or a hub id when online."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from models import bases, gguf_checkpoint, hf_checkpoint
from models.config import LlamaConfig
from models.hf_checkpoint import CheckpointError
from models.tokenizer import load_tokenizer as load_hf_tokenizer


def resolve(spec: str | os.PathLike, log: Callable[[str], None] = print,
            gguf: bool = False) -> Path:
  """A local HF directory or GGUF file for `spec` (fetching a named base on first use).

  gguf: a named base as its GGUF file rather than the converted HF directory (what
  quantize=keep reads its blocks from).
  """
  spec = str(spec)
  if not spec:
    raise CheckpointError("empty model path: give an HF checkpoint directory, a .gguf file "
                          f"or a named base ({', '.join(bases.BASES)})")
  if bases.is_named(spec):
    return bases.gguf_path(spec, log) if gguf else bases.resolve(spec, log)
  path = Path(spec).expanduser()
  if path.is_file():
    if gguf_checkpoint.is_gguf(path):
      return path
    raise CheckpointError(f"{path}: expected an HF checkpoint directory or a GGUF file, found "
                          "a file that is neither")
  return hf_checkpoint.resolve_model_dir(spec)


def load_config(path: Path, **overrides) -> LlamaConfig:
  """Config of a resolved checkpoint (see `resolve`)."""
  if path.is_file():
    return gguf_checkpoint.read_config(path, **overrides)
  return hf_checkpoint.load_config(path, **overrides)


def load_params(path: Path, config: LlamaConfig | None = None,
                log: Callable[[str], None] | None = None, quantize=None):
  """(config, graphdef, params) of a resolved checkpoint, in `config.param_dtype`, its
  projections held as `quantize` (a models.quant.QuantConfig) says."""
  if path.is_file():
    return gguf_checkpoint.load_params(path, config, log=log, quantize=quantize)
  return hf_checkpoint.load_params(path, config, log=log, quantize=quantize)


def load_tokenizer(path: Path):
  """The tokenizer that ships with a resolved checkpoint."""
  if path.is_file():
    return gguf_checkpoint.load_tokenizer(path)
  return load_hf_tokenizer(path)


def has_tokenizer(path: Path) -> bool:
  return path.is_file() or any((path / f).is_file()
                               for f in ("tokenizer.json", "tokenizer.model"))


def stop_ids(path: Path, config: LlamaConfig, tokenizer) -> tuple[int, ...]:
  """Token ids that end an answer: the config's EOS, generation_config.json's (Llama-3
  instruct lists several) and the tokenizer's EOS."""
  ids = set(config.eos_ids)
  if path.is_dir():
    ids |= set(hf_checkpoint.generation_eos_ids(path))
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))
