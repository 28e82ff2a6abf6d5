"""Feature-axis compression: keys and values stored projected onto a per-(layer, kv-head) orthonormal basis.

For kv head h with key basis U (D, r) and value basis W (D, r_v) the cache stores the codes k @ U and v @ W.
Attention with the query projected by the same U (shared by the query heads of a GQA group),
    softmax((q U)(k U)^T * s) (v W) W^T  ==  softmax(q (k U U^T)^T * s) (v W W^T),
so the torch reference reconstructs K_hat = (k U) U^T and V_hat = (v W) W^T transiently and runs ordinary attention;
only the codes stay in memory. Ranks may differ per head (ragged storage: one tensor per head, no padding to the
largest rank). The first ``sinks`` positions of every sequence (the attention sinks, which take most of the
attention mass and have huge norms) can be kept at full rank: ``sinks`` counts positions, so left padding is fine.

New entries are compressed when attention reads them (right after ``update``), because only then is their position
known; the entries of the current step are therefore read through their compressed form too (the "compressed
attention throughout" protocol).
"""

from __future__ import annotations

import torch

from .. import attention
from ..cache import KVLayer


class ProjectedLayer(KVLayer):
    def __init__(self, layer_idx: int, key_bases: list[torch.Tensor], value_bases: list[torch.Tensor], sinks: int = 0):
        """``key_bases[h]``: (D, r_h) with orthonormal columns; ``value_bases[h]``: (D, r_v_h)."""
        super().__init__(layer_idx)
        if len(key_bases) != len(value_bases):
            raise ValueError(f"{len(key_bases)} key bases but {len(value_bases)} value bases")
        self.key_bases, self.value_bases, self.sinks = list(key_bases), list(value_bases), int(sinks)
        self.key_codes: list[torch.Tensor] = []  # per head (B, T, r_h)
        self.value_codes: list[torch.Tensor] = []
        self.sink_keys = self.sink_values = None  # (B, H_kv, sinks, D): entries at positions < sinks, full rank
        self.sink_slots = None  # (B, sinks): where each sink sits among the stored entries, -1 if not seen
        self._pending = None
        self.length = 0

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.key_bases, self.value_bases, self.sinks)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if len(self.key_bases) != self.n_heads:
            raise ValueError(f"layer {self.layer_idx}: {len(self.key_bases)} bases for {self.n_heads} kv heads")

    def _store(self, key_states, value_states):
        self._pending = (key_states, value_states)
        return key_states, value_states  # plain readers would see uncompressed new entries; kvlab attention won't

    def _commit(self, position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        keys, values = self._pending  # (B, H_kv, T_new, D)
        self._pending = None
        new = keys.shape[-2]
        for h, (u, w) in enumerate(zip(self.key_bases, self.value_bases)):
            k_code = keys[:, h] @ u.to(keys.dtype)  # (B, T_new, r_h)
            v_code = values[:, h] @ w.to(values.dtype)
            if self.length:
                k_code = torch.cat([self.key_codes[h], k_code], dim=1)
                v_code = torch.cat([self.value_codes[h], v_code], dim=1)
                self.key_codes[h], self.value_codes[h] = k_code, v_code
            else:
                self.key_codes.append(k_code)
                self.value_codes.append(v_code)
        if self.sinks:
            self._keep_sinks(keys, values, position_ids, mask)
        self.length += new

    def _keep_sinks(self, keys, values, position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """Full-rank copies of the new entries (B, H_kv, T_new, D) whose position is < sinks (padding never is)."""
        batch, _, new, _ = keys.shape
        if position_ids is None:
            position_ids = torch.arange(self.length, self.length + new, device=keys.device)[None]
        positions = position_ids.expand(batch, new)
        if mask is not None:  # padding (a key no query sees, not even itself) is never a sink
            steps = torch.arange(new, device=keys.device)
            real = mask[:, 0, steps, self.length + steps]  # (B, T_new)
            positions = positions.masked_fill(~real, self.sinks)
        self._store_sinks(keys, values, positions)

    def _store_sinks(self, keys, values, positions):
        """Full-rank copies of the entries at positions < sinks: (B, H_kv, S, D) and their slots (B, S), S <= sinks."""
        is_sink = positions < self.sinks
        if not is_sink.any():
            return
        needed = int(positions[is_sink].max()) + 1  # sink buffers grow only as far as positions seen
        have = 0 if self.sink_slots is None else self.sink_slots.shape[1]
        if needed > have:
            batch, heads, _, dim = keys.shape
            grow = needed - have
            pad = lambda old, new: new if old is None else torch.cat([old, new], dim=-2 if new.ndim == 4 else -1)
            self.sink_keys = pad(self.sink_keys, keys.new_zeros(batch, heads, grow, dim))
            self.sink_values = pad(self.sink_values, values.new_zeros(batch, heads, grow, values.shape[-1]))
            self.sink_slots = pad(self.sink_slots, torch.full((batch, grow), -1, dtype=torch.long, device=keys.device))
        rows, cols = is_sink.nonzero(as_tuple=True)
        if len(rows):
            where = positions[rows, cols]
            self.sink_keys[rows, :, where] = keys[rows, :, cols]
            self.sink_values[rows, :, where] = values[rows, :, cols]
            self.sink_slots[rows, where] = self.length + cols

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K_hat, V_hat (B, H_kv, T, D) from the codes, sinks restored at full rank."""
        keys = torch.stack([c @ u.to(c.dtype).T for c, u in zip(self.key_codes, self.key_bases)], dim=1)
        values = torch.stack([c @ w.to(c.dtype).T for c, w in zip(self.value_codes, self.value_bases)], dim=1)
        if self.sink_slots is not None:
            rows, which = (self.sink_slots >= 0).nonzero(as_tuple=True)
            slots = self.sink_slots[rows, which]
            keys[rows, :, slots] = self.sink_keys[rows, :, which]
            values[rows, :, slots] = self.sink_values[rows, :, which]
        return keys, values

    def attend(self, query, key, value, mask, *, scaling, position_ids=None, **kwargs):
        if self._pending is not None:
            self._commit(position_ids, mask)
        keys, values = self.reconstruct()
        return attention.sdpa(query, keys, values, mask, scaling)

    def get_seq_length(self) -> int:
        return self.length + (self._pending[0].shape[-2] if self._pending is not None else 0)

    def tensors(self):
        extra = [t for t in (self.sink_keys, self.sink_values, self.sink_slots) if t is not None]
        return self.key_codes + self.value_codes + extra

    def accounting(self):
        rows = []
        n_sink = int((self.sink_slots >= 0).sum()) if self.sink_slots is not None else 0  # over the batch
        for part, bases, dim in (("K", self.key_bases, self.head_dim), ("V", self.value_bases, self.value_dim)):
            for head, basis in enumerate(bases):
                rank = basis.shape[1]
                theoretical = self.batch_size * self.length * rank + n_sink * dim  # codes of all + sink copies
                rows.append(dict(head=head, part=part, full=self.full_bytes_per_head(part),
                                 theoretical=theoretical * self.element_size, tokens_seen=self.seen,
                                 tokens_kept=self.length, dims_full=dim, dims_kept=rank))
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_codes = [c[indices] for c in self.key_codes]
        self.value_codes = [c[indices] for c in self.value_codes]
        if self.sink_slots is not None:
            self.sink_keys, self.sink_values = self.sink_keys[indices], self.sink_values[indices]
            self.sink_slots = self.sink_slots[indices]
        self.batch_size = len(indices)


def check_orthonormal(basis: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    gram = basis.T.float() @ basis.float()
    if not torch.allclose(gram, torch.eye(gram.shape[0]), atol=atol):
        raise ValueError(f"{what} must have orthonormal columns (max |U^T U - I| = {(gram - torch.eye(len(gram))).abs().max():.2e})")
