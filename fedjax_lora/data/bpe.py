"""Training a small byte-level BPE tokenizer for tiny models, saved in Hugging Face format.

A tiny model with LLaMA-2's 32k vocabulary would spend most of its parameters on the
embedding; a few-thousand-piece BPE trained on the site texts keeps it small while the
byte alphabet still guarantees every string round-trips.
"""

from __future__ import annotations

import os
from typing import Iterable

SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2, as in models/tokenizer.py


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
              min_frequency: int = 2):
  """Trains on `texts` and writes tokenizer.json + config with `save_pretrained`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(SPECIALS) + len(alphabet):
    raise ValueError(f"vocab_size must be >= {len(SPECIALS) + len(alphabet)} "
                     f"(specials + 256 bytes), got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>")
  wrapped.save_pretrained(str(out_dir))
  return wrapped
