"""Token eviction: a cache layer that keeps, per (sequence, kv head), a subset of the tokens it has seen.

Storage (one dense allocation per tensor, so what is evicted is really freed):

    keys    (B, H_kv, C, D)     values (B, H_kv, C, Dv)
    index   (B, H_kv, C)        column of each entry in the 2-D attention mask (= the cache position at which it was
                                written, padding included), -1 for an empty slot

``C`` is the number of slots per (row, head). Each (row, head) may keep a different number of tokens: slots beyond
what it keeps are empty (index -1), never attended and never kept by a later eviction. Bytes: ``tensors()`` is what
is allocated (keys, values, index and any score buffer: measured), ``accounting()`` counts the occupied slots
(theoretical). StreamingLLM, H2O and SnapKV keep the same number of tokens per head, so their storage only has empty
slots when the rows of a batch have different real lengths. ``index`` is stored in the narrowest integer type that
holds it (int16 below 32768 tokens, else int32): 2 bytes per entry, 0.4 % of an fp32 SmolLM2 entry (2 x 64 x 4 B).

Attention: the query in column ``c`` sees exactly the kept tokens the full cache's mask lets it see: the boolean mask
transformers builds over *every* column seen so far (the harness's 2-D mask covers evicted tokens too) is gathered
at the kept entries' columns. Causality, left padding, padding in the middle and sliding windows therefore follow
the same rules as in the full cache; padding is stored with index -1 as it arrives, so it is never attended and
never kept. ``get_seq_length`` is the number of columns seen (not kept): transformers derives the query positions and
the mask size from it.

Protocol: "compress the context, then continue". Until ``compress`` the layer keeps everything (and, if its method
needs them, the attention statistics of the prefill); a second forward before ``compress``, or accounting bytes of an
uncompressed cache, raises (the "throughout" protocol would silently be the full cache). After ``compress`` the layer
keeps ``budget`` x the real tokens seen per row; with ``decode=True`` it evicts back to that count after every later
forward (token by token when decoding), with the same rule.

The method deciding *what* to keep is a policy (see :class:`EvictionPolicy`; the dataclasses of
:mod:`kvlab.methods.token`): ``priority(layer)`` ranks the slots, ``keep_counts(layer)`` says how many to keep.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .. import attention
from .base import KVLayer

QUERY_CHUNK = 256  # queries per block when attention probabilities are materialised
INT16_MAX = 2**15 - 1
TIER = 1e12  # priority tiers above any attention score: tokens kept whatever their score (sinks, recent, window)
RECORDS = (None, "accumulated", "window")


class EvictionPolicy(Protocol):
    """What an eviction layer asks its method."""

    name: str
    decode: bool

    def records(self, compressed: bool) -> str | None:
        """Statistics ``attend`` must collect now: None, "accumulated" (attention each slot received, summed over
        queries and query heads of its group) or "window" (the same from the last queries of the forward only)."""

    def priority(self, layer: "EvictionLayer") -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(B, H_kv, C), higher = keep first, or a tuple of such keys (most significant first, ties broken by the
        next, finally by the later column); empty slots are excluded whatever their priority."""

    def keep_counts(self, layer: "EvictionLayer") -> torch.Tensor:
        """(B, H_kv) long: tokens to keep per (row, kv head)."""


def _index_dtype(n_columns: int) -> torch.dtype:
    return torch.int16 if n_columns <= INT16_MAX else torch.int32


