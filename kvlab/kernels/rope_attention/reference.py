"""Decode attention over pre-RoPE projected keys: rebuild each key from its code and rotate it in the read, plain torch.

The layout of :mod:`kvlab.kernels.projected_attention` (flat ragged codes and bases, offsets per kv head, lengths)
plus what the rotation needs:

    positions     (B, T) int        the position each cached key was rotated by in the model
    inv_freq      (D / 2,) float    rotary frequencies of the layer (HF: ``rotary_emb.inv_freq``, or Gemma3's
                                    ``<layer_type>_inv_freq``), angle_i(p) = p * inv_freq[i]
    rope_scale    float             HF's ``attention_scaling`` (cos and sin are multiplied by it; 1.0 for plain RoPE)

Key codes hold c = U_h^T k_pre (pre-RoPE). For query head j of kv head h (rotate_half convention, feature i pairs
with i + D/2):

    k_t    = R(p_t) U_h c_t                             (D,)   rebuilt and rotated per cached token
    scores = q_j . k_t * scale                          (T,)   tokens >= length masked out
    o_j    = softmax(scores) (value codes_h) W_h^T      (Dv,)  (``lift=False``: the value code, zero-padded)

The query cannot absorb U_h (R(p_t) differs per token), so the read costs O(T D r) per head instead of O(T r);
bytes moved are still r + r_v per token. Float32 math; output in the query's dtype. Sinks are not part of this op.
"""

from __future__ import annotations

import torch

from ..projected_attention.reference import Offsets, check_projected


def check_rope(query, key_codes, positions, inv_freq) -> None:
    """What the rotation adds to :func:`check_projected`: ValueError naming the fault."""
    batch, tokens = key_codes.shape[:2]
    dim = query.shape[-1]
    if dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got D = {dim}")
    if positions.shape != (batch, tokens) or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be an integer tensor (B={batch}, T={tokens}), got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if inv_freq.shape != (dim // 2,) or not inv_freq.dtype.is_floating_point:
        raise ValueError(f"inv_freq must be a float tensor (D/2={dim // 2},), got {inv_freq.dtype} "
                         f"{tuple(inv_freq.shape)}")


def rotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float) -> torch.Tensor:
    """R(p) k for keys (B, ..., T, D) at positions (B, T): HF's rotate_half rotation, float32."""
    angles = positions.float()[..., None] * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat([angles, angles], dim=-1)  # (B, T, D)
    cos, sin = emb.cos() * rope_scale, emb.sin() * rope_scale
    while cos.ndim < keys.ndim:
        cos, sin = cos[:, None], sin[:, None]
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return keys.float() * cos + rotated_half.float() * sin


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
) -> torch.Tensor:
    """(B, H, Dv) with ``lift``, else (B, H, max r_v_h) zero-padded: attention over keys rebuilt and rotated."""
    k_off, v_off = check_projected(query, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets,
                                   lengths)
    check_rope(query, key_codes, positions, inv_freq)
    batch, heads, dim = query.shape
    n_kv, tokens = len(k_off) - 1, key_codes.shape[1]
    group = heads // n_kv
    scale = scaling if scaling is not None else dim**-0.5
    v_ranks = [b - a for a, b in zip(v_off, v_off[1:])]
    width = value_basis.shape[0] if lift else max(v_ranks)
    out = torch.zeros(batch, heads, width, device=query.device)
    visible = torch.ones(batch, tokens, dtype=torch.bool, device=query.device)
    if lengths is not None:
        visible = torch.arange(tokens, device=query.device) < lengths[:, None]  # (B, T)
    q = query.float()
    for h in range(n_kv):
        ks, vs, rows = slice(k_off[h], k_off[h + 1]), slice(v_off[h], v_off[h + 1]), slice(h * group, (h + 1) * group)
        keys = rotate(key_codes[:, :, ks].float() @ key_basis[:, ks].float().T, positions, inv_freq, rope_scale)
        scores = q[:, rows] @ keys.transpose(1, 2) * scale  # (B, G, T)
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> zeros
        o_code = probs @ value_codes[:, :, vs].float()  # (B, G, r_v_h)
        if lift:
            out[:, rows] = o_code @ value_basis[:, vs].float().T  # (B, G, Dv)
        else:
            out[:, rows, : v_ranks[h]] = o_code
    return out.to(query.dtype)
