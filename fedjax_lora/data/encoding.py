"""Tokenizing examples once (cached as Arrow via `datasets`): token ids and prompt lengths.

Sequences are rendered by `templates.Renderer` (the paper's `<s> prompt target </s>` or
the base's chat template) and tokenized as one string so the prompt/answer boundary
tokenizes exactly as at training time; the boundary token index comes from the
tokenizer's character offsets. `arrays.to_arrays` pads the result to fixed-shape site
arrays with the loss mask: the whole sequence by default, as in the paper's released code
(`completion_only_loss=False`), or only the target. Per-site token counts n_k (supervised
positions after the causal shift) are the Fed-MedLoRA weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from fedjax_lora.data import templates
from fedjax_lora.data.tasks import Example

CACHE_VERSION = 2  # bump when the encoding below changes


def tokenizer_fingerprint(tokenizer) -> str:
  """Changes with the vocabulary, merges, normalisation (fast tokenizers), class or specials."""
  backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
  blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                sort_keys=True)
  blob += json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                      tokenizer.pad_token_id])
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def examples_fingerprint(examples: Sequence[Example]) -> str:
  """Hashes what gets tokenized (prompt and target); an Example's label lists are not
  included: they never reach the tokens, and its prompt already spells them out."""
  h = hashlib.sha256()
  for ex in examples:
    for part in (ex.prompt, ex.target):
      h.update(part.encode())
      h.update(b"\x00")
  return h.hexdigest()[:16]


def cache_key(data_config: dict, renderer, examples: Sequence[Example], max_length: int) -> str:
  blob = json.dumps({"config": data_config, "tokenizer": tokenizer_fingerprint(renderer.tokenizer),
                     "prompt_format": renderer.format,
                     "examples": examples_fingerprint(examples), "max_length": max_length,
                     "version": CACHE_VERSION}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _encode_batch(batch, renderer, max_length):
  prompts = [renderer.prompt_text(p) for p in batch["prompt"]]
  enc = renderer.tokenizer([p + renderer.answer_text(t) for p, t in zip(prompts, batch["target"])],
                           add_special_tokens=False, return_offsets_mapping=True)
  prefix, suffix = list(renderer.prefix_ids), list(renderer.suffix_ids)
  out = {"input_ids": [], "prompt_length": [], "truncated": []}
  for ids, offsets, prompt in zip(enc["input_ids"], enc["offset_mapping"], prompts):
    cut = len(prompt)
    n_prompt = len(prefix) + sum(1 for start, _ in offsets if start < cut)
    seq = prefix + list(ids) + suffix
    out["truncated"].append(len(seq) > max_length)
    out["input_ids"].append(seq[:max_length])
    out["prompt_length"].append(min(n_prompt, max_length))
  return out


def encode(examples: Sequence[Example], tokenizer, max_length: int = 800,
           cache_dir: str | os.PathLike | None = None, data_config: dict | None = None):
  """A `datasets.Dataset` of token ids, from the Arrow cache when the key matches.

  `tokenizer` is a `templates.Renderer` (or a bare tokenizer: the paper format)."""
  import datasets

  renderer = templates.as_renderer(tokenizer)
  datasets.disable_progress_bars()  # callers log one line per split instead
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  path = None
  if cache_dir is not None:
    key = cache_key(data_config or {}, renderer, examples, max_length)
    path = Path(cache_dir) / f"encoded-{key}"
    if (path / "dataset_info.json").is_file():
      return datasets.load_from_disk(str(path))
  raw = datasets.Dataset.from_dict({"prompt": [e.prompt for e in examples],
                                    "target": [e.target for e in examples]})
  ds = raw.map(_encode_batch, batched=True, batch_size=256, remove_columns=["prompt", "target"],
               fn_kwargs={"renderer": renderer, "max_length": max_length},
               load_from_cache_file=False, desc="tokenizing")
  if path is not None:
    import shutil
    import tempfile
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    ds.save_to_disk(str(tmp / "data"))
    try:  # a crash mid-write never leaves a half cache under the real key
      os.replace(tmp / "data", path)
    except OSError:  # another run wrote the same key first; its copy is identical
      pass
    shutil.rmtree(tmp, ignore_errors=True)
    ds = datasets.load_from_disk(str(path))
  return ds
