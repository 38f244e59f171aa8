"""Low-precision formats as quantise-dequantise ops: FP8 (E4M3, E5M2), NVFP4, MXFP4, and the random
Hadamard transform of the NVFP4 recipe. `quantize` is the entry point; encode_fp8 / decode_fp8 /
fp8_scale are the pieces an FP8 KV cache stores and calibrates."""

from nemojax.quant.formats import (
    FORMATS, MXFP4_BLOCK, NVFP4_BLOCK, ROUNDINGS, decode_fp8, encode_fp8, fp8_scale, quantize,
)
from nemojax.quant.hadamard import hadamard_transform, random_hadamard

__all__ = [
    "FORMATS", "MXFP4_BLOCK", "NVFP4_BLOCK", "ROUNDINGS", "decode_fp8", "encode_fp8", "fp8_scale",
    "hadamard_transform", "quantize", "random_hadamard",
]
