"""Feature-axis compression: keys and values stored projected onto a per-(layer, kv-head) orthonormal basis.

For kv head h with key basis U (D, r) and value basis W (D, r_v) the cache stores the codes k @ U and v @ W.
Attention with the query projected by the same U (shared by the query heads of a GQA group),
    softmax((q U)(k U)^T * s) (v W) W^T  ==  softmax(q (k U U^T)^T * s) (v W W^T),
Two read paths compute it. Multi-token reads (prefill, teacher forcing) reconstruct K_hat = (k U) U^T and
V_hat = (v W) W^T transiently and run ordinary attention. One-token decode reads (``fast_decode``) never
reconstruct: they score the projected query against the key codes and lift the attended value code by W^T, what
:mod:`kvlab.kernels.projected_attention` computes, plus the full-rank sink copies and the attention mask (left
padding, sliding windows), which that op's ``lengths`` cannot express; so the layer runs the same math in torch,
batched over the kv heads of equal ranks. Both paths agree to float rounding (tests/test_projection_decode.py).

Pre-RoPE keys (``rotary`` given, a :class:`~kvlab.rope.Rotary`): the key basis was fitted on keys *before* rotary,
where they are far lower rank. The model hands the cache post-RoPE keys k = R(p) k_pre; the layer un-rotates them
on write (exact), stores c = U^T k_pre, and on every read rebuilds k_pre = U c and rotates each cached entry by its
own position, K_hat = R(p) U c. The query cannot absorb U any more (R(p) differs per cached position), so one-token
reads rebuild the keys of the group (O(T D r) per head) instead of projecting the query; values are unchanged.
The layer keeps each entry's position (int32, (B, T)), counted in measured and theoretical bytes.

Only the codes stay in memory. Ranks may differ per head (ragged storage: the kv heads of equal key and value ranks
share one buffer (B, n, T, r), so nothing is padded to the largest rank).
Multi-token writes allocate exactly; decoding grows the buffers in place by a sixteenth (as
:class:`~kvlab.cache.FullLayer`) instead of re-concatenating every code at every token. Pending entries, full-rank
sink copies, reads and bytes: :class:`~kvlab.cache.coded.CodedLayer`.
"""

from __future__ import annotations

import torch

from .. import attention
from .base import grow_tokens
from ..rope import Rotary
from .coded import CodedLayer


class _Group:
    """Kv heads of one layer with the same key rank and the same value rank, stored and read together."""

    def __init__(self, heads: list[int], key_bases: list[torch.Tensor], value_bases: list[torch.Tensor],
                 value_decoders: list[torch.Tensor]):
        self.heads = heads
        contiguous = heads == list(range(heads[0], heads[0] + len(heads)))
        self.select = slice(heads[0], heads[-1] + 1) if contiguous else torch.tensor(heads)  # picks them on dim 1
        self.key_basis = torch.stack([key_bases[h] for h in heads])  # (n, D, r)
        self.value_basis = torch.stack([value_bases[h] for h in heads])  # (n, Dv, r_v) encoder
        self.value_decoder = torch.stack([value_decoders[h] for h in heads])  # (n, Dv, r_v): = encoder unless oblique
        self.keys = self.values = None  # (B, n, capacity, r), (B, n, capacity, r_v); the first ``length`` are codes


