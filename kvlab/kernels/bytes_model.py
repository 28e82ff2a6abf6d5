"""Bytes a kernel must move through memory in one call: one decode step of one layer (one new token per row; with
``batch=1`` that is per decoded token). Decode attention is memory-bound, so on a GPU

    speed-up of a compressed cache over full attention  <=  bytes_moved("attention", ...) / bytes_moved(op, ...)

(:func:`speedup_bound`). Counted: every cache byte the op reads (held tokens only: masked lanes are not fetched,
padding to a block or tile is ignored), the query, the output, the index tensors (block tables, lengths, positions,
offsets). Bases are counted once per call (all rows of a batch share them and hit in L2). Registers, shared memory
and launch overheads are not modelled.

Symbols (keyword arguments): B = ``batch``, H = ``heads`` (query heads), H_kv = ``kv_heads``, D = ``head_dim``,
Dv = ``value_dim`` (default D), T = ``tokens`` held per (row, kv head), S = ``block_size``, e = ``dtype_bytes``
(cache, query and output), e_b = ``basis_bytes`` (default e), i = ``index_bytes`` (default 4), r_h = ``key_ranks[h]``,
r_v_h = ``value_ranks[h]``, R_k = sum r_h, R_v = sum r_v_h, T_new = ``new_tokens`` (default 1).

    "attention"            dense baseline, contiguous (B, H_kv, T, D) cache:
                           B H_kv T (D + Dv) e  +  B H (D + Dv) e                               [K, V; q, o]
    "paged_attention"      ``tokens`` an int or one count per kv head (same for every row):
                           B sum_h T_h (D + Dv) e  +  B sum_h ceil(T_h / S) i  +  B H_kv i  +  B H (D + Dv) e
                                                                   [held K, V; table entries used; lengths; q, o]
    "projected_attention"  B T (R_k + R_v) e  +  (D R_k + Dv R_v) e_b  +  B H D e  +  B H W e  +  B i  +  2 (H_kv + 1) i
                           [codes; bases; q; o with W = Dv if ``lift`` else max r_v_h; lengths; offsets]
    "append"               dense baseline write: B H_kv T_new (D + Dv) e read + the same written
    "project_append"       B H_kv T_new (D + Dv) e  +  (D R_k + Dv R_v) e_b  +  B T_new (R_k + R_v) e
                           +  B i  +  2 (H_kv + 1) i
                           [new K, V read; bases; codes written; positions; offsets]
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence


def _attention(*, batch, heads, kv_heads, head_dim, tokens, value_dim=None, dtype_bytes=2):
    dv = value_dim or head_dim
    return batch * kv_heads * tokens * (head_dim + dv) * dtype_bytes + batch * heads * (head_dim + dv) * dtype_bytes


def _paged(*, batch, heads, kv_heads, head_dim, tokens, block_size, value_dim=None, dtype_bytes=2, index_bytes=4):
    dv = value_dim or head_dim
    per_head = [tokens] * kv_heads if isinstance(tokens, int) else list(tokens)
    if len(per_head) != kv_heads:
        raise ValueError(f"tokens must be an int or {kv_heads} per-kv-head counts, got {len(per_head)}")
    cache = batch * sum(per_head) * (head_dim + dv) * dtype_bytes
    tables = batch * sum(math.ceil(t / block_size) for t in per_head) * index_bytes + batch * kv_heads * index_bytes
    return cache + tables + batch * heads * (head_dim + dv) * dtype_bytes


def _projected(*, batch, heads, head_dim, tokens, key_ranks: Sequence[int], value_ranks: Sequence[int],
               value_dim=None, lift=True, dtype_bytes=2, basis_bytes=None, index_bytes=4):
    dv, eb = value_dim or head_dim, basis_bytes or dtype_bytes
    rk, rv, n_kv = sum(key_ranks), sum(value_ranks), len(key_ranks)
    codes = batch * tokens * (rk + rv) * dtype_bytes
    bases = (head_dim * rk + dv * rv) * eb
    width = dv if lift else max(value_ranks)
    io = batch * heads * (head_dim + width) * dtype_bytes
    return codes + bases + io + batch * index_bytes + 2 * (n_kv + 1) * index_bytes


def _append(*, batch, kv_heads, head_dim, value_dim=None, new_tokens=1, dtype_bytes=2):
    return 2 * batch * kv_heads * new_tokens * (head_dim + (value_dim or head_dim)) * dtype_bytes


def _project_append(*, batch, head_dim, key_ranks: Sequence[int], value_ranks: Sequence[int], value_dim=None,
                    new_tokens=1, dtype_bytes=2, basis_bytes=None, index_bytes=4):
    dv, eb = value_dim or head_dim, basis_bytes or dtype_bytes
    rk, rv, n_kv = sum(key_ranks), sum(value_ranks), len(key_ranks)
    read = batch * n_kv * new_tokens * (head_dim + dv) * dtype_bytes + (head_dim * rk + dv * rv) * eb
    written = batch * new_tokens * (rk + rv) * dtype_bytes
    return read + written + batch * index_bytes + 2 * (n_kv + 1) * index_bytes


OPS = {"attention": _attention, "paged_attention": _paged, "projected_attention": _projected, "append": _append,
       "project_append": _project_append}


def bytes_moved(op: str, **shapes) -> int:
    """Bytes read + written by one call of ``op`` (see the module docstring for the formula and the symbols)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OPS)}")
    signature = inspect.signature(OPS[op])
    try:
        signature.bind(**shapes)
    except TypeError as err:
        raise ValueError(f"bytes_moved({op!r}): {err}; it takes {list(signature.parameters)}") from None
    return int(OPS[op](**shapes))


def speedup_bound(full_bytes: int, compressed_bytes: int) -> float:
    """Upper bound on the speed-up of a memory-bound op that moves ``compressed_bytes`` instead of ``full_bytes``."""
    return full_bytes / compressed_bytes
