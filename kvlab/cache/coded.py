"""Feature-axis cache layers: every entry is stored as a code, attention reads the decoded entries.

:class:`CodedLayer` holds what the projected (PCA, MatryoshkaKV) and autoencoded (KV-CAR) caches share: new entries
wait in ``_pending`` until attention reads them (only then is their position known), are coded by the subclass
(``_append_codes``), and every read decodes all of them (``_decode_all``), with the first ``sinks`` positions of
every sequence restored from full-size copies (the attention sinks take most of the attention mass; ``sinks``
counts positions, so left padding is fine). The entries of the current step are read through their coded form too
(the "compressed attention throughout" protocol).
"""

from __future__ import annotations

import torch

from .. import attention
from .base import KVLayer


class CodedLayer(KVLayer):
    """Subclasses implement ``_append_codes``, ``_decode_all``, ``code_tensors``, ``dims_kept`` and
    ``_select_codes``."""

    def __init__(self, layer_idx: int, sinks: int = 0):
        super().__init__(layer_idx)
        self.sinks = int(sinks)
        self.sink_keys = self.sink_values = None  # (B, H_kv, S, D): entries at positions < sinks, full size
        self.sink_slots = None  # (B, S): where each sink sits among the stored entries, -1 if not seen
        self._pending = None
        self.length = 0

    # ---- what a subclass provides
    def _append_codes(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Code the new entries (B, H_kv, T_new, D) and append them after the ``length`` stored ones."""
        raise NotImplementedError

    def _decode_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K_hat, V_hat (B, H_kv, length, D) decoded from the codes; new tensors that may be written in place."""
        raise NotImplementedError

    def code_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def dims_kept(self, part: str, head: int) -> int:
        """Size of one stored code of ``part`` ("K" or "V") in kv head ``head``."""
        raise NotImplementedError

    def _select_codes(self, indices: torch.Tensor) -> None:
        raise NotImplementedError

    # ---- writing
    def _store(self, key_states, value_states):
        self._pending = (key_states, value_states)
        return key_states, value_states  # plain readers would see uncompressed new entries; kvlab attention won't

    def _commit(self, position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        keys, values = self._pending  # (B, H_kv, T_new, D)
        self._pending = None
        self._append_codes(keys, values)
        if self.sinks:
            self._keep_sinks(keys, values, position_ids, mask)
        self.length += keys.shape[-2]

    def _keep_sinks(self, keys, values, position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """Full-size copies of the new entries (B, H_kv, T_new, D) whose position is < sinks (padding never is)."""
        batch, _, new, _ = keys.shape
        if position_ids is None:
            position_ids = torch.arange(self.length, self.length + new, device=keys.device)[None]
        positions = position_ids.expand(batch, new)
        if mask is not None:  # padding (a key no query sees, not even itself) is never a sink
            steps = torch.arange(new, device=keys.device)
            real = mask[:, 0, steps, self.length + steps]  # (B, T_new)
            positions = positions.masked_fill(~real, self.sinks)
        is_sink = positions < self.sinks
        if not is_sink.any():
            return
        needed = int(positions[is_sink].max()) + 1  # sink buffers grow only as far as positions seen
        have = 0 if self.sink_slots is None else self.sink_slots.shape[1]
        if needed > have:
            heads, dim = keys.shape[1], keys.shape[-1]
            grow = needed - have
            pad = lambda old, new: new if old is None else torch.cat([old, new], dim=-2 if new.ndim == 4 else -1)
            self.sink_keys = pad(self.sink_keys, keys.new_zeros(batch, heads, grow, dim))
            self.sink_values = pad(self.sink_values, values.new_zeros(batch, heads, grow, values.shape[-1]))
            self.sink_slots = pad(self.sink_slots, torch.full((batch, grow), -1, dtype=torch.long, device=keys.device))
        rows, cols = is_sink.nonzero(as_tuple=True)
        where = positions[rows, cols]
        self.sink_keys[rows, :, where] = keys[rows, :, cols]
        self.sink_values[rows, :, where] = values[rows, :, cols]
        self.sink_slots[rows, where] = self.length + cols

    # ---- reading
    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K_hat, V_hat (B, H_kv, T, D) decoded from the codes, sinks restored at full size."""
        keys, values = self._decode_all()
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

    # ---- bytes and batch
    def tensors(self):
        extra = [t for t in (self.sink_keys, self.sink_values, self.sink_slots) if t is not None]
        return self.code_tensors() + extra

    def accounting(self):
        rows = []
        n_sink = int((self.sink_slots >= 0).sum()) if self.sink_slots is not None else 0  # over the batch
        for part, dim in (("K", self.head_dim), ("V", self.value_dim)):
            for head in range(self.n_heads):
                kept = self.dims_kept(part, head)
                theoretical = self.batch_size * self.length * kept + n_sink * dim  # codes of all + sink copies
                rows.append(dict(head=head, part=part, full=self.full_bytes_per_head(part),
                                 theoretical=theoretical * self.element_size, tokens_seen=self.seen,
                                 tokens_kept=self.length, dims_full=dim, dims_kept=kept))
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._select_codes(indices)
        if self.sink_slots is not None:
            self.sink_keys, self.sink_values = self.sink_keys[indices], self.sink_values[indices]
            self.sink_slots = self.sink_slots[indices]
        self.batch_size = len(indices)
