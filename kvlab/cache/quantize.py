"""Integer quantization of KV entries with real bit packing: the primitives of the precision axis (KIVI).

Asymmetric min-max quantization in groups: a group of numbers x shares a scale s = (max - min) / (2^b - 1) and a
zero point z = min; its codes are q = round((x - z) / s) in [0, 2^b - 1] and it reads back as q * s + z. Scales and
zero points are stored in float16 (as KIVI does), so their bytes are the same whatever the cache's dtype.

Two groupings (KIVI, Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):

* per channel (keys): ``quantize_blocks`` on (..., T, D) with T a multiple of ``group``: each channel of each block
  of ``group`` tokens shares (s, z): scales (..., T / group, D);
* per token (values): ``quantize_groups`` on (..., T, D) with D a multiple of ``group``: each token's ``group``
  consecutive channels share (s, z): scales (..., T, D / group).

Packing: ``pack`` stores 8 / b codes per uint8 along the last axis ((..., D) -> (..., D * b / 8)), code i of a byte
in bits [b*i, b*i + b); ``unpack`` inverts it. ``BITS`` are the widths allowed.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16
EPS = 1e-6  # smallest scale: a group of equal numbers reads back exactly (codes 0)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return int(bits)


def packed_width(dim: int, bits: int) -> int:
    """Bytes of one packed vector of ``dim`` codes."""
    per = 8 // check_bits(bits)
    if dim % per:
        raise ValueError(f"{dim} codes of {bits} bits do not fill whole bytes (need a multiple of {per})")
    return dim // per


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) integer codes in [0, 2^bits) -> (..., D * bits / 8) uint8."""
    per = 8 // check_bits(bits)
    packed_width(codes.shape[-1], bits)
    if per == 1:
        return codes.to(torch.uint8)
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)  # (..., D / per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    return (c << shifts).sum(-1, dtype=torch.uint8)  # bits of different codes do not overlap: sum == or


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., W) uint8 -> (..., W * 8 / bits) uint8 codes."""
    per = 8 // check_bits(bits)
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (..., W, per)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _quantize(x: torch.Tensor, dim: int, bits: int):
    """Min-max over ``dim`` of float32 ``x``: (codes uint8 like x, scale, zero in SCALE_DTYPE, keepdim on ``dim``)."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / levels).clamp(min=EPS).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def quantize_blocks(x: torch.Tensor, bits: int, group: int):
    """Per channel: (..., T, D), T a multiple of ``group`` -> packed (..., T, D * b / 8), scale and zero
    (..., T / group, D)."""
    *lead, tokens, dim = x.shape
    if tokens % group:
        raise ValueError(f"{tokens} tokens do not split into blocks of {group}")
    blocks = x.float().reshape(*lead, tokens // group, group, dim)  # (..., T / G, G, D)
    codes, scale, zero = _quantize(blocks, -2, bits)
    return pack(codes.reshape(*lead, tokens, dim), bits), scale.squeeze(-2), zero.squeeze(-2)


def dequantize_blocks(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_blocks`: (..., T, D) in ``dtype``."""
    codes = unpack(packed, bits)
    *lead, tokens, dim = codes.shape
    n_blocks = scale.shape[-2]
    c = codes.reshape(*lead, n_blocks, tokens // max(n_blocks, 1), dim).float()  # (..., T / G, G, D)
    x = c * scale.float()[..., None, :] + zero.float()[..., None, :]
    return x.reshape(*lead, tokens, dim).to(dtype)


def quantize_groups(x: torch.Tensor, bits: int, group: int):
    """Per token: (..., T, D), D a multiple of ``group`` -> packed (..., T, D * b / 8), scale and zero
    (..., T, D / group)."""
    *lead, tokens, dim = x.shape
    if dim % group:
        raise ValueError(f"group size {group} does not divide the vector size {dim}")
    groups = x.float().reshape(*lead, tokens, dim // group, group)  # (..., T, D / G, G)
    codes, scale, zero = _quantize(groups, -1, bits)
    return pack(codes.reshape(*lead, tokens, dim), bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: (..., T, D) in ``dtype``."""
    codes = unpack(packed, bits)
    *lead, tokens, dim = codes.shape
    n_groups = scale.shape[-1]
    c = codes.reshape(*lead, tokens, n_groups, dim // max(n_groups, 1)).float()  # (..., T, D / G, G)
    x = c * scale.float()[..., None] + zero.float()[..., None]
    return x.reshape(*lead, tokens, dim).to(dtype)


def check_options(bits, group_size, residual, dim: int | None = None) -> None:
    """The options of a quantized cache; ValueError saying what is allowed."""
    check_bits(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(f"residual (the full-precision window of recent tokens) must be an int >= 0, got {residual!r}")
    if dim is not None and dim % group_size:
        raise ValueError(f"group_size {group_size} does not divide head_dim {dim}: values are quantized per token in "
                         f"groups of group_size channels; allowed: the divisors of {dim}")
