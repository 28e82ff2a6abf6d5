"""Decode attention over a KIVI-quantized KV cache (:class:`kvlab.cache.quantized.QuantStore`), plain torch.

Layout (one layer; G = ``group``, b = ``bits``, per = 8 / b codes per byte):

    query    (B, H, D)                  H = n x H_kv; query head j reads kv head j // n
    k_codes  (B, H_kv, Tq, D / per)     uint8, code of channel d of token t in byte d // per, bits b*(d % per) ...
    k_scale, k_zero (B, H_kv, Tq / G, D)  float16: one (scale, zero) per channel per block of G tokens
    v_codes  (B, H_kv, Tq, Dv / per)    uint8
    v_scale, v_zero (B, H_kv, Tq, Dv / G) float16: one per token per group of G channels
    k_tail   (B, H_kv, Tr, D), v_tail (B, H_kv, Tr, Dv)   the recent tokens at full precision (Tr may be 0)

Every row holds the same Tq + Tr tokens (a decode step of one batch). Output (B, H, Dv) in the query's dtype:
softmax over all tokens of (q . k_hat) * scale, float32, with k_hat = code x scale + zero.
"""

from __future__ import annotations

import torch

from ...cache.quantize import check_bits, dequantize_blocks, dequantize_groups


def check_quant(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group):
    """Shapes of a quantized read; raises ValueError naming the fault. Returns (Tq, Tr)."""
    check_bits(bits)
    per = 8 // bits
    if query.ndim != 3:
        raise ValueError(f"query must be (B, H, D), got {tuple(query.shape)}")
    batch, heads, dim = query.shape
    if k_codes.ndim != 4 or k_codes.dtype != torch.uint8 or v_codes.ndim != 4 or v_codes.dtype != torch.uint8:
        raise ValueError(f"k_codes and v_codes must be uint8 (B, H_kv, Tq, packed), got {k_codes.dtype} "
                         f"{tuple(k_codes.shape)}, {v_codes.dtype} {tuple(v_codes.shape)}")
    b, n_kv, tq, kw = k_codes.shape
    if b != batch or heads % n_kv or kw * per != dim:
        raise ValueError(f"k_codes {tuple(k_codes.shape)} must be (B={batch}, H_kv dividing {heads}, Tq, "
                         f"D / {per} = {dim // per})")
    if group < 1 or tq % group:
        raise ValueError(f"Tq = {tq} quantized tokens must be whole blocks of group = {group}")
    dv = v_codes.shape[-1] * per
    if v_codes.shape[:3] != (batch, n_kv, tq) or dv % group:
        raise ValueError(f"v_codes {tuple(v_codes.shape)} must be (B, H_kv, Tq={tq}, Dv / {per}) with group {group} "
                         "dividing Dv")
    expect = {"k_scale": (batch, n_kv, tq // group, dim), "k_zero": (batch, n_kv, tq // group, dim),
              "v_scale": (batch, n_kv, tq, dv // group), "v_zero": (batch, n_kv, tq, dv // group)}
    for name, t in zip(expect, (k_scale, k_zero, v_scale, v_zero)):
        if tuple(t.shape) != expect[name]:
            raise ValueError(f"{name} must be {expect[name]}, got {tuple(t.shape)}")
    if k_tail.shape[:2] != (batch, n_kv) or k_tail.shape[-1] != dim or v_tail.shape[:3] != k_tail.shape[:3] \
            or v_tail.shape[-1] != dv:
        raise ValueError(f"k_tail / v_tail must be (B, H_kv, Tr, D={dim}) / (B, H_kv, Tr, Dv={dv}), got "
                         f"{tuple(k_tail.shape)}, {tuple(v_tail.shape)}")
    if tq + k_tail.shape[2] == 0:
        raise ValueError("the cache holds no token")
    return tq, k_tail.shape[2]


def quant_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits: int,
                           group: int, scaling: float | None = None) -> torch.Tensor:
    """(B, H, Dv): attention of one query per head over the dequantized cache and its full-precision tail."""
    tq, _ = check_quant(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group)
    batch, heads, dim = query.shape
    n_kv = k_codes.shape[1]
    keys, values = k_tail.float(), v_tail.float()
    if tq:
        keys = torch.cat([dequantize_blocks(k_codes, k_scale, k_zero, bits, torch.float32), keys], 2)
        values = torch.cat([dequantize_groups(v_codes, v_scale, v_zero, bits, torch.float32), values], 2)
    scale = scaling if scaling is not None else dim**-0.5
    q = query.float().reshape(batch, n_kv, heads // n_kv, dim)  # (B, H_kv, n, D)
    probs = torch.softmax(q @ keys.transpose(2, 3) * scale, dim=-1)  # (B, H_kv, n, T)
    return (probs @ values).reshape(batch, heads, -1).to(query.dtype)
