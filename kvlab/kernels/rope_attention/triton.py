"""Decode attention over pre-RoPE projected keys in Triton, rebuilding and rotating each key in the kernel: layout,
signature and semantics of ``reference.py``.

One program per (row b, kv head h) serves the G query heads of h's group. The head dimension is handled as its two
rotary halves (feature i pairs with i + D/2):

    q_lo, q_hi = the query's halves                    (BLOCK_G, BLOCK_H)
    U_lo, U_hi = the head's key basis rows, halves     (BLOCK_H, BLOCK_R)
    for each tile of BLOCK_T tokens (online softmax, float32):
        k_lo = c U_lo^T,  k_hi = c U_hi^T              (BLOCK_T, BLOCK_H)    rebuilt pre-RoPE key
        a    = p_t * inv_freq;  cos, sin (x rope_scale)                       rotary of each token's position
        s    = q_lo (k_lo cos - k_hi sin)^T + q_hi (k_hi cos + k_lo sin)^T   (BLOCK_G, BLOCK_T) * scale
        acc  = acc * exp(m_old - m) + exp(s - m) (value codes)             (BLOCK_G, BLOCK_RV)
    o' = acc / l ;  lift: o = o' W^T

Memory traffic is that of the post-RoPE projected read (r + r_v numbers per token, plus the int position); the
extra work is the rebuild (2 x BLOCK_T x BLOCK_H x BLOCK_R per tile) and one cos/sin per (token, frequency).
Tiles are powers of two >= 16; loads are upcast to float32 before ``tl.dot`` (``input_precision="ieee"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..projected_attention.reference import Offsets, check_projected
from ..projected_attention.triton import _tile, check_kernel_inputs
from .reference import check_rope


@triton.jit
def _rope_decode_kernel(
    q_ptr, kc_ptr, vc_ptr, u_ptr, w_ptr, k_off_ptr, v_off_ptr, pos_ptr, f_ptr, lengths_ptr, out_ptr,
    stride_qb, stride_qh, stride_qd,  # query (B, H, D)
    stride_kb, stride_kt, stride_kr,  # key_codes (B, T, R_k)
    stride_vb, stride_vt, stride_vr,  # value_codes (B, T, R_v)
    stride_ud, stride_ur,  # key_basis (D, R_k)
    stride_wd, stride_wr,  # value_basis (Dv, R_v)
    stride_pb, stride_pt,  # positions (B, T)
    stride_ob, stride_oh, stride_od,  # out (B, H, Dv) or (B, H, max r_v)
    tokens, width, scale, rope_scale,
    GROUP: tl.constexpr, HALF: tl.constexpr, VDIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, LIFT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    rv = tl.arange(0, BLOCK_RV)
    heads = h * GROUP + g
    k0 = tl.load(k_off_ptr + h)
    rank = tl.load(k_off_ptr + h + 1) - k0
    v0 = tl.load(v_off_ptr + h)
    vrank = tl.load(v_off_ptr + h + 1) - v0
    length = tokens
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b).to(tl.int32)

    qmask = (g[:, None] < GROUP) & (d[None, :] < HALF)
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lo = tl.load(q_row + d[None, :] * stride_qd, mask=qmask, other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_H)
    q_hi = tl.load(q_row + (HALF + d)[None, :] * stride_qd, mask=qmask, other=0.0).to(tl.float32)
    umask = (d[:, None] < HALF) & (r[None, :] < rank)
    u_col = u_ptr + (k0 + r)[None, :] * stride_ur
    u_lo = tl.load(u_col + d[:, None] * stride_ud, mask=umask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_R)
    u_hi = tl.load(u_col + (HALF + d)[:, None] * stride_ud, mask=umask, other=0.0).to(tl.float32)
    freq = tl.load(f_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)  # (BLOCK_H,)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_RV), dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        token = start + t
        held = token < length  # (BLOCK_T,)
        kc = tl.load(kc_ptr + b * stride_kb + token[:, None] * stride_kt + (k0 + r)[None, :] * stride_kr,
                     mask=held[:, None] & (r[None, :] < rank), other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_R)
        vc = tl.load(vc_ptr + b * stride_vb + token[:, None] * stride_vt + (v0 + rv)[None, :] * stride_vr,
                     mask=held[:, None] & (rv[None, :] < vrank), other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_RV)
        pos = tl.load(pos_ptr + b * stride_pb + token * stride_pt, mask=held, other=0).to(tl.float32)  # (BLOCK_T,)
        k_lo = tl.dot(kc, tl.trans(u_lo), input_precision="ieee")  # (BLOCK_T, BLOCK_H) pre-RoPE halves
        k_hi = tl.dot(kc, tl.trans(u_hi), input_precision="ieee")
        angle = pos[:, None] * freq[None, :]
        cos = tl.cos(angle) * rope_scale
        sin = tl.sin(angle) * rope_scale
        rot_lo = k_lo * cos - k_hi * sin
        rot_hi = k_hi * cos + k_lo * sin
        scores = (tl.dot(q_lo, tl.trans(rot_lo), input_precision="ieee")
                  + tl.dot(q_hi, tl.trans(rot_hi), input_precision="ieee")) * scale  # (BLOCK_G, BLOCK_T)
        scores = tl.where(held[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every tile holds >= 1 token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vc, input_precision="ieee")
        m_i = m_new

    o_code = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # (BLOCK_G, BLOCK_RV); length 0 -> zeros
    if LIFT:
        dv = tl.arange(0, BLOCK_DV)
        w = tl.load(w_ptr + dv[:, None] * stride_wd + (v0 + rv)[None, :] * stride_wr,
                    mask=(dv[:, None] < VDIM) & (rv[None, :] < vrank), other=0.0).to(tl.float32)  # (BLOCK_DV, BLOCK_RV)
        out = tl.dot(o_code, tl.trans(w), input_precision="ieee")  # (BLOCK_G, BLOCK_DV)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dv[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=(g[:, None] < GROUP) & (dv[None, :] < VDIM))
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + rv[None, :] * stride_od,
                 o_code.to(out_ptr.dtype.element_ty), mask=(g[:, None] < GROUP) & (rv[None, :] < width))


def rope_decode_attention(
    query: torch.Tensor,  # (B, H, D) post-RoPE
    key_codes: torch.Tensor,  # (B, T, R_k) codes of pre-RoPE keys
    value_codes: torch.Tensor,  # (B, T, R_v)
    key_basis: torch.Tensor,  # (D, R_k)
    value_basis: torch.Tensor,  # (Dv, R_v)
    key_offsets: Offsets,  # (H_kv + 1,)
    value_offsets: Offsets,  # (H_kv + 1,)
    positions: torch.Tensor,  # (B, T) int
    inv_freq: torch.Tensor,  # (D / 2,)
    rope_scale: float = 1.0,
    lengths: torch.Tensor | None = None,  # (B,)
    scaling: float | None = None,
    lift: bool = True,
    block_tokens: int = 32,
) -> torch.Tensor:
    """(B, H, Dv) with ``lift``, else (B, H, max r_v_h) zero-padded; ``block_tokens`` tokens per loop step."""
    k_off, v_off = check_projected(query, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets,
                                   lengths)
    check_rope(query, key_codes, positions, inv_freq)
    check_kernel_inputs(query, key_codes, value_codes, key_basis, value_basis, lengths, block_tokens)
    if positions.device != query.device or inv_freq.device != query.device:
        raise ValueError(f"positions and inv_freq must be on the query's device {query.device}")
    batch, heads, dim = query.shape
    n_kv, tokens, vdim = len(k_off) - 1, key_codes.shape[1], value_basis.shape[0]
    group = heads // n_kv
    max_rank = max(b - a for a, b in zip(k_off, k_off[1:]))
    max_vrank = max(b - a for a, b in zip(v_off, v_off[1:]))
    width = vdim if lift else max_vrank
    scale = scaling if scaling is not None else dim**-0.5
    out = torch.empty(batch, heads, width, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    k_off_t = torch.tensor(k_off, dtype=torch.int32, device=query.device)
    v_off_t = torch.tensor(v_off, dtype=torch.int32, device=query.device)
    _rope_decode_kernel[(batch, n_kv)](
        query, key_codes, value_codes, key_basis, value_basis, k_off_t, v_off_t, positions, inv_freq,
        lengths if lengths is not None else k_off_t, out,  # any pointer when there are no lengths
        *query.stride(), *key_codes.stride(), *value_codes.stride(), *key_basis.stride(), *value_basis.stride(),
        *positions.stride(), *out.stride(), tokens, width, scale, float(rope_scale),
        GROUP=group, HALF=dim // 2, VDIM=vdim, HAS_LENGTHS=lengths is not None, LIFT=lift,
        BLOCK_G=_tile(group), BLOCK_T=block_tokens, BLOCK_H=_tile(dim // 2), BLOCK_DV=_tile(vdim),
        BLOCK_R=_tile(max_rank), BLOCK_RV=_tile(max_vrank),
    )
    return out
