"""Fused project-on-write in Triton: layout, signature and semantics of ``reference.py``.

One program per (row b, kv head h, tile of BLOCK_T new tokens): it loads the tile x (BLOCK_T, D) and the head's
basis U (D, r_h) from the flat basis at the head's offset, and stores x U straight into the code buffer at
rows positions[b] + t, columns offsets[h] : offsets[h+1]. No intermediate (B, T_new, R) tensor, no concatenation:
the new states are read once and only the codes are written. Keys and values are two launches of the same kernel.
Float32 ``tl.dot`` (``input_precision="ieee"``; bf16 ``tl.dot`` is wrong in the interpreter), stored in the codes'
dtype. Tiles are padded to powers of two >= 16 and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..projected_attention.reference import Offsets
from .reference import check_append

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _project_write_kernel(
    x_ptr, u_ptr, off_ptr, pos_ptr, codes_ptr,
    stride_xb, stride_xh, stride_xt, stride_xd,  # states (B, H_kv, T_new, D)
    stride_ud, stride_ur,  # basis (D, R)
    stride_cb, stride_ct, stride_cr,  # codes (B, T_cap, R)
    new,
    DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_R)
    r0 = tl.load(off_ptr + h)
    rank = tl.load(off_ptr + h + 1) - r0
    start = tl.load(pos_ptr + b).to(tl.int64)

    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + t[:, None] * stride_xt + d[None, :] * stride_xd,
                mask=(t[:, None] < new) & (d[None, :] < DIM), other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_D)
    u = tl.load(u_ptr + d[:, None] * stride_ud + (r0 + r)[None, :] * stride_ur,
                mask=(d[:, None] < DIM) & (r[None, :] < rank), other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_R)
    code = tl.dot(x, u, input_precision="ieee")  # (BLOCK_T, BLOCK_R)
    tl.store(codes_ptr + b * stride_cb + (start + t)[:, None] * stride_ct + (r0 + r)[None, :] * stride_cr,
             code.to(codes_ptr.dtype.element_ty), mask=(t[:, None] < new) & (r[None, :] < rank))


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


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
    check_kernel_inputs(keys, values, key_codes, value_codes, key_basis, value_basis, positions)
    _launch(keys, key_codes, key_basis, k_off, positions)
    _launch(values, value_codes, value_basis, v_off, positions)
    return key_codes, value_codes


def _launch(states, codes, basis, offsets: list[int], positions) -> None:
    batch, n_kv, new, dim = states.shape
    if batch * n_kv * new == 0 or offsets[-1] == 0:
        return
    block_t = _tile(min(new, 64))
    max_rank = max(b - a for a, b in zip(offsets, offsets[1:]))
    offsets_t = torch.tensor(offsets, dtype=torch.int32, device=codes.device)
    _project_write_kernel[(batch, n_kv, triton.cdiv(new, block_t))](
        states, basis, offsets_t, positions, codes,
        *states.stride(), *basis.stride(), *codes.stride(), new,
        DIM=dim, BLOCK_T=block_t, BLOCK_D=_tile(dim), BLOCK_R=_tile(max_rank),
    )


def check_kernel_inputs(keys, values, key_codes, value_codes, key_basis, value_basis, positions) -> None:
    """What the kernel needs beyond :func:`check_append`: one device and float dtypes (any mix of them)."""
    tensors = dict(keys=keys, values=values, key_codes=key_codes, value_codes=value_codes, key_basis=key_basis,
                   value_basis=value_basis, positions=positions)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    dtypes = {name: t.dtype for name, t in tensors.items() if name != "positions"}
    if any(dtype not in FLOATS for dtype in dtypes.values()):
        raise ValueError(f"states, codes and bases must be among {FLOATS}, got {dtypes}")
