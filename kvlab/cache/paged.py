"""A paged KV store (vLLM / KV-Compress layout): one pool of fixed-size blocks per cache, per-(row, head) block tables.

Layout (the one :func:`kvlab.kernels.paged_attention.reference.paged_decode_attention` reads):

    pool.keys     (N_blocks, S, D)      one block holds S tokens of ONE (layer, row, kv head); S = block size
    pool.values   (N_blocks, S, Dv)
    pool.index    (N_blocks, S) int32   mask column of each slot (the cache position it was written at), -1 = padding
    block_tables  (B, H_kv, M) int32    per layer: block ids of each (row, kv head) in token order, -1 = unused
    lengths       (B, H_kv) long        per layer: slots in use; token t of head h of row b sits in
                                        pool.keys[block_tables[b, h, t // S], t % S]

:class:`BlockPool` is shared by every layer of a cache (like vLLM's block manager): ``allocate(n)`` pops ids from a free
list, ``free(ids)`` pushes them back, and the pool grows geometrically (copying) when the free list runs out.
:class:`PagedLayer` allocates block by block as tokens arrive (prefill and decode); eviction keeps the chosen tokens,
compacts them into the head's first blocks (in column order) and returns every block it no longer needs to the free
list, so heads keeping different numbers of tokens waste at most one partial block each (KV-Compress's point: the
physical memory follows the theoretical saving).

Reads: multi-token forwards (prefill, continuations) gather a dense (B, H_kv, M x S, D) view of the blocks and run the
masked dense path of :class:`~kvlab.cache.eviction.EvictionLayer` (same mask rules: causality, left padding,
sliding windows). A decode step (one query) after ``compress`` reads through the block tables with the paged decode
kernel; if some held token is not visible to the query (a sliding-window layer), that step falls back to the dense
masked path (``dense_decodes`` counts them). Padding written after ``compress`` (a left-padded question, right-padded
continuations) is dropped right after the forward that wrote it, so the kernel never sees it.

Bytes: ``measured_bytes()`` = the layer's blocks in use x ``pool.block_bytes`` (+ its block tables, lengths and
statistics), not the pool's capacity; ``pool.capacity_bytes`` is the physical reservation (free blocks included).
"""

from __future__ import annotations

import torch

from .. import attention
from ..budget import storage_bytes
from .base import KVLabCache, KVLayer
from ..kernels import dispatch
from .eviction import RECORDS, EvictionLayer, EvictionPolicy

MIN_BLOCKS = 16  # first reservation of a pool, in blocks


