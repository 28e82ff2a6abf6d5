"""The precision axis composed with the feature and token axes: cache layers that quantize what the other axes keep.

* :class:`QuantProjectedLayer` (features x precision): the codes k @ U, v @ W (B, H_kv, T, r) of a projected cache
  (uniform rank r per head, PCA / MatryoshkaKV bases) held in a :class:`~kvlab.cache.quantized.QuantStore`: the
  key codes per channel (the principal components) in blocks of ``group`` tokens, the value codes per token, a
  window of recent codes at full precision; full-size sink copies as in the feature methods alone
  (:class:`~kvlab.cache.coded.CodedLayer`).
* :class:`QuantSlots` (token x precision, and all three axes): an eviction layer whose slots hold packed integer
  codes, so evicting a token frees its bytes. A per-channel key scale cannot be shared by a block of tokens that
  eviction later splits, so the key parameters are per (row, kv head, channel) over the whole kept set, fitted at
  ``compress`` on the tokens kept (later tokens use them, clamped to that range); values keep KIVI's per-token groups,
  their float16 scale and zero point stored in the slot beside the codes:

      keys   (B, H_kv, C, d * b / 8) uint8         key_params (B, H_kv, 2, d) float16: scale, zero per channel
      values (B, H_kv, C, d * b / 8 + 4 * d / g) uint8: codes, then float16 scales and zeros of the d / g groups

  d is the stored vector size (head_dim, or the rank r of the codes of a projected cache: all three axes). Before
  ``compress`` the slots hold floats (the prefill, as the token method alone); ``compress`` evicts, then quantizes.

Value groups of g channels, g the largest divisor of d not above group_size (a divisor of d whatever the rank).
"""

from __future__ import annotations

import torch

from ..cache.quantize import (SCALE_DTYPE, _quantize, check_bits, dequantize_groups, pack, packed_width, quantize_groups, unpack)
from ..cache.coded import CodedLayer
from .feature_x_token import ProjectedEvictionLayer
from ..cache.eviction import EvictionLayer
from ..cache.quantized import SCALE_BYTES, QuantStore


def value_group(dim: int, group_size: int) -> int:
    """Channels per value group: the largest divisor of ``dim`` not above ``group_size`` (a rank of 26 with groups of
    32 gives one group of 26, not 13 groups of 2, whose float16 parameters would outweigh the codes)."""
    return max(g for g in range(1, min(dim, group_size) + 1) if dim % g == 0)


class QuantProjectedLayer(CodedLayer):
    """Features x precision: uniform-rank codes on per-head bases, quantized in a QuantStore; see the module doc."""

    def __init__(self, layer_idx: int, key_basis: torch.Tensor, value_basis: torch.Tensor, bits: int, group_size: int,
                 residual: int, sinks: int = 0):
        """``key_basis`` (H_kv, D, r), ``value_basis`` (H_kv, Dv, r_v): orthonormal columns per head."""
        super().__init__(layer_idx, sinks)
        self.key_basis, self.value_basis = key_basis, value_basis
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.store = QuantStore(bits, value_group(value_basis.shape[-1], group_size), residual)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.key_basis, self.value_basis, self.bits, self.group_size, self.residual,
                      self.sinks)

    def _append_codes(self, keys, values) -> None:
        self.store.append(keys @ self.key_basis.to(keys.dtype),  # (B, H_kv, T_new, r)
                          values @ self.value_basis.to(values.dtype))

    def _decode_all(self):
        k_codes, v_codes = self.store.read(self.dtype)  # (B, H_kv, T, r)
        return (k_codes @ self.key_basis.to(self.dtype).transpose(1, 2),  # (B, H_kv, T, D)
                v_codes @ self.value_basis.to(self.dtype).transpose(1, 2))

    def code_tensors(self):
        return self.store.tensors()

    def dims_kept(self, part: str, head: int) -> int:
        return (self.key_basis if part == "K" else self.value_basis).shape[-1]

    def _select_codes(self, indices) -> None:
        self.store.select(indices)

    def accounting(self):
        rows = super().accounting()  # codes at the cache dtype + sink copies
        for row in rows:
            r = row["dims_kept"]
            codes = self.batch_size * self.length * r * self.element_size
            sinks = row["theoretical"] - codes  # the full-size sink copies (cache dtype)
            theoretical, fixed = self.store.part_bytes(row["part"], self.batch_size, r, self.element_size)
            row.update(theoretical=theoretical + sinks, fixed=fixed, bits=self.bits)
        return rows


