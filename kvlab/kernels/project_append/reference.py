"""Fused project-on-write, plain torch: new keys/values are projected by their kv head's basis and written, in
place, into preallocated code buffers at per-row positions.

Layout: the flat ragged layout of ``projected_attention/reference.py`` (codes (B, T_cap, sum_h r_h), bases
(D, sum_h r_h), offsets (H_kv + 1,)), plus

    keys      (B, H_kv, T_new, D)    new entries, all kv heads
    values    (B, H_kv, T_new, Dv)
    positions (B,) int               row b's new tokens go to slots positions[b] ... positions[b] + T_new - 1
                                     (rows may be at different lengths); 0 <= positions[b] <= T_cap - T_new

    key_codes[b, positions[b] + t, key_offsets[h] : key_offsets[h+1]] = keys[b, h, t] @ U_h      (float32 product,
    value_codes[b, positions[b] + t, value_offsets[h] : value_offsets[h+1]] = values[b, h, t] @ W_h  stored in the
                                                                                                  codes' dtype)
Nothing else in the buffers changes. Returns the two buffers.
"""

from __future__ import annotations

import torch

from ..projected_attention.reference import Offsets, offsets_list


def check_append(keys, values, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets, positions):
    """Shapes of a projected write; returns (key offsets, value offsets) as lists. ValueError names the fault."""
    if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"keys and values must be (B, H_kv, T_new, D) with the same (B, H_kv, T_new): got "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}")
    batch, n_kv, new, dim = keys.shape
    if key_codes.ndim != 3 or value_codes.ndim != 3 or key_codes.shape[:2] != value_codes.shape[:2] \
            or key_codes.shape[0] != batch:
        raise ValueError(f"key_codes and value_codes must be (B={batch}, T_cap, R) with the same T_cap: got "
                         f"{tuple(key_codes.shape)}, {tuple(value_codes.shape)}")
    if key_basis.shape != (dim, key_codes.shape[2]) or value_basis.shape != (values.shape[3], value_codes.shape[2]):
        raise ValueError(f"key_basis must be (D={dim}, R_k={key_codes.shape[2]}) and value_basis "
                         f"(Dv={values.shape[3]}, R_v={value_codes.shape[2]}): got {tuple(key_basis.shape)}, "
                         f"{tuple(value_basis.shape)}")
    k_off = offsets_list(key_offsets, key_codes.shape[2], "key_offsets")
    v_off = offsets_list(value_offsets, value_codes.shape[2], "value_offsets")
    if len(k_off) != n_kv + 1 or len(v_off) != n_kv + 1:
        raise ValueError(f"offsets must have H_kv + 1 = {n_kv + 1} entries, got {len(k_off)} and {len(v_off)}")
    if positions.shape != (batch,) or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be an integer tensor (B={batch},), got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    capacity = key_codes.shape[1]
    if batch and (bool((positions < 0).any()) or bool((positions + new > capacity).any())):
        raise ValueError(f"positions must be in [0, T_cap - T_new = {capacity - new}], got min {int(positions.min())}, "
                         f"max {int(positions.max())}")
    return k_off, v_off


def project_append(
    keys: torch.Tensor,  # (B, H_kv, T_new, D)
    values: torch.Tensor,  # (B, H_kv, T_new, Dv)
    key_codes: torch.Tensor,  # (B, T_cap, R_k), written in place
    value_codes: torch.Tensor,  # (B, T_cap, R_v), written in place
    key_basis: torch.Tensor,  # (D, R_k)
    value_basis: torch.Tensor,  # (Dv, R_v)
    key_offsets: Offsets,  # (H_kv + 1,)
    value_offsets: Offsets,  # (H_kv + 1,)
    positions: torch.Tensor,  # (B,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes the codes of the new entries into the buffers at ``positions``; returns (key_codes, value_codes)."""
    k_off, v_off = check_append(keys, values, key_codes, value_codes, key_basis, value_basis, key_offsets,
                                value_offsets, positions)
    _write(keys, key_codes, key_basis, k_off, positions)
    _write(values, value_codes, value_basis, v_off, positions)
    return key_codes, value_codes


def _write(states, codes, basis, offsets, positions) -> None:
    batch, _, new, _ = states.shape
    parts = [states[:, h].float() @ basis[:, a:b].float() for h, (a, b) in enumerate(zip(offsets, offsets[1:]))]
    flat = torch.cat(parts, dim=-1)  # (B, T_new, R)
    slots = positions.long()[:, None] + torch.arange(new, device=codes.device)  # (B, T_new)
    codes[torch.arange(batch, device=codes.device)[:, None], slots] = flat.to(codes.dtype)
