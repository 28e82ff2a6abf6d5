"""Quantized KV storage with real bit packing (KIVI): keys per channel, values per token, a full-precision window.

:class:`QuantStore` holds one layer's entries (B, H_kv, T, D) as

    k_codes (B, H_kv, Tq, D * b / 8) uint8     k_scale, k_zero (B, H_kv, Tq / G, D) float16   per channel, blocks
                                                                                               of G tokens
    v_codes (B, H_kv, Tq, Dv * b / 8) uint8    v_scale, v_zero (B, H_kv, Tq, Dv / G) float16  per token, groups of
                                                                                               G channels
    k_tail, v_tail (B, H_kv, T - Tq, D)        the most recent tokens at full precision (the cache's dtype)

New entries go to the tail; whenever the tail holds more than ``residual`` tokens, its oldest whole blocks of G
tokens are quantized (Tq stays a multiple of G), so between ``residual`` and ``residual + G - 1`` recent tokens stay
at full precision, as in KIVI (keys need whole blocks of tokens to share a per-channel scale). Tensors are
concatenated, never padded: measured bytes = packed codes + scales + zero points + tail, exactly the theoretical
bytes. Reads dequantize everything (float32 arithmetic, result in the query's dtype).

:class:`QuantLayer` is the cache layer of the ``quant`` method: attention reads the dequantized entries, the entries
of the current forward included (the "compressed attention throughout" protocol; in a teacher-forced pass only the
last ``residual`` to ``residual + G - 1`` tokens are at full precision, a stricter setting than decoding, where every
query sees its own recent window at full precision).
"""

from __future__ import annotations

import torch

from .. import attention
from .base import KVLayer
from .quantize import (SCALE_DTYPE, check_options, dequantize_blocks, dequantize_groups, packed_width,
                       quantize_blocks, quantize_groups)

SCALE_BYTES = torch.empty((), dtype=SCALE_DTYPE).element_size()


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``new`` after ``old`` on the token axis, in storage of its own (``new`` may be a view of a larger tensor)."""
    return new.clone(memory_format=torch.contiguous_format) if old is None else torch.cat([old, new], dim=2)


class QuantStore:
    """Quantized keys (per channel) and values (per token) of one layer; see the module docstring."""

    NAMES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_tail", "v_tail")

    def __init__(self, bits: int, group: int, residual: int):
        check_options(bits, group, residual)
        self.bits, self.group, self.residual = int(bits), int(group), int(residual)
        for name in self.NAMES:
            setattr(self, name, None)
        self.quantized = 0  # Tq: tokens held as codes (a multiple of group)

    @property
    def length(self) -> int:
        return self.quantized + (self.k_tail.shape[2] if self.k_tail is not None else 0)

    @property
    def tail(self) -> int:
        return self.length - self.quantized

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New entries (B, H_kv, T_new, D) / (B, H_kv, T_new, Dv) at the end; flush whole blocks beyond the window."""
        if values.shape[-1] % self.group:
            raise ValueError(f"group_size {self.group} does not divide the value size {values.shape[-1]}")
        packed_width(keys.shape[-1], self.bits), packed_width(values.shape[-1], self.bits)  # whole bytes
        self.k_tail, self.v_tail = _cat(self.k_tail, keys), _cat(self.v_tail, values)
        n = self.group * max(0, (self.k_tail.shape[2] - self.residual) // self.group)  # tokens to quantize
        if not n:
            return
        kc, ks, kz = quantize_blocks(self.k_tail[:, :, :n], self.bits, self.group)
        vc, vs, vz = quantize_groups(self.v_tail[:, :, :n], self.bits, self.group)
        for name, t in zip(self.NAMES[:6], (kc, ks, kz, vc, vs, vz)):
            setattr(self, name, _cat(getattr(self, name), t))
        self.k_tail, self.v_tail = self.k_tail[:, :, n:].clone(), self.v_tail[:, :, n:].clone()
        self.quantized += n

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (B, H_kv, T, D) and values (B, H_kv, T, Dv) in ``dtype``, dequantized, then the tail."""
        if not self.quantized:
            return self.k_tail.to(dtype), self.v_tail.to(dtype)
        keys = dequantize_blocks(self.k_codes, self.k_scale, self.k_zero, self.bits, dtype)
        values = dequantize_groups(self.v_codes, self.v_scale, self.v_zero, self.bits, dtype)
        if not self.tail:
            return keys, values
        return torch.cat([keys, self.k_tail.to(dtype)], 2), torch.cat([values, self.v_tail.to(dtype)], 2)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in self.NAMES) if t is not None]

    def part_bytes(self, part: str, batch: int, dim: int, element_size: int) -> tuple[int, int]:
        """(theoretical bytes, of which fixed-dtype bytes) of one kv head's ``part`` ("K" or "V") of size ``dim``:
        packed codes and float16 scales / zero points (fixed), tail entries (the cache's dtype)."""
        q = self.quantized
        codes = q * dim * self.bits // 8
        params = 2 * SCALE_BYTES * ((q // self.group) * dim if part == "K" else q * (dim // self.group))
        fixed = batch * (codes + params)
        return fixed + batch * self.tail * dim * element_size, fixed

    def select(self, indices: torch.Tensor) -> None:
        for name in self.NAMES:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices.to(t.device)].contiguous())


class QuantLayer(KVLayer):
    """The ``quant`` cache layer: a :class:`QuantStore`; attention over its dequantized entries."""

    def __init__(self, layer_idx: int, bits: int = 2, group_size: int = 32, residual: int = 32):
        super().__init__(layer_idx)
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.store = QuantStore(bits, group_size, residual)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.bits, self.group_size, self.residual)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        check_options(self.bits, self.group_size, self.residual, self.head_dim)
        check_options(self.bits, self.group_size, self.residual, self.value_dim)

    def _store(self, key_states, value_states):
        self.store.append(key_states, value_states)
        return key_states, value_states  # plain readers would see the new entries unquantized; kvlab attention won't

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        keys, values = self.store.read(query.dtype)  # (B, H_kv, T, D)
        return attention.sdpa(query, keys, values, mask, scaling)

    def get_seq_length(self) -> int:
        return self.store.length

    def tensors(self):
        return self.store.tensors()

    def accounting(self):
        rows = []
        for part, dim in (("K", self.head_dim), ("V", self.value_dim)):
            theoretical, fixed = self.store.part_bytes(part, self.batch_size, dim, self.element_size)
            for head in range(self.n_heads):
                rows.append(dict(head=head, part=part, full=self.full_bytes_per_head(part), theoretical=theoretical,
                                 fixed=fixed, tokens_seen=self.seen, tokens_kept=self.store.length, dims_full=dim,
                                 dims_kept=dim, bits=self.bits, tokens_quantized=self.store.quantized))
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store.select(indices)
        self.batch_size = len(indices)
