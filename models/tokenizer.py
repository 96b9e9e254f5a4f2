"""Tokenizers: load a checkpoint's own, or build a byte-level one for self-made tiny models."""

from __future__ import annotations

import os
from pathlib import Path
from models.errors import TokenizerError

BYTE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 as in LLaMA-2 (pad, bos, eos)


def load_tokenizer(model_dir: str | os.PathLike):
  """The Hugging Face tokenizer stored beside the weights (tokenizer.json or tokenizer.model)."""
  from transformers import AutoTokenizer

  model_dir = Path(model_dir)
  if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
    raise TokenizerError(f"{model_dir}: no tokenizer.json or tokenizer.model; copy the "
                         "tokenizer files into the checkpoint directory")
  try:
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
      # A bare SentencePiece model (e.g. LLaMA-2's tokenizer.model) has no config naming its
      # class (AutoTokenizer would guess tiktoken); LLaMA prepends <s> as Meta's does.
      from transformers import LlamaTokenizer
      return LlamaTokenizer.from_pretrained(str(model_dir), add_bos_token=True,
                                            add_eos_token=False)
    return AutoTokenizer.from_pretrained(str(model_dir))
  except Exception as e:
    raise TokenizerError(f"{model_dir}: tokenizer files could not be loaded "
                         f"({type(e).__name__}: {e})") from None


def build_byte_tokenizer(out_dir: str | os.PathLike):
  """A 259-token byte-level tokenizer (3 specials + 256 bytes) saved with `save_pretrained`.

  Every string round-trips exactly, and nothing has to be downloaded or trained.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
  for ch in sorted(alphabet):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>")
  wrapped.save_pretrained(str(out_dir))
  return wrapped


def chat_end_of_turn(tokenizer) -> str:
  """The special token a tokenizer's chat template closes the assistant turn with (ChatML's
  <|im_end|>, Llama-3's <|eot_id|>), found by rendering a turn; ValueError if none."""
  user = {"role": "user", "content": "Q"}
  answer = "A1b2C3"  # text no template rewrites
  prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
  full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": answer}],
                                       tokenize=False)
  if not full.startswith(prompt + answer):
    raise ValueError("the chat template does not write the assistant turn right after the "
                     "generation prompt, so training and generation prompts would differ")
  rest = full[len(prompt + answer):]
  specials = sorted({str(t) for t in tokenizer.all_special_tokens}
                    | {t.content for t in tokenizer.added_tokens_decoder.values()},
                    key=len, reverse=True)
  for token in specials:
    if rest.startswith(token):
      return token
  raise ValueError(f"the chat template ends the assistant turn with {rest[:20]!r}, not with "
                   "a special token generation could stop at")