def softmax_attention(
    query: torch.Tensor,  # (B, H, Q, D)
    keys: torch.Tensor,  # (B, H_kv, C, D)
    values: torch.Tensor | None,  # (B, H_kv, C, Dv) or None (probabilities only)
    mask: torch.Tensor,  # bool (B, 1 or H_kv, Q, C), True = attend
    scaling: float | None,
    chunk: int = QUERY_CHUNK,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Plain softmax attention in float32, query block by block (memory: B x H x chunk x C probabilities).

    Returns the output (B, Q, H, Dv) in the query's dtype (None without ``values``) and the attention each key
    received, summed over the queries: (B, H_kv, G, C) with G = H / H_kv query heads per kv head (query head j reads
    kv head j // G, as transformers' ``repeat_kv``). Rows with no visible key (padding) get zero probabilities.
    """
    batch, heads, n_query, dim = query.shape
    n_kv = keys.shape[1]
    group = heads // n_kv
    scale = scaling if scaling is not None else dim**-0.5
    q = query.float().reshape(batch, n_kv, group, n_query, dim)  # (B, H_kv, G, Q, D)
    k = keys.float().unsqueeze(2).transpose(-1, -2)  # (B, H_kv, 1, D, C)
    v = values.float().unsqueeze(2) if values is not None else None  # (B, H_kv, 1, C, Dv)
    m = mask.unsqueeze(2)  # (B, 1 or H_kv, 1, Q, C)
    received = query.new_zeros(batch, n_kv, group, keys.shape[2], dtype=torch.float32)
    out = None if v is None else query.new_empty(batch, n_kv, group, n_query, v.shape[-1], dtype=torch.float32)
    for start in range(0, n_query, chunk):
        stop = min(n_query, start + chunk)
        scores = (q[..., start:stop, :] @ k) * scale  # (B, H_kv, G, c, C)
        scores = scores.masked_fill(~m[..., start:stop, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
        received += probs.sum(-2)
        if out is not None:
            out[..., start:stop, :] = probs @ v
    if out is not None:
        out = out.reshape(batch, heads, n_query, -1).transpose(1, 2).to(query.dtype)  # (B, Q, H, Dv)
    return out, received


def ranks_by_column(index: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """(B, H, C) rank of each occupied slot among its (row, head)'s occupied slots by column (0 = earliest, or the
    latest with ``descending``); empty slots rank after every occupied one."""
    cols = index.long()
    empty = cols < 0
    key = cols.masked_fill(empty, -1 if descending else torch.iinfo(torch.long).max)
    perm = key.argsort(dim=-1, descending=descending, stable=True)
    steps = torch.arange(index.shape[-1], device=index.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, steps)


def _slotted(name: str) -> property:
    """A per-slot tensor (B, H_kv, C, ...) stored in a buffer that may hold spare slots: reads see the first
    ``slots``; assigning a tensor replaces the buffer and sets ``slots`` to its length."""
    attr = "_" + name

    def get(self):
        buf = getattr(self, attr, None)
        if buf is None or buf.shape[2] == self.slots:
            return buf
        return buf[:, :, : self.slots]

    def set(self, value):
        setattr(self, attr, value)
        if value is not None:
            self.slots = value.shape[2]

    return property(get, set)


class EvictionLayer(KVLayer):
    """Keeps per (row, kv head) the tokens its policy picks at ``compress``; see the module docstring.

    Decoding appends in place: when a one-token write overflows the slots, every per-slot buffer grows by a
    sixteenth (at least ``MIN_GROW`` slots), so a step does not re-copy the whole cache; spare slots are allocated
    (measured bytes count them) but never read. Multi-token writes and evictions allocate exactly."""

    MIN_GROW = 32
    keys, values, index, scores = (_slotted(n) for n in ("keys", "values", "index", "scores"))
    extras: tuple[str, ...] = ()  # a subclass's further per-slot (B, H_kv, C) tensors (``_slotted``): appended,
    # gathered on eviction and selected with the batch like ``index``; ``_new_extras`` gives their new entries

    def __init__(self, layer_idx: int, policy: EvictionPolicy):
        super().__init__(layer_idx)
        self.policy = policy
        self.slots = 0  # slots in use (C); the buffers may hold more
        self.keys = self.values = None  # (B, H_kv, C, D)
        self.index = None  # (B, H_kv, C) mask column of each slot, -1 = empty
        self.scores = None  # (B, H_kv, C) float32 accumulated attention ("accumulated" policies)
        self.window = None  # (B, H_kv, G, C) float32 attention from the last window queries ("window" policies)
        self.window_len = 0  # slots of the last forward covered by the window (the last ones written)
        self.real_seen = None  # (B,) long: real (non-padding) tokens seen per row
        self.compressed = False
        self.compacted = False  # False while slot c holds column c (nothing evicted yet)
        self.shared_heads = True  # every head keeps the same columns (lets the mask gather once per row)
        self.forwards = 0

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.policy)

    # ------------------------------------------------------------------------------------------------ writing

    def _count_forward(self) -> None:
        """Every write starts here: one forward before ``compress`` (the prefill), any number after."""
        if self.forwards and not self.compressed:
            raise RuntimeError(
                f"{self.policy.name}: a second forward reached the cache before `method.compress(cache, ...)`. "
                "Token-eviction methods keep the whole context until compress is called after the prefill (the "
                "'compress the context, then continue' protocol, protocol='context'); the 'throughout' protocol "
                "(one teacher-forced pass, no compress) and chunked prefill are not supported."
            )
        self.forwards += 1

    def _store(self, key_states, value_states):
        self._count_forward()
        batch, heads, new, _ = key_states.shape
        columns = self.seen + new
        dtype = _index_dtype(columns)
        cols = torch.arange(self.seen, columns, device=key_states.device, dtype=dtype)
        cols = cols.expand(batch, heads, new)  # (B, H_kv, T_new)
        key_states, value_states = self._encode(key_states, value_states)
        extras = self._new_extras(batch, heads, new, key_states.device)
        if self.keys is None:
            self.keys, self.values = key_states, value_states
            self.index = cols.clone()
            for name, t in extras.items():
                setattr(self, name, t)
            self.real_seen = torch.zeros(batch, dtype=torch.long, device=key_states.device)
        else:
            self._append({"keys": key_states, "values": value_states, "index": cols,
                          "scores": None if self._scores is None else self._scores.new_zeros(batch, heads, new),
                          **extras})
        self.window, self.window_len = None, 0
        return self.keys, self.values

    def _append(self, new: dict[str, torch.Tensor | None]) -> None:
        """Write per-slot tensors (B, H_kv, T_new, ...) after the ``slots`` in use, growing the buffers if needed."""
        start, count = self.slots, new["index"].shape[2]
        needed = start + count
        if self._index.dtype != new["index"].dtype:  # more columns than int16 holds
            self._index = self._index.to(new["index"].dtype)
        capacity = needed + max(self.MIN_GROW, needed // 16) if count == 1 else needed  # slack only when decoding
        for name, values in new.items():
            if values is None:
                continue
            buf = getattr(self, "_" + name)
            if buf.shape[2] < needed:
                grown = buf.new_empty(*buf.shape[:2], capacity, *buf.shape[3:])
                grown[:, :, :start] = buf[:, :, :start]
                setattr(self, "_" + name, buf := grown)
            buf[:, :, start:needed] = values
        self.slots = needed

    def _new_extras(self, batch: int, heads: int, new: int, device) -> dict[str, torch.Tensor]:
        """Initial values (B, H_kv, T_new) of the ``extras`` for new entries (none here)."""
        return {}

    def _encode(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored form of new entries (B, H_kv, T_new, D): copies here (the states may be views of a larger
        projection output, GPT-2's fused qkv); a subclass may store codes instead (then it overrides ``read``)."""
        return (key_states.clone(memory_format=torch.contiguous_format),
                value_states.clone(memory_format=torch.contiguous_format))

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H_kv, C, D) attention reads, slot by slot as stored."""
        return self.stored()

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots (B, H_kv, C, .) as floating tensors: what is stored, or its dequantized form (a subclass that
        stores integer codes overrides this; see :mod:`kvlab.methods.quant_composed`)."""
        return self.keys, self.values

    # ------------------------------------------------------------------------------------------------ reading

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        batch, _, n_query, _ = query.shape
        start = self.seen - n_query  # column of the first query
        mask = self._full_mask(mask, batch, n_query)  # (B, 1, Q, seen)
        steps = torch.arange(n_query, device=query.device)
        real = mask[:, 0, steps, start + steps]  # (B, Q): a token that does not see itself is padding
        self.real_seen += real.sum(-1)
        if not bool(real.all()):
            new = self.index[:, :, -n_query:]
            self.index[:, :, -n_query:] = new.masked_fill(~real[:, None, :], -1)
        slot_mask = self._slot_mask(mask)  # (B, 1 or H_kv, Q, C)
        record = self.policy.records(self.compressed)
        if record not in RECORDS:
            raise ValueError(f"{self.policy.name}: records() returned {record!r}; allowed: {RECORDS}")
        keys, values = self.read()
        if record == "accumulated":
            out, received = softmax_attention(query, keys, values, slot_mask, scaling)
            if self.scores is None:
                self.scores = received.new_zeros(received.shape[0], received.shape[1], received.shape[-1])
            self.scores.add_(received.sum(2))  # in place: the buffer may hold spare slots
        else:
            out = attention.sdpa(query, keys, values, self._per_query_head(slot_mask, query), scaling)
            if record == "window":
                w = min(int(self.policy.window), n_query)  # the observation window: the last queries
                _, self.window = softmax_attention(query[:, :, -w:], keys, None, slot_mask[:, :, -w:], scaling)
                self.window_len = w
        if self.compressed and self.policy.decode:
            self.evict(self.policy.keep_counts(self))
        return out

    def _full_mask(self, mask: torch.Tensor | None, batch: int, n_query: int) -> torch.Tensor:
        """The boolean (B, 1, Q, seen) mask over every column seen; plain causal when the model gave none."""
        if mask is None:
            cols = torch.arange(self.seen, device=self.keys.device)
            return (cols[None, :] <= cols[-n_query:, None]).expand(batch, 1, n_query, self.seen)
        if mask.dtype != torch.bool:
            raise TypeError(f"eviction layers need a boolean attention mask (kvlab's mask interface), got {mask.dtype}")
        if mask.shape[-1] != self.seen or mask.shape[-2] != n_query:
            raise ValueError(f"layer {self.layer_idx}: mask covers {tuple(mask.shape[-2:])} (queries, keys) but the "
                             f"cache has seen {self.seen} tokens and {n_query} are new")
        return mask[:, :1].expand(batch, 1, n_query, self.seen)

    def _slot_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The full mask (B, 1, Q, seen) gathered at the stored slots' columns: (B, 1 or H_kv, Q, C)."""
        if not self.compacted:
            return mask  # slot c holds column c; padding columns are masked for every query
        index = self.index[:, :1] if self.shared_heads else self.index  # (B, h, C)
        batch, heads, slots = index.shape
        n_query = mask.shape[2]
        gathered = mask.expand(batch, heads, n_query, mask.shape[-1]).gather(
            3, index.long().clamp(min=0)[:, :, None, :].expand(batch, heads, n_query, slots))
        return gathered & (index >= 0)[:, :, None, :]

    @staticmethod
    def _per_query_head(mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if mask.shape[1] == 1:
            return mask
        return mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)  # (B, H, Q, C)

    # ------------------------------------------------------------------------------------------------ eviction

    def compress(self) -> None:
        """Evict to the policy's keep counts; statistics the policy no longer needs are freed."""
        if not self.is_initialized or self.keys is None:
            raise RuntimeError(f"layer {self.layer_idx}: nothing to compress, run the prefill through the cache first")
        self.evict(self.policy.keep_counts(self))
        self.compressed = True
        if self.policy.records(True) != "accumulated":
            self.scores = None
        self.window, self.window_len = None, 0

    def occupied(self) -> torch.Tensor:
        """(B, H_kv) number of occupied slots."""
        return (self.index >= 0).sum(-1)

    def evict(self, keep: torch.Tensor) -> None:
        """Keep the ``keep`` (B, H_kv) highest-priority occupied slots per (row, head) and compact them into new
        tensors (the old ones are freed), in column order; (row, head)s keeping fewer than the most get empty slots
        at the end."""
        keep = torch.minimum(keep.to(self.index.device).long(), self.occupied())
        if bool((keep == self.occupied()).all()) and self.compacted:
            return  # nothing to evict (and nothing empty to drop)
        n_slots = max(int(keep.max()), 1) if keep.numel() else 1
        n_slots = min(n_slots, self.index.shape[-1])
        top = self._ranking(self.policy.priority(self))[..., :n_slots]  # (B, H_kv, n) by priority
        rank = torch.arange(n_slots, device=top.device)
        kept = rank < keep[..., None]  # (B, H_kv, n)
        order = torch.where(kept, top, self.index.shape[-1] + rank).argsort(dim=-1)  # kept slots first, in slot order
        slots, kept = top.gather(-1, order), kept.gather(-1, order)  # (B, H_kv, n)
        keys = self.keys.gather(2, slots[..., None].expand(-1, -1, -1, self.keys.shape[-1]))  # (B, H_kv, n, D)
        values = self.values.gather(2, slots[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        index = self.index.gather(-1, slots).masked_fill(~kept, -1)  # (B, H_kv, n)
        scores = self.scores.gather(-1, slots) if self.scores is not None else None
        extras = {name: getattr(self, name).gather(-1, slots) for name in self.extras}
        self.keys, self.values, self.index, self.scores = keys, values, index, scores  # gathered first: reads slice
        for name, t in extras.items():
            setattr(self, name, t)
        if self.window is not None:
            self.window = self.window.gather(-1, slots[:, :, None, :].expand(-1, -1, self.window.shape[2], -1))
            self.window_len = 0
        self.compacted = True
        self.shared_heads = bool((self.index == self.index[:, :1]).all())

    def _ranking(self, priority: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Slots (B, H_kv, C) from the most to the least worth keeping; empty slots last.

        ``priority`` is one (B, H_kv, C) tensor or a tuple of them, most significant first; ties left by all of them
        go to the later column. Stable sorts from the least significant key up make the order deterministic (max
        pooling, for one, produces exact ties), so a row ranks its slots the same alone or in a padded batch."""
        keys = list(priority) if isinstance(priority, (tuple, list)) else [priority]
        keys.append(self.index.long())
        order = torch.arange(self.index.shape[-1], device=self.index.device).expand(self.index.shape)
        for key in reversed(keys):
            key = key.double().masked_fill(self.index < 0, float("-inf"))
            order = order.gather(-1, key.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
        return order

    # ------------------------------------------------------------------------------------------------ cache API

    def get_seq_length(self) -> int:
        return self.seen

    def kept_positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids (B, H_kv, C) of the kept entries (``cumsum(mask) - 1`` of their column), -1 for empty slots.

        ``attention_mask``: the (B, seen) 2-D mask of every token the cache has seen."""
        positions = attention.padded_positions(attention_mask.to(self.index.device))  # (B, seen)
        cols = self.index.long()
        batch, heads, slots = cols.shape
        found = positions[:, None, :].expand(batch, heads, -1).gather(-1, cols.clamp(min=0))
        return found.masked_fill(cols < 0, -1)

    def tensors(self):
        extras = [getattr(self, "_" + name, None) for name in self.extras]
        return [t for t in (self._keys, self._values, self._index, self._scores, self.window, *extras) if t is not None]

    def accounting(self):
        if not self.compressed:
            raise RuntimeError(
                f"{self.policy.name}: the cache still holds the whole context: call `method.compress(cache, ...)` "
                "after the prefill before accounting bytes (protocol='context'; 'throughout' is not supported)"
            )
        kept = (self.index >= 0).sum(dim=(0, 2))  # (H_kv,) over the batch
        rows = []
        for part, dim in (("K", self.head_dim), ("V", self.value_dim)):
            for head in range(self.n_heads):
                n = int(kept[head])
                rows.append(dict(head=head, part=part, full=self.full_bytes_per_head(part),
                                 theoretical=n * dim * self.element_size, tokens_seen=self.seen,
                                 tokens_kept=n / max(self.batch_size, 1), dims_full=dim, dims_kept=dim))
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is None:
            return
        indices = indices.to(self.keys.device)
        names = ("keys", "values", "index", "scores", "window", "real_seen", *self.extras)
        selected = {name: getattr(self, name) for name in names}  # read every view before replacing any buffer
        for name, t in selected.items():
            if t is not None:
                setattr(self, name, t[indices].contiguous())
        self.batch_size = len(indices)
