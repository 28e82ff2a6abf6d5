"""Paged decode attention, plain torch: one new query per sequence reads its kv heads' tokens through block tables.

Layout (KV-Compress / vLLM style, one block holds the tokens of one (layer, kv head) of one sequence):

    key_pool     (N_blocks, S, D)      S = block size (tokens per block)
    value_pool   (N_blocks, S, Dv)
    block_tables (B, H_kv, M) int      block ids of each (sequence, kv head), in token order; entries past the
                                       ones in use are ignored (any value, -1 by convention)
    lengths      (B, H_kv) int         tokens held by each (sequence, kv head): token t of head h of row b is
                                       key_pool[block_tables[b, h, t // S], t % S]
    query        (B, H, D)             H = G x H_kv query heads; query head j reads kv head j // G

Every held token is visible to the new query (decode after the context: causality holds by construction).
A (row, head) with length 0 gives a zero output. Softmax in float32; the output is in the query's dtype.
"""

from __future__ import annotations

import torch


def check_paged(query, key_pool, value_pool, block_tables, lengths) -> None:
    """Shapes and dtypes of a paged read; raises ValueError naming what is wrong."""
    if query.ndim != 3 or key_pool.ndim != 3 or value_pool.ndim != 3:
        raise ValueError(f"query must be (B, H, D) and pools (N_blocks, S, D): got query {tuple(query.shape)}, "
                         f"key_pool {tuple(key_pool.shape)}, value_pool {tuple(value_pool.shape)}")
    batch, heads, dim = query.shape
    if key_pool.shape[-1] != dim or key_pool.shape[:2] != value_pool.shape[:2]:
        raise ValueError(f"key_pool {tuple(key_pool.shape)} must be (N_blocks, S, {dim}) and value_pool "
                         f"{tuple(value_pool.shape)} must have the same (N_blocks, S)")
    if block_tables.ndim != 3 or block_tables.shape[0] != batch or lengths.shape != block_tables.shape[:2]:
        raise ValueError(f"block_tables must be (B={batch}, H_kv, M) and lengths (B, H_kv): got "
                         f"{tuple(block_tables.shape)} and {tuple(lengths.shape)}")
    if block_tables.dtype.is_floating_point or lengths.dtype.is_floating_point:
        raise ValueError(f"block_tables and lengths must be integer tensors, got {block_tables.dtype}, {lengths.dtype}")
    n_kv = block_tables.shape[1]
    if heads % n_kv:
        raise ValueError(f"{heads} query heads do not split into groups over {n_kv} kv heads")
    capacity = block_tables.shape[2] * key_pool.shape[1]
    if bool((lengths < 0).any()) or bool((lengths > capacity).any()):
        raise ValueError(f"lengths must be in [0, M x S = {capacity}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")


def paged_decode_attention(
    query: torch.Tensor,  # (B, H, D)
    key_pool: torch.Tensor,  # (N_blocks, S, D)
    value_pool: torch.Tensor,  # (N_blocks, S, Dv)
    block_tables: torch.Tensor,  # (B, H_kv, M)
    lengths: torch.Tensor,  # (B, H_kv)
    scaling: float | None = None,
) -> torch.Tensor:
    """(B, H, Dv): softmax(q k^T * scaling) v over the tokens each (row, kv head) holds."""
    check_paged(query, key_pool, value_pool, block_tables, lengths)
    batch, heads, dim = query.shape
    n_kv, max_blocks = block_tables.shape[1:]
    block = key_pool.shape[1]
    group = heads // n_kv
    scale = scaling if scaling is not None else dim**-0.5
    used = torch.arange(max_blocks * block, device=query.device) < lengths[..., None]  # (B, H_kv, M*S)
    ids = block_tables.long().clamp(min=0)  # unused entries may be -1
    keys = key_pool[ids].reshape(batch, n_kv, max_blocks * block, dim).float()  # (B, H_kv, M*S, D)
    values = value_pool[ids].reshape(batch, n_kv, max_blocks * block, -1).float()  # (B, H_kv, M*S, Dv)
    q = query.float().reshape(batch, n_kv, group, dim)  # (B, H_kv, G, D)
    scores = (q @ keys.transpose(-1, -2)) * scale  # (B, H_kv, G, M*S)
    scores = scores.masked_fill(~used[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty heads -> zeros
    out = probs @ values  # (B, H_kv, G, Dv)
    return out.reshape(batch, heads, -1).to(query.dtype)
