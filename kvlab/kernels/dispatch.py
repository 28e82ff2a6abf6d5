"""One entry point per op: the Triton kernel when the inputs are on CUDA and triton is installed, else the torch
reference. Signatures and semantics are those of each op's ``reference.py``.

Importing this module imports neither triton nor a kernel module: ``<op>/triton.py`` is imported inside the CUDA
branch on first use (so CPU-only installs, and the test suite before it sets ``TRITON_INTERPRET``, never load it).
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

import torch

from .paged_attention import reference as _paged
from .project_append import reference as _append
from .projected_attention import reference as _projected
from .quant_attention import reference as _quant
from .rope_attention import reference as _rope


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton can be imported (looked up, not imported)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def use_triton(tensor: torch.Tensor) -> bool:
    """The Triton path is taken for CUDA inputs when triton is installed."""
    return tensor.is_cuda and triton_available()


def _kernel(op: str):
    return importlib.import_module(f"{__package__}.{op}.triton")


def paged_decode_attention(query, key_pool, value_pool, block_tables, lengths, scaling=None):
    """(B, H, Dv): see ``paged_attention/reference.py``."""
    impl = _kernel("paged_attention") if use_triton(query) else _paged
    return impl.paged_decode_attention(query, key_pool, value_pool, block_tables, lengths, scaling)


def projected_decode_attention(query, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets,
                               lengths=None, scaling=None, lift=True):
    """(B, H, Dv) or (B, H, max r_v) zero-padded: see ``projected_attention/reference.py``."""
    impl = _kernel("projected_attention") if use_triton(query) else _projected
    return impl.projected_decode_attention(query, key_codes, value_codes, key_basis, value_basis, key_offsets,
                                           value_offsets, lengths, scaling, lift)


def rope_decode_attention(query, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets,
                          positions, inv_freq, rope_scale=1.0, lengths=None, scaling=None, lift=True):
    """(B, H, Dv): attention over pre-RoPE key codes rebuilt and rotated in the read; see
    ``rope_attention/reference.py``."""
    impl = _kernel("rope_attention") if use_triton(query) else _rope
    return impl.rope_decode_attention(query, key_codes, value_codes, key_basis, value_basis, key_offsets,
                                      value_offsets, positions, inv_freq, rope_scale, lengths, scaling, lift)


def project_append(keys, values, key_codes, value_codes, key_basis, value_basis, key_offsets, value_offsets,
                   positions):
    """In-place write of the new entries' codes: see ``project_append/reference.py``."""
    impl = _kernel("project_append") if use_triton(keys) else _append
    return impl.project_append(keys, values, key_codes, value_codes, key_basis, value_basis, key_offsets,
                               value_offsets, positions)


def quant_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group,
                           scaling=None):
    """(B, H, Dv) over a KIVI-quantized cache, dequantized in the kernel: see ``quant_attention/reference.py``."""
    impl = _kernel("quant_attention") if use_triton(query) else _quant
    return impl.quant_decode_attention(query, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail,
                                       bits, group, scaling)
