"""Decode attention over projected (low-rank) K/V with a rank per kv head, plain torch.

Flat ragged layout (what a projected cache holds; no padding to the largest rank):

    key_codes     (B, T, R_k)      R_k = sum_h r_h: the codes k_h U_h of kv head h sit in columns
                                   key_offsets[h] : key_offsets[h+1]
    value_codes   (B, T, R_v)      R_v = sum_h r_v_h, columns value_offsets[h] : value_offsets[h+1]
    key_basis     (D, R_k)         U_h = key_basis[:, key_offsets[h] : key_offsets[h+1]], orthonormal columns
    value_basis   (Dv, R_v)        W_h = value_basis[:, value_offsets[h] : value_offsets[h+1]]
    key_offsets   (H_kv + 1,) int  0 = o_0 <= o_1 <= ... <= o_H_kv = R_k (a tensor or a sequence of ints)
    value_offsets (H_kv + 1,) int  likewise for R_v
    lengths       (B,) int         tokens held by each row (all heads hold the same tokens); token t of row b is
                                   visible iff t < lengths[b]; None means all T. T is the buffer's capacity.
    query         (B, H, D)        H = G x H_kv; query head j reads kv head h = j // G

For query head j of kv head h (the projection U_h is shared by the G query heads of the group):

    scores = (q_j U_h)(key codes_h)^T * scale            (T,)   tokens >= length masked out
    o'_j   = softmax(scores) (value codes_h)             (r_v_h,)
    o_j    = o'_j W_h^T                                  (Dv,)  only with ``lift=True``

which equals ordinary attention over K_hat = codes U^T, V_hat = codes W^T (U_h U_h^T is a projector). With
``lift=False`` the output is ragged per head: it is returned as a zero-padded (B, H, max_h r_v_h) tensor, head j's
r_v_h entries first. A row with length 0 gives zeros. Float32 softmax; output in the query's dtype.
Full-rank attention sinks (ProjectedLayer's ``sinks``) are not part of this op.
"""

from __future__ import annotations

from typing import Sequence

import torch

Offsets = torch.Tensor | Sequence[int]


def pack_ragged(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Concatenate per-head tensors (..., r_h) on the last axis: (flat (..., sum r_h), offsets [0, r_0, ...])."""
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + part.shape[-1])
    return torch.cat(list(parts), dim=-1), offsets


def offsets_list(offsets: Offsets, width: int, what: str) -> list[int]:
    """Offsets as Python ints, checked against the flat width (columns of the codes and the basis)."""
    if isinstance(offsets, torch.Tensor):
        if offsets.ndim != 1 or offsets.dtype.is_floating_point:
            raise ValueError(f"{what} must be a 1-D integer tensor (H_kv + 1,), got {offsets.dtype} "
                             f"{tuple(offsets.shape)}")
        offsets = offsets.tolist()
    offsets = [int(o) for o in offsets]
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != width or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{what} must rise from 0 to the flat width {width} with H_kv + 1 >= 2 entries, got {offsets}")
    return offsets


def check_projected(query, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets, lengths):
    """Shapes of a projected read; returns (key offsets, value offsets) as lists. Raises ValueError naming the fault."""
    if query.ndim != 3 or key_codes.ndim != 3 or value_codes.ndim != 3 or key_basis.ndim != 2 or value_basis.ndim != 2:
        raise ValueError(f"query must be (B, H, D), codes (B, T, R) and bases (D, R): got query {tuple(query.shape)}, "
                         f"key_codes {tuple(key_codes.shape)}, value_codes {tuple(value_codes.shape)}, key_basis "
                         f"{tuple(key_basis.shape)}, value_basis {tuple(value_basis.shape)}")
    batch, heads, dim = query.shape
    if key_codes.shape[:2] != (batch, value_codes.shape[1]) or value_codes.shape[0] != batch:
        raise ValueError(f"key_codes {tuple(key_codes.shape)} and value_codes {tuple(value_codes.shape)} must be "
                         f"(B={batch}, T, R) with the same T")
    if key_basis.shape != (dim, key_codes.shape[2]) or value_basis.shape[1] != value_codes.shape[2]:
        raise ValueError(f"key_basis must be (D={dim}, R_k={key_codes.shape[2]}) and value_basis (Dv, "
                         f"R_v={value_codes.shape[2]}): got {tuple(key_basis.shape)}, {tuple(value_basis.shape)}")
    k_off = offsets_list(key_offsets, key_codes.shape[2], "key_offsets")
    v_off = offsets_list(value_offsets, value_codes.shape[2], "value_offsets")
    if len(k_off) != len(v_off):
        raise ValueError(f"key_offsets has {len(k_off) - 1} kv heads but value_offsets {len(v_off) - 1}")
    if heads % (len(k_off) - 1):
        raise ValueError(f"{heads} query heads do not split into groups over {len(k_off) - 1} kv heads")
    if lengths is not None:
        if lengths.shape != (batch,) or lengths.dtype.is_floating_point:
            raise ValueError(f"lengths must be an integer tensor (B={batch},), got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
        if batch and (bool((lengths < 0).any()) or bool((lengths > key_codes.shape[1]).any())):
            raise ValueError(f"lengths must be in [0, T = {key_codes.shape[1]}], got min {int(lengths.min())}, "
                             f"max {int(lengths.max())}")
    return k_off, v_off


def reconstruct(codes: torch.Tensor, basis: torch.Tensor, offsets: Offsets) -> torch.Tensor:
    """(B, T, R) codes -> (B, H_kv, T, D) = codes_h basis_h^T per head, float32 (for tests and checks)."""
    offsets = offsets_list(offsets, codes.shape[-1], "offsets")
    return torch.stack([codes[..., a:b].float() @ basis[:, a:b].float().T for a, b in zip(offsets, offsets[1:])], 1)


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
) -> torch.Tensor:
    """(B, H, Dv) with ``lift``, else (B, H, max r_v_h) zero-padded: attention read from the codes."""
    k_off, v_off = check_projected(query, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets,
                                   lengths)
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
        q_code = q[:, rows] @ key_basis[:, ks].float()  # (B, G, r_h)
        scores = q_code @ key_codes[:, :, ks].float().transpose(1, 2) * scale  # (B, G, T)
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> zeros
        o_code = probs @ value_codes[:, :, vs].float()  # (B, G, r_v_h)
        if lift:
            out[:, rows] = o_code @ value_basis[:, vs].float().T  # (B, G, Dv)
        else:
            out[:, rows, : v_ranks[h]] = o_code
    return out.to(query.dtype)
