r"""Converts between GGUF files (llama.cpp, Ollama, LM Studio) and Hugging Face LLaMA checkpoints.

  # GGUF -> HF directory (config.json, model.safetensors, tokenizer, generation_config.json)
  python -m launch.convert --to=hf --src=model.gguf --out=DIR [--dtype=float32]

  # HF directory or GGUF (+ a PEFT LoRA adapter merged in) -> GGUF
  python -m launch.convert --to=gguf --base=DIR_OR_GGUF [--adapter=PEFT_DIR] \
      --out=merged.gguf [--type=f16] [--pre=NAME] [--quantize=nf4]

--quantize names the base an adapter was trained on (QLoRA): the base is held that way and
dequantized to float32 before merging, as peft's merge_and_unload does, so the merged
weights are what the adapter saw plus its update.

A GGUF read here is dequantized to float32 first, so converting a quantized file to HF
keeps its quantization error; writing q8_0/q4_* quantizes again from those values.
"""

from absl import app, flags

from launch import errors, quant_flags
from models import bases, checkpoints, gguf_export

_TO = flags.DEFINE_enum("to", None, ["hf", "gguf"],
                        "Direction: 'hf' turns --src (a GGUF file) into an HF directory at --out; "
                        "'gguf' writes --base (plus --adapter, merged) as a GGUF file at --out.",
                        required=True)
_OUT = flags.DEFINE_string("out", None, "Output: a directory for --to=hf, a .gguf file for "
                           "--to=gguf (written beside as .tmp, then renamed).", required=True)
_SRC = flags.DEFINE_string("src", None, "--to=hf: the GGUF file to convert (LLaMA architecture; "
                           "any tensor type gguf-py can dequantize).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(gguf_export.HF_DTYPES),
                           "--to=hf: dtype of the written safetensors weights.")
_BASE = flags.DEFINE_string("base", None, "--to=gguf: the base model, a named base, an HF checkpoint directory "
                            "(with its tokenizer files) or a GGUF file.")
_ADAPTER = flags.DEFINE_string("adapter", None, "--to=gguf: a PEFT LoRA adapter directory to "
                               "merge into the base (W + alpha/r * B A) before writing.")
_TYPE = flags.DEFINE_enum("type", "f16", list(gguf_export.TENSOR_TYPES),
                          "--to=gguf: tensor type of the weight matrices; norms stay f32, and a "
                          "matrix whose rows do not fill whole quantization blocks falls back "
                          "to f16 (logged).")
_PRE = flags.DEFINE_string("pre", None, "--to=gguf: llama.cpp pre-tokenizer name written as "
                           "tokenizer.ggml.pre (e.g. llama-bpe, smollm, qwen2). Default: the "
                           "base GGUF's own; for an HF base 'gpt-2' when its tokenizer splits "
                           "as GPT-2 does, else 'default'. llama.cpp refuses names it does not "
                           "know.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  used = {"src": _SRC.value, "base": _BASE.value, "adapter": _ADAPTER.value, "pre": _PRE.value}
  allowed = {"hf": {"src"}, "gguf": {"base", "adapter", "pre"}}[_TO.value]
  stray = sorted(k for k, v in used.items() if v is not None and k not in allowed)
  if stray:
    raise app.UsageError(f"--{stray[0]} does not apply to --to={_TO.value}")
  if _TO.value == "hf" and quant_flags.QUANTIZE.value != "none":
    raise app.UsageError("--quantize applies to --to=gguf (merging an adapter trained on a "
                         "quantized base), not --to=hf")
  if _TO.value == "hf":
    if not _SRC.value:
      raise app.UsageError("--to=hf needs --src=FILE.gguf")
    print(gguf_export.gguf_to_hf_dir(_SRC.value, _OUT.value, _DTYPE.value, log=print))
  else:
    if not _BASE.value:
      raise app.UsageError("--to=gguf needs --base=HF_DIR_OR_GGUF")
    base = _BASE.value  # a named base is read from its cached GGUF (pre-tokenizer kept)
    base = (bases.gguf_path(base) if bases.is_named(base)
            else checkpoints.resolve(base, log=print))
    print(gguf_export.merged_to_gguf(base, _OUT.value, _ADAPTER.value, _TYPE.value,
                                     _PRE.value, log=print, quantize=quant_flags.config()))


if __name__ == "__main__":
  errors.run(main)
