r"""Greedy (or sampled) completion from a LLaMA checkpoint, optionally with a PEFT adapter.

  python -m launch.generate --model=HF_DIR [--adapter=PEFT_DIR] \
      --prompt="Patient denies chest pain." [--prompt=...] --max_new_tokens=32
  python -m launch.generate --model=smollm2-135m-instruct --chat --prompt="What is ...?"

--model takes an HF checkpoint directory, a .gguf file or a named base (models/bases.py,
fetched into the cache on first use). --quantize=nf4|int8|keep holds the base quantized
(models/quant): `--model=smollm2-135m-instruct --quantize=keep` decodes on the file's own
Q4_1 blocks.
Prompts are batched, left-padded to a power-of-two bucket and decoded with a jitted
KV-cache loop; completions go to stdout, one block per prompt.
"""

import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from launch import errors, quant_flags
from fedjax_lora.data import templates
from models import checkpoints, generation, peft_io
from models.tokenizer import TokenizerError

_MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory, .gguf file, named base "
                             "(e.g. smollm2-135m-instruct) or hub id when online.", required=True)
_ADAPTER = flags.DEFINE_string("adapter", None, "PEFT LoRA adapter directory to apply.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.",
                                    required=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Maximum number of tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples at this temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (ignored when greedy).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Parameter and compute dtype of the base model (logits stay float32).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn in the tokenizer's "
                          "chat template (instruct bases) and stop at its end-of-turn token.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts decoded together per compiled call.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MAX_NEW.value < 1:
    raise app.UsageError("--max_new_tokens must be >= 1")
  if _TEMPERATURE.value < 0:
    raise app.UsageError("--temperature must be >= 0")
  qc = quant_flags.config()
  model_path = checkpoints.resolve(_MODEL.value, log=logging.info, gguf=qc.reads_gguf)
  config = checkpoints.load_config(model_path, param_dtype=_DTYPE.value, dtype=_DTYPE.value)
  config, graphdef, params = checkpoints.load_params(model_path, config, log=logging.info,
                                                     quantize=qc)
  tokenizer = checkpoints.load_tokenizer(model_path)
  adapters = ()
  if _ADAPTER.value:
    adapters = (peft_io.import_adapter(_ADAPTER.value, config),)
    logging.info("applied adapter %s (%s)", _ADAPTER.value, adapters[0].spec)
  if len(tokenizer) > config.vocab_size:
    raise TokenizerError(f"{model_path}: tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {config.vocab_size}")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = set(checkpoints.stop_ids(model_path, config, tokenizer))
  if _CHAT.value:
    renderer = templates.make_renderer(tokenizer, "chat", field="--chat")
    eos |= set(renderer.stop_ids)
    encoded = renderer.prompt_ids(_PROMPT.value)
  else:
    encoded = [tokenizer(p)["input_ids"] for p in _PROMPT.value]
  eos = tuple(sorted(eos))
  prompts = list(_PROMPT.value)
  # One batch shape for every chunk (the last one is padded with copies), so one compile.
  batch = min(_BATCH.value, generation.bucket_length(len(encoded), minimum=1))
  rng = jax.random.key(_SEED.value)
  completions, new_tokens, seconds = [], 0, 0.0
  for start in range(0, len(encoded), batch):
    chunk = encoded[start:start + batch]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch - real)
    tokens, mask = generation.left_pad(chunk, pad_id)
    rng, key = jax.random.split(rng)
    t0 = time.perf_counter()
    out, lengths = generation.generate(
        config, graphdef, params, adapters, jnp.asarray(tokens), jnp.asarray(mask),
        max_new_tokens=_MAX_NEW.value, eos_ids=eos, sample=_TEMPERATURE.value > 0,
        temperature=max(_TEMPERATURE.value, 1e-6), rng=key, pad_id=pad_id)
    out, lengths = jax.device_get((out, lengths))
    seconds += time.perf_counter() - t0
    for row, n in zip(out[:real], lengths[:real]):
      ids = [int(t) for t in row[:n] if int(t) not in eos]
      completions.append(tokenizer.decode(ids, skip_special_tokens=True))
      new_tokens += int(n)
  logging.info("generated %d tokens in %.2fs (%.1f tokens/s, compile included)",
               new_tokens, seconds, new_tokens / max(seconds, 1e-9))
  for prompt, completion in zip(prompts, completions):
    sys.stdout.write(f"### prompt\n{prompt}\n### completion\n{completion}\n")


if __name__ == "__main__":
  errors.run(main)
