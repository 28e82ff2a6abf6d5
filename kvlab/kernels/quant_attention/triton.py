"""Decode attention over a KIVI-quantized KV cache in Triton: layout, signature and semantics of ``reference.py``.

One program per (row b, kv head h) serves the n query heads of h's group (rows of a (BLOCK_G, .) tile). The packed
codes are read as bytes and unpacked in registers: channel d of a token sits in byte d // per at bit offset
b * (d % per); its key parameters come from block t // G, its value parameters from group d // G of its own token.

    for each tile of BLOCK_T quantized tokens (online softmax, float32):
        k_hat = ((byte >> shift) & mask) * k_scale[t // G, d] + k_zero[t // G, d]     (BLOCK_T, BLOCK_D)
        v_hat = ((byte >> shift) & mask) * v_scale[t, d // G] + v_zero[t, d // G]     (BLOCK_T, BLOCK_DV)
        s = q k_hat^T * scale ; acc = acc * exp(m_old - m) + exp(s - m) v_hat
    then the same over the full-precision tail.

Only the packed bytes (b / 8 per number) and the float16 parameters are read for the quantized tokens. Loads are
upcast to float32 before ``tl.dot`` (bf16 ``tl.dot`` is wrong in the interpreter), ``input_precision="ieee"``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_quant

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _online(q, k, v, held, m_i, l_i, acc, scale):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_G, BLOCK_T)
    s = tl.where(held[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _quant_decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr, out_ptr,
    s_qb, s_qh, s_qd,  # query (B, H, D)
    s_kcb, s_kch, s_kct, s_kcw,  # k_codes (B, H_kv, Tq, D / per)
    s_ksb, s_ksh, s_kst, s_ksd,  # k_scale / k_zero (B, H_kv, Tq / G, D)
    s_vcb, s_vch, s_vct, s_vcw,  # v_codes (B, H_kv, Tq, Dv / per)
    s_vsb, s_vsh, s_vst, s_vsg,  # v_scale / v_zero (B, H_kv, Tq, Dv / G)
    s_ktb, s_kth, s_ktt, s_ktd,  # k_tail (B, H_kv, Tr, D)
    s_vtb, s_vth, s_vtt, s_vtd,  # v_tail (B, H_kv, Tr, Dv)
    s_ob, s_oh, s_od,  # out (B, H, Dv)
    quantized, tail, scale,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr, VDIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    heads = h * GROUP + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd,
                mask=(g[:, None] < GROUP) & (d[None, :] < DIM), other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    k_shift = ((d % PER) * BITS).to(tl.uint8)
    v_shift = ((dv % PER) * BITS).to(tl.uint8)
    for start in range(0, quantized, BLOCK_T):
        token = start + t
        held = token < quantized
        kmask = held[:, None] & (d[None, :] < DIM)
        vmask = held[:, None] & (dv[None, :] < VDIM)
        kb = tl.load(kc_ptr + b * s_kcb + h * s_kch + token[:, None] * s_kct + (d // PER)[None, :] * s_kcw,
                     mask=kmask, other=0)  # (BLOCK_T, BLOCK_D) bytes, each read once per code it holds
        k_par = b * s_ksb + h * s_ksh + (token // GROUP_SIZE)[:, None] * s_kst + d[None, :] * s_ksd
        k_hat = ((kb >> k_shift[None, :]) & MASK).to(tl.float32) * tl.load(ks_ptr + k_par, mask=kmask, other=0.0) \
            .to(tl.float32) + tl.load(kz_ptr + k_par, mask=kmask, other=0.0).to(tl.float32)
        vb = tl.load(vc_ptr + b * s_vcb + h * s_vch + token[:, None] * s_vct + (dv // PER)[None, :] * s_vcw,
                     mask=vmask, other=0)
        v_par = b * s_vsb + h * s_vsh + token[:, None] * s_vst + (dv // GROUP_SIZE)[None, :] * s_vsg
        v_hat = ((vb >> v_shift[None, :]) & MASK).to(tl.float32) * tl.load(vs_ptr + v_par, mask=vmask, other=0.0) \
            .to(tl.float32) + tl.load(vz_ptr + v_par, mask=vmask, other=0.0).to(tl.float32)
        m_i, l_i, acc = _online(q, k_hat, v_hat, held, m_i, l_i, acc, scale)
    for start in range(0, tail, BLOCK_T):
        token = start + t
        held = token < tail
        k = tl.load(kt_ptr + b * s_ktb + h * s_kth + token[:, None] * s_ktt + d[None, :] * s_ktd,
                    mask=held[:, None] & (d[None, :] < DIM), other=0.0).to(tl.float32)
        v = tl.load(vt_ptr + b * s_vtb + h * s_vth + token[:, None] * s_vtt + dv[None, :] * s_vtd,
                    mask=held[:, None] & (dv[None, :] < VDIM), other=0.0).to(tl.float32)
        m_i, l_i, acc = _online(q, k, v, held, m_i, l_i, acc, scale)
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + dv[None, :] * s_od, out.to(out_ptr.dtype.element_ty),
             mask=(g[:, None] < GROUP) & (dv[None, :] < VDIM))


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def quant_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits: int,
                           group: int, scaling: float | None = None, block_tokens: int = 16) -> torch.Tensor:
    """(B, H, Dv); ``block_tokens`` tokens per loop step (a power of two >= 16)."""
    tq, tr = check_quant(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group)
    if query.dtype not in FLOATS or k_tail.dtype not in FLOATS or v_tail.dtype not in FLOATS:
        raise ValueError(f"query and tails must be one of {FLOATS}, got {query.dtype}, {k_tail.dtype}, {v_tail.dtype}")
    if block_tokens < 16 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two >= 16, got {block_tokens}")
    devices = {t.device for t in (query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail)}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    k_scale, k_zero, v_scale, v_zero = (t.contiguous() for t in (k_scale, k_zero, v_scale, v_zero))  # shared strides
    batch, heads, dim = query.shape
    n_kv = k_codes.shape[1]
    vdim = v_tail.shape[-1]
    out = torch.empty(batch, heads, vdim, dtype=query.dtype, device=query.device)
    _quant_decode_kernel[(batch, n_kv)](
        query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, out,
        *query.stride(), *k_codes.stride(), *k_scale.stride(), *v_codes.stride(), *v_scale.stride(),
        *k_tail.stride(), *v_tail.stride(), *out.stride(), tq, tr, scaling if scaling is not None else dim**-0.5,
        BITS=bits, GROUP_SIZE=group, GROUP=heads // n_kv, DIM=dim, VDIM=vdim,
        BLOCK_G=_tile(heads // n_kv), BLOCK_T=block_tokens, BLOCK_D=_tile(dim), BLOCK_DV=_tile(vdim),
    )
    return out