class BlockPool:
    """Fixed-size blocks of keys, values and their mask columns, with a free list; see the module docstring.

    The tensors are created at the first ``allocate`` after ``bind`` fixed the geometry (head dims, dtype, device);
    every layer bound to one pool must share it."""

    def __init__(self, block_size: int = 16, min_blocks: int = MIN_BLOCKS, growth: float = 2.0):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 1:
            raise ValueError(f"min_blocks must be an int >= 1, got {min_blocks!r}")
        if not float(growth) > 1.0:
            raise ValueError(f"growth must be > 1 (geometric growth factor of the capacity), got {growth!r}")
        self.block_size = block_size
        self.min_blocks = min_blocks
        self.growth = float(growth)
        self.keys = self.values = None  # (N, S, D), (N, S, Dv)
        self.index = None  # (N, S) int32
        self.geometry = None  # (D, Dv, dtype, device)
        self._free: list[int] = []  # stack: allocate pops from the end
        self._in_use = torch.zeros(0, dtype=torch.bool)  # (N,)
        self.grows = 0  # number of reallocations

    # ---------------------------------------------------------------------------------------------- geometry

    def bind(self, head_dim: int, value_dim: int, dtype: torch.dtype, device) -> None:
        """Fix (or check) the geometry of the blocks; a layer calls this before its first write."""
        geometry = (int(head_dim), int(value_dim), dtype, torch.device(device))
        if self.geometry is None:
            self.geometry = geometry
            self._in_use = self._in_use.to(geometry[3])
        elif self.geometry != geometry:
            raise ValueError(f"this pool holds blocks of (D, Dv, dtype, device) = {self.geometry}; a layer wants "
                             f"{geometry}: layers of different geometry need separate pools")

    @property
    def capacity(self) -> int:
        """Blocks reserved (in use or free)."""
        return 0 if self.keys is None else self.keys.shape[0]

    @property
    def blocks_in_use(self) -> int:
        return self.capacity - len(self._free)

    @property
    def free_ids(self) -> list[int]:
        """Ids on the free list (the next ``allocate`` takes them from the end)."""
        return list(self._free)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: S x (D + Dv) x element size + S x 4 (int32 column index)."""
        if self.geometry is None:
            return 0
        dim, vdim, dtype, _ = self.geometry
        return self.block_size * ((dim + vdim) * torch.empty((), dtype=dtype).element_size() + 4)

    @property
    def capacity_bytes(self) -> int:
        """Physical reservation: every block, free ones included."""
        return self.capacity * self.block_bytes

    @property
    def in_use_bytes(self) -> int:
        return self.blocks_in_use * self.block_bytes

    def stats(self) -> dict:
        return dict(block_size=self.block_size, capacity=self.capacity, blocks_in_use=self.blocks_in_use,
                    block_bytes=self.block_bytes, capacity_bytes=self.capacity_bytes, in_use_bytes=self.in_use_bytes,
                    grows=self.grows)

    # ---------------------------------------------------------------------------------------------- allocation

    def allocate(self, n: int) -> torch.Tensor:
        """``n`` block ids (long tensor) taken from the free list; the pool grows first if it has too few."""
        n = int(n)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if self.geometry is None:
            raise RuntimeError("BlockPool.allocate before bind(head_dim, value_dim, dtype, device)")
        if n > len(self._free):
            self._grow(n - len(self._free))
        taken = self._free[len(self._free) - n:][::-1] if n else []
        del self._free[len(self._free) - n:]
        ids = torch.tensor(taken, dtype=torch.long, device=self.geometry[3])
        self._in_use[ids] = True
        return ids

    def free(self, ids: torch.Tensor) -> None:
        """Return blocks to the free list; freeing a block that is not in use (or twice) raises."""
        ids = torch.as_tensor(ids).long().reshape(-1).to(self._in_use.device)
        if ids.numel() == 0:
            return
        if bool((ids < 0).any()) or bool((ids >= self.capacity).any()):
            raise ValueError(f"block ids must be in [0, {self.capacity}), got {ids.min().item()}..{ids.max().item()}")
        if ids.unique().numel() != ids.numel() or not bool(self._in_use[ids].all()):
            raise ValueError("freeing blocks that are not in use (double free)")
        self._in_use[ids] = False
        self._free.extend(ids.flip(0).tolist())

    def _grow(self, missing: int) -> None:
        dim, vdim, dtype, device = self.geometry
        old = self.capacity
        new = max(old + missing, int(old * self.growth), self.min_blocks)
        # zeros, not empty: dense views read unused slots (masked, but 0 x NaN garbage would still be NaN)
        keys = torch.zeros(new, self.block_size, dim, dtype=dtype, device=device)  # (N, S, D)
        values = torch.zeros(new, self.block_size, vdim, dtype=dtype, device=device)  # (N, S, Dv)
        index = torch.full((new, self.block_size), -1, dtype=torch.int32, device=device)  # (N, S)
        if old:
            keys[:old], values[:old], index[:old] = self.keys, self.values, self.index
            self.grows += 1
        self.keys, self.values, self.index = keys, values, index
        self._in_use = torch.cat([self._in_use, self._in_use.new_zeros(new - old)])
        self._free = list(range(new - 1, old - 1, -1)) + self._free  # free ids first, then the new ones, lowest first

    # ---------------------------------------------------------------------------------------------- data

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, columns: torch.Tensor) -> None:
        """Write entries at flat slots (``block * S + offset``): slots (...), keys (..., D), values (..., Dv)."""
        flat = slots.reshape(-1)
        self.keys.view(-1, self.keys.shape[-1])[flat] = keys.reshape(-1, keys.shape[-1]).to(self.keys.dtype)
        self.values.view(-1, self.values.shape[-1])[flat] = values.reshape(-1, values.shape[-1]).to(self.values.dtype)
        self.index.view(-1)[flat] = columns.reshape(-1).to(torch.int32)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of the keys (..., D), values (..., Dv) and columns (...) at flat slots (...)."""
        flat = slots.reshape(-1)
        shape = tuple(slots.shape)
        keys = self.keys.view(-1, self.keys.shape[-1])[flat].reshape(*shape, -1)
        values = self.values.view(-1, self.values.shape[-1])[flat].reshape(*shape, -1)
        return keys, values, self.index.view(-1)[flat].reshape(shape)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.keys[dst] = self.keys[src]
        self.values[dst] = self.values[src]
        self.index[dst] = self.index[src]


