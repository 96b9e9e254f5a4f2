"""The quantized-base flags of the launchers that take a model by flag (generate, convert);
the config-file launchers read config.model.quantize / quant_block_size /
quant_double_quant instead. Importing this module defines the flags."""

from absl import flags

from models import quant

QUANTIZE = flags.DEFINE_enum(
    "quantize", "none", list(quant.MODES),
    "How the frozen base is held in memory: none (float, --dtype); nf4 (QLoRA's 4-bit "
    "NormalFloat, blockwise absmax); int8 (blockwise absmax); keep (a .gguf base's "
    "Q4_0/Q4_1/Q8_0 blocks as stored). Projections only; compute stays in --dtype.")
BLOCK_SIZE = flags.DEFINE_integer("quant_block_size", quant.DEFAULT_BLOCK_SIZE,
                                  "Weights per scale for --quantize=nf4 / int8 (QLoRA: 64).")
DOUBLE_QUANT = flags.DEFINE_bool("quant_double_quant", False,
                                 "--quantize=nf4: scales in float8, one float32 scale per 256 "
                                 "of them (QLoRA's double quantization).")


def config() -> quant.QuantConfig:
  """The flags as a QuantConfig (a bad combination raises QuantizationError naming it)."""
  return quant.QuantConfig(QUANTIZE.value, BLOCK_SIZE.value, DOUBLE_QUANT.value)
