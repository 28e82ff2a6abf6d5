"""Decode attention over projected K/V in Triton: layout, signature and semantics of ``reference.py``.

One program per (row b, kv head h) serves the G query heads of h's group (rows of a (BLOCK_G, .) tile):

    U, W   = the head's bases, read from key_basis / value_basis at the head's offsets
    q'     = q U                                      (BLOCK_G, BLOCK_R)    projected once, in registers
    for each tile of BLOCK_T tokens (online softmax, float32):
        s    = q' (key codes)^T * scale               (BLOCK_G, BLOCK_T)    tokens >= length masked
        acc  = acc * exp(m_old - m) + exp(s - m) (value codes)             (BLOCK_G, BLOCK_RV)
    o' = acc / l ;  lift: o = o' W^T                  (BLOCK_G, BLOCK_DV)

Only r_h + r_v_h numbers per token are read instead of D + Dv. Tiles are padded to powers of two >= 16 (the
smallest ``tl.dot``) and sized by the largest rank; columns past a head's rank are masked to zero. Loads are upcast
to float32 before ``tl.dot`` (bf16 ``tl.dot`` is wrong in the interpreter) with ``input_precision="ieee"``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import Offsets, check_projected

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _projected_decode_kernel(
    q_ptr, kc_ptr, vc_ptr, u_ptr, w_ptr, k_off_ptr, v_off_ptr, lengths_ptr, out_ptr,
    stride_qb, stride_qh, stride_qd,  # query (B, H, D)
    stride_kb, stride_kt, stride_kr,  # key_codes (B, T, R_k)
    stride_vb, stride_vt, stride_vr,  # value_codes (B, T, R_v)
    stride_ud, stride_ur,  # key_basis (D, R_k)
    stride_wd, stride_wr,  # value_basis (Dv, R_v)
    stride_ob, stride_oh, stride_od,  # out (B, H, Dv) or (B, H, max r_v)
    tokens, width, scale,
    GROUP: tl.constexpr, DIM: tl.constexpr, VDIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, LIFT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
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

    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=(g[:, None] < GROUP) & (d[None, :] < DIM), other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    u = tl.load(u_ptr + d[:, None] * stride_ud + (k0 + r)[None, :] * stride_ur,
                mask=(d[:, None] < DIM) & (r[None, :] < rank), other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_R)
    q_code = tl.dot(q, u, input_precision="ieee")  # (BLOCK_G, BLOCK_R)

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
        scores = tl.dot(q_code, tl.trans(kc), input_precision="ieee") * scale  # (BLOCK_G, BLOCK_T)
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
    else:  # columns in [r_v_h, max r_v) hold zeros (masked code loads), so the padding is written too
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + rv[None, :] * stride_od,
                 o_code.to(out_ptr.dtype.element_ty), mask=(g[:, None] < GROUP) & (rv[None, :] < width))


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def projected_decode_attention(
    query: torch.Tensor,  # (B, H, D)
    key_codes: torch.Tensor,  # (B, T, R_k)
    value_codes: torch.Tensor,  # (B, T, R_v)
    key_basis: torch.Tensor,  # (D, R_k)
    value_basis: torch.Tensor,  # (Dv, R_v)
    key_offsets: Offsets,  # (H_kv + 1,)
    value_offsets: Offsets,  # (H_kv + 1,)
    lengths: torch.Tensor | None = None,  # (B,)
    scaling: float | None = None,
    lift: bool = True,
    block_tokens: int = 32,
) -> torch.Tensor:
    """(B, H, Dv) with ``lift``, else (B, H, max r_v_h) zero-padded; ``block_tokens`` tokens per loop step."""
    k_off, v_off = check_projected(query, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets,
                                   lengths)
    check_kernel_inputs(query, key_codes, value_codes, key_basis, value_basis, lengths, block_tokens)
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
    _projected_decode_kernel[(batch, n_kv)](
        query, key_codes, value_codes, key_basis, value_basis, k_off_t, v_off_t,
        lengths if lengths is not None else k_off_t, out,  # any pointer when there are no lengths
        *query.stride(), *key_codes.stride(), *value_codes.stride(), *key_basis.stride(), *value_basis.stride(),
        *out.stride(), tokens, width, scale,
        GROUP=group, DIM=dim, VDIM=vdim, HAS_LENGTHS=lengths is not None, LIFT=lift,
        BLOCK_G=_tile(group), BLOCK_T=block_tokens, BLOCK_D=_tile(dim), BLOCK_DV=_tile(vdim),
        BLOCK_R=_tile(max_rank), BLOCK_RV=_tile(max_vrank),
    )
    return out


def check_kernel_inputs(query, key_codes, value_codes, key_basis, value_basis, lengths, block_tokens) -> None:
    """What the kernel needs beyond :func:`check_projected`: one device, float dtypes, a usable token tile."""
    tensors = dict(query=query, key_codes=key_codes, value_codes=value_codes, key_basis=key_basis,
                   value_basis=value_basis, lengths=lengths)
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    if query.dtype not in FLOATS or key_codes.dtype != query.dtype or value_codes.dtype != query.dtype:
        raise ValueError(f"query, key_codes and value_codes must share one dtype among {FLOATS}, got {query.dtype}, "
                         f"{key_codes.dtype}, {value_codes.dtype}")
    if key_basis.dtype not in FLOATS or value_basis.dtype not in FLOATS:
        raise ValueError(f"bases must be one of {FLOATS} (any of them), got {key_basis.dtype}, {value_basis.dtype}")
    if block_tokens < 16 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two >= 16, got {block_tokens}")
