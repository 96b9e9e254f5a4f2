"""Quantized frozen bases (QLoRA): NF4, int8 and GGUF blocks kept packed in memory.

The projections of a quantized base are `QuantizedWeight`s (packed codes and scales, in
[.., out, in] layout, stacked over layers like the float weights). The model dequantizes
one layer's weights at a time inside its layer scan (`matmul`), so a dense copy of the
base never exists; adapters, their gradients and optimizer state are unchanged.
"""

from models.quant._base import (DEFAULT_BLOCK_SIZE, MODES, PROJECTIONS, QuantConfig, base_bytes,
                                 dequantize_base, formats, from_gguf, is_quantized,
                                 quantize_base, quantize_layers, quantize_matrix,
                                 to_float)
from models.quant._blocks import FORMATS, GGUF_LAYOUTS, split_gguf_rows
from models.quant._sizes import estimate_bytes
from models.quant._codebook import NF4
from models.quant._weight import QuantizedWeight, dense, matmul, take_rows

__all__ = ["DEFAULT_BLOCK_SIZE", "FORMATS", "GGUF_LAYOUTS", "MODES", "NF4", "PROJECTIONS", "QuantConfig",
           "QuantizedWeight", "base_bytes", "dense", "dequantize_base", "estimate_bytes", "formats",
           "from_gguf", "is_quantized", "matmul", "quantize_base", "quantize_layers",
           "quantize_matrix", "split_gguf_rows", "take_rows", "to_float"]
