"""The knobs of the int8 graph (model_build/quantize.py describes the design they choose)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MS_DOMAIN = "com.microsoft"
# --fault-inject values the quantizer itself applies (a broken build the gate must refuse).
FAULTS = ("int8-weight-scale",)
FAULT_SCALE_FACTOR = 1.7

ActivationMode = Literal["row-sym", "row-asym"]
RowScale = Literal["mul", "a_scale"]


@dataclass(frozen=True)
class Int8Options:
    """The knobs of the int8 graph; the defaults are the measured choice."""

    activations: ActivationMode = "row-sym"
    # Inputs treated as one-sided whatever `activations` says: "gelu" = the FFN-out inputs.
    asym_inputs: Literal["none", "gelu"] = "gelu"
    # How those are quantized: an int Z = one fixed zero point Z and a per-row scale covering
    # [min, max] exactly (no correction after the GEMM); None = a zero point per row, corrected
    # after the GEMM with s_row * z_row * colsum(W) (two more passes over the output).
    gelu_zero_point: int | None = None
    # "mul": MatMulIntegerToFloat with a_scale 1, then one Mul by the row scale;
    # "a_scale": the row scale as MatMulIntegerToFloat's a_scale (the kernel broadcasts it).
    row_scale: RowScale = "mul"
    # "s8": int8 weights, MLAS's u8 x s8 kernels (VNNI, arm64).
    # "u8": the same values stored as uint8 + 128 (zero point 128), MLAS's u8 x u8 kernels, which
    # widen to int16 first: exact on x86 without VNNI, where u8 x s8 saturates.
    weights: Literal["s8", "u8"] = "s8"
    # 127: full int8 weights; 63 keeps every u8 x s8 pair sum inside int16 (less accurate).
    weight_max: int = 127
    # Activation code ranges: symmetric rows +-sym_max around sym_max + 1, one-sided rows
    # 0..asym_levels. 63/127 keep every u8 activation below 128 (AVX2-safe, less accurate).
    activation_sym_max: int = 127
    activation_asym_levels: int = 255
    word_embeddings: bool = True
    other_embeddings: bool = False
    heads: bool = False
    # MatMuls narrower than this (in K or N) stay fp32: nothing to gain (bge-m3's sparse head, N=1).
    min_features: int = 16
    # Substrings of node names to keep fp32 (experiments; the default keeps nothing by name).
    keep_fp32: tuple[str, ...] = ()