class QuantSlots:
    """Mixin before an :class:`EvictionLayer` class: slots hold packed codes after ``compress``; see the module doc."""

    def _init_quant(self, bits: int, group_size: int) -> None:
        self.bits, self.group_size = check_bits(bits), int(group_size)
        self.key_params = None  # (B, H_kv, 2, d) float16 after compress
        self.quantized = False
        self._dims = None  # (d_k, d_v) of the stored float vectors

    def _quantize_slots(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float slots (B, H_kv, n, d) -> (packed keys, values with their group parameters) as uint8."""
        scale, zero = self.key_params[:, :, :1].float(), self.key_params[:, :, 1:].float()  # (B, H_kv, 1, d)
        levels = (1 << self.bits) - 1
        k_codes = torch.round((keys.float() - zero) / scale).clamp_(0, levels).to(torch.uint8)
        g = value_group(values.shape[-1], self.group_size)
        v_packed, v_scale, v_zero = quantize_groups(values, self.bits, g)  # (B, H_kv, n, d*b/8), (B, H_kv, n, d/g)
        params = torch.cat([v_scale, v_zero], dim=-1).contiguous().view(torch.uint8)  # (B, H_kv, n, 4 d / g)
        return pack(k_codes, self.bits), torch.cat([v_packed, params], dim=-1)

    def _encode(self, key_states, value_states):
        keys, values = super()._encode(key_states, value_states)
        if not self.quantized:
            self._dims = (keys.shape[-1], values.shape[-1])
            return keys, values
        return self._quantize_slots(keys, values)

    def compress(self) -> None:
        super().compress()  # evict at full precision (the token method alone), then quantize what is kept
        if self.quantized:
            return
        keys, values = self.keys, self.values  # (B, H_kv, C, d) float
        occupied = (self.index >= 0)[..., None]  # (B, H_kv, C, 1)
        lo = keys.float().masked_fill(~occupied, float("inf")).amin(2, keepdim=True)  # (B, H_kv, 1, d)
        hi = keys.float().masked_fill(~occupied, float("-inf")).amax(2, keepdim=True)
        lo, hi = torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)
        levels = (1 << self.bits) - 1
        scale = ((hi - lo) / levels).clamp(min=1e-6).to(SCALE_DTYPE)
        self.key_params = torch.cat([scale, lo.to(SCALE_DTYPE)], dim=2)  # (B, H_kv, 2, d)
        self.quantized = True
        self.keys, self.values = self._quantize_slots(keys, values)

    def stored(self):
        if not self.quantized:
            return super().stored()
        d_k, d_v = self._dims
        dtype = self.dtype
        codes = unpack(self.keys, self.bits).float()  # (B, H_kv, C, d_k)
        keys = (codes * self.key_params[:, :, :1].float() + self.key_params[:, :, 1:].float()).to(dtype)
        width = packed_width(d_v, self.bits)
        n_groups = d_v // value_group(d_v, self.group_size)
        params = self.values[..., width:].contiguous().view(SCALE_DTYPE)  # (B, H_kv, C, 2 d / g)
        values = dequantize_groups(self.values[..., :width], params[..., :n_groups], params[..., n_groups:],
                                   self.bits, dtype)
        return keys, values

    def tensors(self):
        return super().tensors() + ([self.key_params] if self.key_params is not None else [])

    def accounting(self):
        rows = super().accounting()
        kept = (self.index >= 0).sum(dim=(0, 2))  # (H_kv,) over the batch
        d_k, d_v = self._dims
        for row in rows:
            n, d = int(kept[row["head"]]), (d_k if row["part"] == "K" else d_v)
            codes = n * d * self.bits // 8
            if row["part"] == "K":
                params = self.batch_size * 2 * d * SCALE_BYTES
            else:
                params = n * 2 * (d // value_group(d, self.group_size)) * SCALE_BYTES
            floats = row["theoretical"] - n * d * self.element_size  # what the layer keeps beside the slots (sinks)
            row.update(theoretical=codes + params + floats, fixed=codes + params, bits=self.bits)
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_params is not None:
            self.key_params = self.key_params[indices.to(self.key_params.device)]


class QuantEvictionLayer(QuantSlots, EvictionLayer):
    """Token x precision: the tokens a token method keeps, as packed codes (see the module docstring)."""

    def __init__(self, layer_idx: int, policy, bits: int, group_size: int):
        EvictionLayer.__init__(self, layer_idx, policy)
        self._init_quant(bits, group_size)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.policy, self.bits, self.group_size)


class QuantProjectedEvictionLayer(QuantSlots, ProjectedEvictionLayer):
    """All three axes: the codes on a projected basis of the tokens a token method keeps, quantized."""

    def __init__(self, layer_idx: int, policy, key_basis, value_basis, bits: int, group_size: int, sinks: int = 0):
        ProjectedEvictionLayer.__init__(self, layer_idx, policy, key_basis, value_basis, sinks)
        self._init_quant(bits, group_size)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.policy, self.key_basis, self.value_basis, self.bits, self.group_size,
                      self.sinks)