class PagedLayer(EvictionLayer):
    """An eviction layer whose entries live in a shared :class:`BlockPool`; see the module docstring.

    Keeps the metadata conventions of :class:`EvictionLayer` (``index`` (B, H_kv, C) with -1 for empty slots,
    ``window`` statistics, ``real_seen``), but ``keys``/``values``/``index`` are dense views gathered from the blocks
    (C = M x S slots: slot t of a head is its t-th token), so a policy reads it like any eviction layer. Accumulated
    statistics (H2O's ``records() == "accumulated"``) are not supported.
    """

    def __init__(self, layer_idx: int, policy: EvictionPolicy, pool: BlockPool):
        KVLayer.__init__(self, layer_idx)  # not EvictionLayer's: keys, values and index are views here
        self.policy = policy
        self.pool = pool
        self.scores = None  # unused (accumulated statistics are not supported)
        self.window = None  # (B, H_kv, G, C) float32 statistics of the observation window (policy's window_stat)
        self.window_len = 0
        self.real_seen = None  # (B,) long
        self.compressed = False
        self.compacted = False  # False while slot t holds column t in every head
        self.shared_heads = True
        self.forwards = 0
        self.block_tables = None  # (B, H_kv, M) int32, -1 = unused
        self.lengths = None  # (B, H_kv) long: slots in use
        self._new_slots = None  # (B, H_kv, T) slots written by the last forward
        self.kernel_decodes = 0  # decode steps read through the block tables
        self.dense_decodes = 0  # decode steps that needed the masked dense path (sliding windows)

    def reset(self) -> None:
        self.release()
        self.__init__(self.layer_idx, self.policy, self.pool)

    def release(self) -> None:
        """Return every block of this layer to the pool."""
        if self.block_tables is not None:
            self.pool.free(self.block_tables[self.block_tables >= 0])
            self.block_tables = self.block_tables[..., :0]
            self.lengths = torch.zeros_like(self.lengths)

    # ------------------------------------------------------------------------------------------------ views

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def n_slots(self) -> int:
        """C = M x S slots per (row, head) in the dense views."""
        return 0 if self.block_tables is None else self.block_tables.shape[-1] * self.block_size

    def _flat(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat pool slots (block * S + offset) of per-head slots (B, H_kv, n); -S.. for slots without a block."""
        S = self.block_size
        if self.block_tables.shape[-1] == 0:  # no blocks at all (every head empty)
            return torch.full_like(slots, -S)
        blocks = self.block_tables.long().gather(-1, (slots // S).clamp(max=self.block_tables.shape[-1] - 1))
        return blocks * S + slots % S

    def _all_slots(self) -> torch.Tensor:
        batch, heads, _ = self.block_tables.shape
        return torch.arange(self.n_slots, device=self.lengths.device).expand(batch, heads, -1)  # (B, H_kv, C)

    @property
    def index(self) -> torch.Tensor | None:
        """(B, H_kv, C) mask column of each slot, -1 for empty slots and padding."""
        if self.block_tables is None:
            return None
        slots = self._all_slots()
        if slots.shape[-1] == 0:
            return torch.full(slots.shape, -1, dtype=torch.int32, device=slots.device)
        cols = self.pool.index.view(-1)[self._flat(slots).clamp(min=0)]
        return cols.masked_fill(slots >= self.lengths[..., None], -1)

    def _dense(self, pool_tensor: torch.Tensor) -> torch.Tensor:
        ids = self.block_tables.long().clamp(min=0)  # (B, H_kv, M)
        batch, heads, blocks = ids.shape
        return pool_tensor[ids].reshape(batch, heads, blocks * self.block_size, -1)  # (B, H_kv, C, D)

    @property
    def keys(self) -> torch.Tensor | None:
        """(B, H_kv, C, D) dense copy of the stored keys (slots past a head's length hold garbage)."""
        return None if self.block_tables is None else self._dense(self.pool.keys)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.block_tables is None else self._dense(self.pool.values)

    @keys.setter
    def keys(self, value) -> None:  # transformers' CacheLayerMixin.__init__ sets None
        if value is not None:
            raise AttributeError("a paged layer's keys are a view of its blocks; write through update()")

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("a paged layer's values are a view of its blocks; write through update()")

    def blocks_in_use(self) -> int:
        return 0 if self.block_tables is None else int((self.block_tables >= 0).sum())

    # ------------------------------------------------------------------------------------------------ writing

    def _store(self, key_states, value_states):
        self._count_forward()
        batch, heads, new, _ = key_states.shape
        device = key_states.device
        if self.block_tables is None:
            self.pool.bind(self.head_dim, self.value_dim, key_states.dtype, device)
            self.block_tables = torch.full((batch, heads, 0), -1, dtype=torch.int32, device=device)
            self.lengths = torch.zeros(batch, heads, dtype=torch.long, device=device)
            self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
        slots = self.lengths[..., None] + torch.arange(new, device=device)  # (B, H_kv, T)
        self._reserve(self.lengths + new)
        cols = torch.arange(self.seen, self.seen + new, device=device).expand(batch, heads, new)
        self.pool.write(self._flat(slots), key_states, value_states, cols)
        self.lengths = self.lengths + new
        self._new_slots = slots
        self.window, self.window_len = None, 0
        # The kvlab attention reads through ``attend``; a non-kvlab reader fails at the next layer's hand-over.
        return key_states, value_states

    def _reserve(self, lengths: torch.Tensor) -> None:
        """Allocate blocks so that each (row, head) can hold ``lengths`` (B, H_kv) tokens."""
        S = self.block_size
        have = (self.block_tables >= 0).sum(-1)  # (B, H_kv)
        need = (lengths + S - 1) // S  # (B, H_kv)
        extra = (need - have).clamp(min=0)
        total = int(extra.sum())
        if total == 0:
            return
        width = int(need.max())
        if width > self.block_tables.shape[-1]:
            pad = self.block_tables.new_full((*self.block_tables.shape[:2], width - self.block_tables.shape[-1]), -1)
            self.block_tables = torch.cat([self.block_tables, pad], dim=-1)  # (B, H_kv, M')
        j = torch.arange(self.block_tables.shape[-1], device=lengths.device)
        target = (j >= have[..., None]) & (j < (have + extra)[..., None])  # (B, H_kv, M') row-major like the ids
        self.block_tables[target] = self.pool.allocate(total).to(torch.int32)

    # ------------------------------------------------------------------------------------------------ reading

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        batch, _, n_query, _ = query.shape
        start = self.seen - n_query  # column of the first query
        mask = self._full_mask(mask, batch, n_query)  # (B, 1, Q, seen)
        steps = torch.arange(n_query, device=query.device)
        real = mask[:, 0, steps, start + steps]  # (B, Q): a token that does not see itself is padding
        self.real_seen += real.sum(-1)
        padded = not bool(real.all())
        if padded:  # padding keeps its slot until compress / the end of this forward, with column -1
            pad = (~real)[:, None, :].expand_as(self._new_slots)
            self.pool.index.view(-1)[self._flat(self._new_slots)[pad]] = -1
        record = self.policy.records(self.compressed)
        if record not in RECORDS or record == "accumulated":
            raise ValueError(f"{self.policy.name}: records() returned {record!r}; a paged layer supports None, "
                             "'window'")
        index = self.index  # (B, H_kv, C)
        out = None
        if n_query == 1 and self.compressed and record is None:
            visible = self._slot_mask_at(mask, index, per_head=True)[:, :, 0]  # (B, H_kv, C)
            held = torch.arange(index.shape[-1], device=index.device) < self.lengths[..., None]
            if bool((visible | ~held).all()):  # every held token is visible: read through the block tables
                out = dispatch.paged_decode_attention(query[:, :, 0], self.pool.keys, self.pool.values, self.block_tables,
                                       self.lengths, scaling)  # (B, H, Dv)
                out = out[:, None]  # (B, 1, H, Dv)
                self.kernel_decodes += 1
            else:
                self.dense_decodes += 1
        if out is None:
            keys, values = self.keys, self.values  # (B, H_kv, C, D) gathered once
            slot_mask = self._slot_mask_at(mask, index)  # (B, 1 or H_kv, Q, C)
            out = attention.sdpa(query, keys, values, self._per_query_head(slot_mask, query), scaling)
            if record == "window":
                w = min(int(self.policy.window), n_query)  # the observation window: the last queries
                probs = window_probs(query[:, :, -w:], keys, slot_mask[:, :, -w:], scaling)  # (B, H_kv, G, w, C)
                reduce = getattr(self.policy, "window_stat", None)
                self.window = reduce(probs) if reduce is not None else probs.sum(-2)  # (B, H_kv, G, C)
                self.window_len = w
        if self.compressed and padded:
            self.drop_padding()
        if self.compressed and self.policy.decode:
            self.evict(self.policy.keep_counts(self))
        return out

    def _full_mask(self, mask: torch.Tensor | None, batch: int, n_query: int) -> torch.Tensor:
        if mask is None:
            cols = torch.arange(self.seen, device=self.lengths.device)
            return (cols[None, :] <= cols[-n_query:, None]).expand(batch, 1, n_query, self.seen)
        return super()._full_mask(mask, batch, n_query)

    def _slot_mask_at(self, mask: torch.Tensor, index: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """The full mask (B, 1, Q, seen) at the slots' columns: (B, 1 or H_kv, Q, C), False for empty slots."""
        batch, heads, slots = index.shape
        n_query, seen = mask.shape[2], mask.shape[-1]
        if not self.compacted and slots >= seen:  # slot t holds column t in every head (nothing evicted yet)
            out = mask.new_zeros(batch, 1, n_query, slots)
            out[..., :seen] = mask
            out = out & (index[:, :1] >= 0)[:, :, None, :]
            return out.expand(batch, heads, n_query, slots) if per_head else out
        if not per_head and self.shared_heads:
            index, heads = index[:, :1], 1
        gathered = mask.expand(batch, heads, n_query, seen).gather(
            3, index.long().clamp(min=0)[:, :, None, :].expand(batch, heads, n_query, slots))
        return gathered & (index >= 0)[:, :, None, :]

    # ------------------------------------------------------------------------------------------------ eviction

    def compress(self, keep: torch.Tensor | None = None, priority=None) -> None:
        """Evict to ``keep`` (B, H_kv) (default: the policy's keep counts) by ``priority`` (default: the policy's)."""
        if not self.is_initialized or self.block_tables is None:
            raise RuntimeError(f"layer {self.layer_idx}: nothing to compress, run the prefill through the cache first")
        self.evict(self.policy.keep_counts(self) if keep is None else keep, priority)
        self.compressed = True
        self.scores = None
        self.window, self.window_len = None, 0

    def drop_padding(self) -> None:
        """Compact away slots holding padding (column -1), keeping every real token."""
        index = self.index
        self.evict((index >= 0).sum(-1), priority=index.double())

    def evict(self, keep: torch.Tensor, priority=None) -> None:
        """Keep the ``keep`` (B, H_kv) highest-priority occupied slots per (row, head), compact them into the head's
        first ceil(keep / S) blocks in column order, and return every other block of the head to the pool."""
        S = self.block_size
        index = self.index  # (B, H_kv, C)
        occupied = (index >= 0).sum(-1)
        keep = torch.minimum(keep.to(index.device).long(), occupied)
        n_slots = min(max(int(keep.max()), 1) if keep.numel() else 1, index.shape[-1])
        if priority is None:
            priority = self.policy.priority(self)
        top = self._ranking(priority)[..., :n_slots]  # (B, H_kv, n) by priority, empty slots last
        rank = torch.arange(n_slots, device=top.device)
        kept = rank < keep[..., None]  # (B, H_kv, n)
        order = torch.where(kept, top, index.shape[-1] + rank).argsort(dim=-1)  # kept first, in slot (= column) order
        slots, kept = top.gather(-1, order), kept.gather(-1, order)  # (B, H_kv, n)
        k, v, cols = self.pool.read(self._flat(slots).clamp(min=0))  # copies: (B, H_kv, n, D), ..., (B, H_kv, n)
        # free the blocks past what each head keeps, then write the kept entries into the first blocks
        blocks = (keep + S - 1) // S  # (B, H_kv)
        j = torch.arange(self.block_tables.shape[-1], device=index.device)
        spare = j >= blocks[..., None]
        self.pool.free(self.block_tables[spare & (self.block_tables >= 0)])
        self.block_tables = self.block_tables.masked_fill(spare, -1)[..., : max(int(blocks.max()), 0)].contiguous()
        self.lengths = keep
        dst = self._flat(rank.expand_as(slots))  # (B, H_kv, n): slot j of each head
        self.pool.write(dst[kept], k[kept], v[kept], cols[kept])
        self.window, self.window_len = None, 0  # statistics are no longer aligned with the slots
        self.compacted = True
        index = self.index
        self.shared_heads = bool((index == index[:, :1]).all())

    def occupied(self) -> torch.Tensor:
        return (self.index >= 0).sum(-1)

    # ------------------------------------------------------------------------------------------------ cache API

    def tensors(self):
        """The layer's own metadata; its share of the pool is counted by ``measured_bytes``."""
        return [t for t in (self.block_tables, self.lengths, self.real_seen, self.scores, self.window)
                if t is not None]

    def measured_bytes(self, ratio: float = 1.0) -> float:
        """Blocks in use x block bytes + block tables, lengths and statistics (not the pool's free capacity); bytes in
        the cache's float dtype x ``ratio`` (the reference dtype's view, :func:`kvlab.budget.kv_bytes`)."""
        return (self.blocks_in_use() * self.pool.block_bytes * ratio
                + storage_bytes(self.tensors(), self.dtype, ratio))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Rows ``indices`` (repeats allowed): each selected row gets its own copy of its blocks."""
        if self.block_tables is None:
            return
        indices = indices.to(self.block_tables.device)
        tables = self.block_tables[indices]  # (B', H_kv, M)
        used = tables >= 0
        new_ids = self.pool.allocate(int(used.sum()))
        self.pool.copy_blocks(tables[used].long(), new_ids)
        self.pool.free(self.block_tables[self.block_tables >= 0])
        fresh = torch.full_like(tables, -1)
        fresh[used] = new_ids.to(fresh.dtype)
        self.block_tables = fresh
        for name in ("lengths", "real_seen", "window", "scores"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices].contiguous())
        self.batch_size = len(indices)


def window_probs(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Attention probabilities of the window queries, float32: query (B, H, w, D), keys (B, H_kv, C, D), mask
    (B, 1 or H_kv, w, C) -> (B, H_kv, G, w, C) (query head j = kv head j // G); rows with no visible key are zero."""
    batch, heads, n_query, dim = query.shape
    n_kv = keys.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    q = query.float().reshape(batch, n_kv, heads // n_kv, n_query, dim)  # (B, H_kv, G, w, D)
    scores = (q @ keys.float().unsqueeze(2).transpose(-1, -2)) * scale  # (B, H_kv, G, w, C)
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num_(0.0)


class PagedCache(KVLabCache):
    """A kvlab cache of :class:`PagedLayer` s sharing one :class:`BlockPool` (``cache.pool``)."""

    def __init__(self, layers: list[PagedLayer], pool: BlockPool):
        super().__init__(layers)
        if any(layer.pool is not pool for layer in layers):
            raise ValueError("every layer of a PagedCache must use the cache's pool")
        self.pool = pool

    def pool_bytes(self) -> dict:
        """Physical reservation (``capacity_bytes``) beside the bytes of the blocks in use."""
        return self.pool.stats()
