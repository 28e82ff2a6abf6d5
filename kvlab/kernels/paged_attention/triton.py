"""Paged decode attention in Triton: same layout, signature and semantics as ``reference.py`` (read its docstring).

One program per (row b, kv head h) serves the G query heads of h's group at once: the G queries form the rows of a
(BLOCK_G, D) tile, so each key/value block is loaded once per group (GQA shares the memory traffic). The program
walks h's block table, one cache block of S tokens per step, with an online softmax in float32:

    m   <- max(m, rowmax(s))                 s = q k^T * scale      (BLOCK_G, BLOCK_S)
    acc <- acc * exp(m_old - m) + exp(s - m) v
    l   <- l   * exp(m_old - m) + rowsum(exp(s - m))
    out =  acc / l                           (0 for a head holding no tokens)

Tiles are padded to powers of two >= 16 (``tl.dot``'s smallest shape) and masked. Loads are upcast to float32
before ``tl.dot`` (exact in the interpreter, where bf16 ``tl.dot`` is wrong; on a GPU decode is memory-bound,
so fp32 arithmetic costs little) and ``input_precision="ieee"`` keeps TF32 out of the comparison.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_paged

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr,
    stride_qb, stride_qh, stride_qd,  # query (B, H, D)
    stride_kn, stride_ks, stride_kd,  # key_pool (N_blocks, S, D)
    stride_vn, stride_vs, stride_vd,  # value_pool (N_blocks, S, Dv)
    stride_tb, stride_th, stride_tm,  # block_tables (B, H_kv, M)
    stride_lb, stride_lh,  # lengths (B, H_kv)
    stride_ob, stride_oh, stride_od,  # out (B, H, Dv)
    scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIM: tl.constexpr, VDIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)  # query heads of the group
    s = tl.arange(0, BLOCK_S)  # token within a cache block
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = h * GROUP + g

    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh).to(tl.int32)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=(g[:, None] < GROUP) & (d[None, :] < DIM), other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    for i in range(0, tl.cdiv(length, BLOCK_SIZE)):
        block = tl.load(tables_ptr + b * stride_tb + h * stride_th + i * stride_tm).to(tl.int64)
        token = i * BLOCK_SIZE + s
        held = (s < BLOCK_SIZE) & (token < length)  # (BLOCK_S,)
        k = tl.load(k_ptr + block * stride_kn + s[:, None] * stride_ks + d[None, :] * stride_kd,
                    mask=held[:, None] & (d[None, :] < DIM), other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_D)
        v = tl.load(v_ptr + block * stride_vn + s[:, None] * stride_vs + dv[None, :] * stride_vd,
                    mask=held[:, None] & (dv[None, :] < VDIM), other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_DV)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_G, BLOCK_S)
        scores = tl.where(held[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every visited block holds >= 1 token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # length 0: acc == 0 -> zeros
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dv[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=(g[:, None] < GROUP) & (dv[None, :] < VDIM))


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def paged_decode_attention(
    query: torch.Tensor,  # (B, H, D)
    key_pool: torch.Tensor,  # (N_blocks, S, D)
    value_pool: torch.Tensor,  # (N_blocks, S, Dv)
    block_tables: torch.Tensor,  # (B, H_kv, M)
    lengths: torch.Tensor,  # (B, H_kv)
    scaling: float | None = None,
) -> torch.Tensor:
    """(B, H, Dv) in the query's dtype: softmax(q k^T * scaling) v over the tokens each (row, kv head) holds."""
    check_paged(query, key_pool, value_pool, block_tables, lengths)
    check_kernel_inputs(query, key_pool, value_pool, block_tables, lengths)
    batch, heads, dim = query.shape
    n_kv = block_tables.shape[1]
    block, vdim = key_pool.shape[1], value_pool.shape[2]
    group = heads // n_kv
    scale = scaling if scaling is not None else dim**-0.5
    out = torch.empty(batch, heads, vdim, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    _paged_decode_kernel[(batch, n_kv)](
        query, key_pool, value_pool, block_tables, lengths, out,
        *query.stride(), *key_pool.stride(), *value_pool.stride(), *block_tables.stride(), *lengths.stride(),
        *out.stride(), scale,
        GROUP=group, BLOCK_SIZE=block, DIM=dim, VDIM=vdim,
        BLOCK_G=_tile(group), BLOCK_S=_tile(block), BLOCK_D=_tile(dim), BLOCK_DV=_tile(vdim),
    )
    return out


def check_kernel_inputs(query, key_pool, value_pool, block_tables, lengths) -> None:
    """What the kernel needs beyond :func:`check_paged`: one device, float dtypes, block ids inside the pool."""
    tensors = dict(query=query, key_pool=key_pool, value_pool=value_pool, block_tables=block_tables, lengths=lengths)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    if query.dtype not in FLOATS or key_pool.dtype != query.dtype or value_pool.dtype != query.dtype:
        raise ValueError(f"query, key_pool and value_pool must share one dtype among {FLOATS}, got {query.dtype}, "
                         f"{key_pool.dtype}, {value_pool.dtype}")
    block = key_pool.shape[1]
    used = torch.arange(block_tables.shape[2], device=lengths.device) < (lengths[..., None] + block - 1) // block
    ids = block_tables[used]
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= key_pool.shape[0]).any())):
        raise ValueError(f"block_tables entries in use must be block ids in [0, {key_pool.shape[0]}), got min "
                         f"{int(ids.min())}, max {int(ids.max())}")