class ProjectedLayer(CodedLayer):
    fast_decode: bool = True  # one-token reads score against the codes (False: always reconstruct K_hat, V_hat)

    def __init__(self, layer_idx: int, key_bases: list[torch.Tensor], value_bases: list[torch.Tensor], sinks: int = 0,
                 min_grow: int = 32, rotary: Rotary | None = None, value_decoders: list[torch.Tensor] | None = None):
        """``key_bases[h]``: (D, r_h) with orthonormal columns; ``value_bases[h]``: (D, r_v_h). ``rotary``: the
        layer's rotary embedding when the key bases were fitted on pre-RoPE keys (None: post-RoPE bases).
        ``value_decoders[h]`` (D, r_v_h): an oblique value read, v_hat = F (E^T v) (output-aware bases,
        :mod:`kvlab.methods.output_aware`); None: v_hat = W (W^T v) with the orthonormal ``value_bases``."""
        super().__init__(layer_idx, sinks)
        self.rotary = rotary
        self.value_decoders = list(value_decoders) if value_decoders is not None else None
        if self.value_decoders is not None and [d.shape for d in self.value_decoders] != [w.shape for w in value_bases]:
            raise ValueError("value_decoders must match value_bases head by head in shape (D, r_v)")
        self.positions = None  # (B, capacity) int32, pre-RoPE only: the position each stored key was rotated by
        self._new_positions = None
        if len(key_bases) != len(value_bases):
            raise ValueError(f"{len(key_bases)} key bases but {len(value_bases)} value bases")
        self.key_bases, self.value_bases = list(key_bases), list(value_bases)
        self.min_grow = min_grow
        by_ranks: dict[tuple[int, int], list[int]] = {}
        for h, (u, w) in enumerate(zip(self.key_bases, self.value_bases)):
            by_ranks.setdefault((u.shape[1], w.shape[1]), []).append(h)
        decoders = self.value_decoders if self.value_decoders is not None else self.value_bases
        self._groups = [_Group(heads, self.key_bases, self.value_bases, decoders) for heads in by_ranks.values()]
        self._where = {h: (g, i) for g in self._groups for i, h in enumerate(g.heads)}  # kv head -> (group, index)

    @property
    def key_codes(self) -> list[torch.Tensor]:
        """Per kv head (B, T, r_h): views of the stored codes."""
        return [self._where[h][0].keys[:, self._where[h][1], : self.length] for h in range(len(self._where))
                if self._where[h][0].keys is not None]

    @property
    def value_codes(self) -> list[torch.Tensor]:
        return [self._where[h][0].values[:, self._where[h][1], : self.length] for h in range(len(self._where))
                if self._where[h][0].values is not None]

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.key_bases, self.value_bases, self.sinks, self.min_grow, self.rotary,
                      self.value_decoders)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if len(self.key_bases) != self.n_heads:
            raise ValueError(f"layer {self.layer_idx}: {len(self.key_bases)} bases for {self.n_heads} kv heads")

    def _commit(self, position_ids, mask) -> None:
        if self.rotary is not None:
            batch, _, new, _ = self._pending[0].shape
            if position_ids is None:
                position_ids = torch.arange(self.length, self.length + new, device=self._pending[0].device)[None]
            self._new_positions = position_ids.expand(batch, new)  # (B, T_new)
        super()._commit(position_ids, mask)

    def _append_codes(self, keys, values) -> None:
        new = keys.shape[-2]
        needed = self.length + new
        if self.rotary is not None:
            positions, self._new_positions = self._new_positions, None
            keys = self.rotary.unrotate(keys, positions)  # (B, H_kv, T_new, D) pre-RoPE, exact
            self._append_positions(positions.to(torch.int32), needed)
        for g in self._groups:
            k_code = keys[:, g.select] @ g.key_basis.to(keys.dtype)  # (B, n, T_new, r)
            v_code = values[:, g.select] @ g.value_basis.to(values.dtype)
            if not self.length:  # first write: the codes themselves, exactly sized (and autograd-friendly)
                g.keys, g.values = k_code, v_code
                continue
            if needed > g.keys.shape[2]:
                capacity = needed + max(self.min_grow, needed // 16) if new == 1 else needed  # slack when decoding
                g.keys = grow_tokens(g.keys, self.length, capacity, k_code)
                g.values = grow_tokens(g.values, self.length, capacity, v_code)
            g.keys[:, :, self.length: needed] = k_code
            g.values[:, :, self.length: needed] = v_code

    def _append_positions(self, positions: torch.Tensor, needed: int) -> None:
        """Keep the positions (B, T_new) of the new entries after the ``length`` stored ones (grown with the codes)."""
        if not self.length:
            self.positions = positions.contiguous()
            return
        if needed > self.positions.shape[1]:
            capacity = needed + max(self.min_grow, needed // 16) if positions.shape[1] == 1 else needed
            grown = self.positions.new_empty(self.positions.shape[0], capacity)
            grown[:, : self.length] = self.positions[:, : self.length]
            self.positions = grown
        self.positions[:, self.length: needed] = positions

    def _rotate(self, keys: torch.Tensor) -> torch.Tensor:
        """R(p) k for pre-RoPE keys (B, n, length, D) at the stored positions; identity for post-RoPE bases."""
        if self.rotary is None:
            return keys
        return self.rotary.rotate(keys, self.positions[:, : self.length].long())

    def _decode_all(self):
        parts = [(g, self._rotate(g.keys[:, :, : self.length] @ g.key_basis.to(g.keys.dtype).transpose(1, 2)),
                  g.values[:, :, : self.length] @ g.value_decoder.to(g.values.dtype).transpose(1, 2))
                 for g in self._groups]  # (B, n, T, D) per group
        if len(parts) == 1:
            return parts[0][1], parts[0][2]  # (B, H_kv, T, D), fresh tensors
        batch = parts[0][1].shape[0]
        keys = parts[0][1].new_empty(batch, self.n_heads, self.length, self.head_dim)
        values = parts[0][2].new_empty(batch, self.n_heads, self.length, self.value_dim)
        for g, k, v in parts:
            keys[:, g.select], values[:, g.select] = k, v
        return keys, values

    # ---- reading
    def attend(self, query, key, value, mask, *, scaling, position_ids=None, **kwargs):
        if self._pending is not None:
            self._commit(position_ids, mask)
        if self.fast_decode and query.shape[2] == 1 and self.length:
            return self._decode_read(query, mask, scaling)
        keys, values = self.reconstruct()
        return attention.sdpa(query, keys, values, mask, scaling)

    def _decode_read(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
        """Attention (B, 1, H, Dv) of one query per row (B, H, 1, D) read from the codes, sinks at full rank.

        Per kv head h: scores of the projected query (q U_h) against the key codes, and of q against the full-rank
        sink copies; one softmax over both, the sink slots' codes masked out (each sink counts once, at full rank);
        the attended value codes lifted by W_h^T plus the attended sink values. Masked columns get -inf. Heads of
        equal ranks are computed together (batched matmuls over the group)."""
        batch, heads, _, dim = query.shape
        group, tokens = heads // self.n_heads, self.length
        scale = scaling if scaling is not None else dim**-0.5
        q = query[:, :, 0].reshape(batch, self.n_heads, group, dim)  # (B, H_kv, G, D)
        bias = torch.zeros(batch, 1, 1, tokens, device=query.device)  # (B, 1, 1, T) additive, float32
        if mask is not None:
            mask = mask[:, :1, -1:, -tokens:]  # (B, 1, 1, T)
            if mask.dtype == torch.bool:
                mask = mask | ~mask.any(dim=-1, keepdim=True)  # as attention.sdpa: a row with no visible key sees all
                bias = bias.masked_fill(~mask, float("-inf"))
            else:
                bias = bias + mask.float()
        sink_bias = None
        if self.sink_slots is not None:
            valid = self.sink_slots >= 0  # (B, S)
            slots = self.sink_slots.clamp(min=0)
            sink_bias = bias[:, 0, 0].gather(-1, slots).masked_fill(~valid, float("-inf"))[:, None, None]  # (B,1,1,S)
            rows, which = valid.nonzero(as_tuple=True)
            zero = torch.zeros_like(rows)
            bias = bias.index_put((rows, zero, zero, self.sink_slots[rows, which]),
                                  bias.new_full((), float("-inf")))  # the codes of sink slots are not read
        dtype = query.dtype
        out = None if len(self._groups) == 1 else query.new_empty(batch, self.n_heads, group, self.value_dim)
        for g in self._groups:
            q_g = q[:, g.select]  # (B, n, G, D)
            k_codes, v_codes = g.keys[:, :, :tokens], g.values[:, :, :tokens]  # (B, n, T, r)
            if self.rotary is None:  # the query absorbs U: score against the codes
                scores = (q_g @ g.key_basis.to(dtype)) @ k_codes.transpose(2, 3)  # (B, n, G, T)
            else:  # pre-RoPE: rebuild U c and rotate each entry by its position (kvlab.kernels.rope_attention)
                scores = q_g @ self._rotate(k_codes @ g.key_basis.to(dtype).transpose(1, 2)).transpose(2, 3)
            scores = scores.float() * scale + bias  # (B, n, G, T)
            lift = g.value_decoder.to(dtype).transpose(1, 2)  # (n, r_v, Dv)
            if sink_bias is None:
                o = (torch.softmax(scores, dim=-1).to(dtype) @ v_codes) @ lift
            else:
                sink_scores = (q_g @ self.sink_keys[:, g.select].transpose(2, 3)).float() * scale + sink_bias
                probs = torch.softmax(torch.cat([scores, sink_scores], dim=-1), dim=-1).to(dtype)  # (B, n, G, T + S)
                o = (probs[..., :tokens] @ v_codes) @ lift + probs[..., tokens:] @ self.sink_values[:, g.select]
            if out is None:
                out = o  # (B, H_kv, G, Dv): one group holds every head, in order
            else:
                out[:, g.select] = o
        return out.reshape(batch, heads, self.value_dim).unsqueeze(1)  # (B, 1, H, Dv)

    # ---- bytes and batch
    def code_tensors(self):
        codes = [t for g in self._groups for t in (g.keys, g.values) if t is not None]
        return codes + ([self.positions] if self.positions is not None else [])

    def accounting(self):
        rows = super().accounting()
        if self.rotary is not None and self.length:  # the stored positions, spread over the key rows
            per_row, extra = divmod(self.batch_size * self.length * 4, self.n_heads)  # int32: no dtype view
            keys = [row for row in rows if row["part"] == "K"]
            for i, row in enumerate(keys):
                row["theoretical"] += per_row + (extra if i == 0 else 0)
                row["fixed"] = row.get("fixed", 0) + per_row + (extra if i == 0 else 0)
        return rows

    def dims_kept(self, part: str, head: int) -> int:
        return (self.key_bases if part == "K" else self.value_bases)[head].shape[1]

    def _select_codes(self, indices) -> None:
        for g in self._groups:
            g.keys, g.values = g.keys[indices, :, : self.length], g.values[indices, :, : self.length]
        if self.positions is not None:
            self.positions = self.positions[indices, : self.length]


def check_orthonormal(basis: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    gram = basis.T.float() @ basis.float()
    if not torch.allclose(gram, torch.eye(gram.shape[0]), atol=atol):
        raise ValueError(f"{what} must have orthonormal columns (max |U^T U - I| = {(gram - torch.eye(len(gram))).abs().max():.2e})")
