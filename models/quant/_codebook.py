"""Code books of the 4-bit formats (value tables only; the arithmetic is in `_blocks`)."""

import numpy as np

# NormalFloat-4 (Dettmers et al. 2023, "QLoRA", section 3 and appendix E): 16 values, with
# an exact zero, of the quantiles of N(0, 1) rescaled to [-1, 1]: 8 positive values from
# Phi^-1 over linspace(0.9677083, 0.5, 9)[:-1], 7 negative ones from -Phi^-1 over
# linspace(0.9677083, 0.5, 8)[:-1], and 0, each divided by the largest. These are the
# float32 values bitsandbytes ships (`get_4bit_type("nf4")`); tests/test_quant.py rebuilds
# them from that definition. Ascending, so a code's index orders like its value.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

# Round to nearest code: a value goes to code i when it lies above the midpoint between
# codes i - 1 and i (a value exactly on a midpoint goes to the lower code, as bitsandbytes'
# decision tree does with its strict comparisons).
NF4_MIDPOINTS = ((NF4[1:] + NF4[:-1]) / 2).astype(np.float32)

# Largest finite float8_e4m3fn, the 8-bit float of double quantization's second level.
FLOAT8_MAX = 448.0
