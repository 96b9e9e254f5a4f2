"""How an instruction example becomes text for the model: the paper's plain sections or
the base tokenizer's own chat template.

Training, server validation and generation all render through one `Renderer`, so the
prompt a model is scored on is token for token the prefix it was trained on:

- "paper" (method.md §6): `[BOS] prompt answer [EOS]`; the prompt already ends with the
  "### Output Text:" line. BOS is written only when the tokenizer itself adds one (LLaMA-2
  and our byte/BPE tokenizers do; SmolLM2's `add_bos_token=false` does not).
- "chat": the tokenizer's chat template with the whole prompt (instruction and input) as
  the user turn and the answer as the assistant turn, up to and including the template's
  end-of-turn token (ChatML's `<|im_end|>`, Llama-3's `<|eot_id|>`), which is also where
  generation stops. The template writes its own BOS and any default system turn.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from models.tokenizer import chat_end_of_turn
from fedjax_lora.errors import TemplateError

PROMPT_FORMATS = ("paper", "chat")


@dataclasses.dataclass(frozen=True)
class Renderer:
  tokenizer: object
  format: str = "paper"
  # Filled in by `make_renderer`: ids written before the prompt, after the answer, and the
  # chat template's end-of-turn text (chat only).
  prefix_ids: tuple[int, ...] = ()
  suffix_ids: tuple[int, ...] = ()
  end_of_turn: str = ""

  def prompt_text(self, prompt: str) -> str:
    if self.format == "paper":
      return prompt
    return self.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

  def answer_text(self, target: str) -> str:
    return target + self.end_of_turn

  def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each rendered prompt, exactly the prefix training tokenized."""
    texts = [self.prompt_text(p) for p in prompts]
    ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(self.prefix_ids) + list(x) for x in ids]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end an answer: EOS, and the end-of-turn token in chat format."""
    ids = {self.tokenizer.eos_token_id} - {None}
    if self.end_of_turn:
      ids.add(self.tokenizer.convert_tokens_to_ids(self.end_of_turn))
    return tuple(sorted(int(i) for i in ids))


def adds_bos(tokenizer) -> bool:
  """Whether the tokenizer puts BOS in front of a text by itself."""
  bos = tokenizer.bos_token_id
  return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def make_renderer(tokenizer, prompt_format: str = "paper",
                  field: str = "config.data.prompt_format") -> Renderer:
  if prompt_format not in PROMPT_FORMATS:
    raise TemplateError(f"{field}={prompt_format!r}: expected one of {PROMPT_FORMATS}")
  if prompt_format == "paper":
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return Renderer(tokenizer, "paper", prefix_ids=(bos,) if adds_bos(tokenizer) else (),
                    suffix_ids=() if eos is None else (eos,))
  if not getattr(tokenizer, "chat_template", None):
    raise TemplateError(f"{field}='chat' but the tokenizer "
                        f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__})"
                        " has no chat template; use prompt_format='paper' or a chat base")
  return Renderer(tokenizer, "chat", end_of_turn=_end_of_turn(tokenizer, field))


def _end_of_turn(tokenizer, field: str) -> str:
  try:
    return chat_end_of_turn(tokenizer)
  except ValueError as e:
    raise TemplateError(f"{field}='chat': {e}") from None


def as_renderer(tokenizer_or_renderer) -> Renderer:
  """A Renderer as is; a bare tokenizer renders the paper format."""
  if isinstance(tokenizer_or_renderer, Renderer):
    return tokenizer_or_renderer
  return make_renderer(tokenizer_or_renderer, "paper")
