"""KV caches that really store what a method keeps: transformers ``Cache`` / ``CacheLayerMixin`` subclasses.

Every kvlab cache layer does two jobs: ``update`` stores new key/value states in whatever form its method keeps them
(and hands itself to :mod:`kvlab.attention`), and ``attend`` computes attention for the current queries from what is
stored. ``FullLayer`` keeps everything (the 100 % budget reference); methods subclass it or ``KVLayer``.

Bytes: ``tensors()`` lists what a layer holds, so measured bytes are the storage really allocated; ``accounting()``
states per (head, K/V) what a full cache would hold, what the method needs in theory, and where it is saved.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import attention


class KVLayer(CacheLayerMixin):
    """Base of kvlab cache layers. Subclasses implement ``_store``, ``attend``, ``tensors`` and ``accounting``."""

    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.seen = 0  # tokens that went through update (what a full cache would hold)
        self.batch_size = 0
        self.n_heads = 0
        self.head_dim = 0
        self.value_dim = 0
        self.sliding_window: int | None = None  # the model's sliding window of this layer (kvlab attention sets it)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.n_heads, _, self.head_dim = key_states.shape
        self.value_dim = value_states.shape[-1]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, H_kv, T, D) entries; return K/V usable by plain attention (for non-kvlab readers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._store(key_states, value_states)
        self.seen += key_states.shape[-2]
        attention.hand_over(self.layer_idx, self)
        return keys, values

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, query, key, value, mask, *, scaling, **kwargs) -> torch.Tensor:
        """Attention output (B, Q, H, Dv) for ``query`` (B, H, Q, D) over what this layer stores."""
        raise NotImplementedError

    def tensors(self) -> Iterable[torch.Tensor]:
        raise NotImplementedError

    def accounting(self) -> list[dict]:
        """Rows per (head, part): full and theoretical bytes, tokens and features kept."""
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def reference_tokens(self) -> int:
        """Tokens per sequence a cache of this layer *needs*: every token seen, except on a sliding-window layer,
        which only ever reads its last ``sliding_window - 1`` tokens (plus the new one); Hugging Face's
        ``DynamicCache`` keeps exactly those. ``kv_bytes`` reports this window-bounded ``reference`` beside ``full``
        (every token seen, the denominator of ``budget``)."""
        return min(self.seen, self.sliding_window - 1) if self.sliding_window else self.seen

    def full_bytes_per_head(self, part: str) -> int:
        dim = self.head_dim if part == "K" else self.value_dim
        return self.batch_size * self.seen * dim * self.element_size

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size() if self.is_initialized else 0

    def reset(self) -> None:
        self.__init__(self.layer_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` of the batch (repeats allowed: one prefilled context -> several continuations)."""
        raise NotImplementedError

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


class FullLayer(KVLayer):
    """Keeps every key and value, uncompressed: the 100 % budget reference that must equal the plain model.

    Multi-token writes (prefill, continuations) allocate exactly; when decoding overflows, storage grows by a
    sixteenth of its length (at least ``min_grow`` tokens), so decoding appends instead of re-concatenating the whole
    cache at every token as ``DynamicCache`` does, and the slack stays within ~6 %.
    """

    def __init__(self, layer_idx: int, min_grow: int = 32):
        super().__init__(layer_idx)
        self.min_grow = min_grow
        self.length = 0
        self.keys = self.values = None  # (B, H_kv, capacity, D)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.min_grow)

    def _store(self, key_states, value_states):
        new = key_states.shape[-2]
        needed = self.length + new
        if self.keys is None or needed > self.keys.shape[-2]:
            decoding = self.keys is not None and new == 1  # slack only for token-by-token decoding
            capacity = needed + max(self.min_grow, needed // 16) if decoding else needed
            self.keys = grow_tokens(self.keys, self.length, capacity, key_states)
            self.values = grow_tokens(self.values, self.length, capacity, value_states)
        self.keys[:, :, self.length : needed] = key_states
        self.values[:, :, self.length : needed] = value_states
        self.length = needed
        return self.keys[:, :, :needed], self.values[:, :, :needed]

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        return attention.sdpa(query, key, value, mask, scaling)

    def get_seq_length(self) -> int:
        return self.length

    def tensors(self):
        return [t for t in (self.keys, self.values) if t is not None]

    def accounting(self):
        rows = []
        for part, dim in (("K", self.head_dim), ("V", self.value_dim)):
            for head in range(self.n_heads):
                rows.append(
                    dict(head=head, part=part, full=self.full_bytes_per_head(part),
                         theoretical=self.batch_size * self.length * dim * self.element_size,
                         tokens_seen=self.seen, tokens_kept=self.length, dims_full=dim, dims_kept=dim)
                )
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys[indices, :, : self.length].contiguous()
            self.values = self.values[indices, :, : self.length].contiguous()
            self.batch_size = self.keys.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        self.seen = max(0, self.seen + tokens_to_remove)


def grow_tokens(old: torch.Tensor | None, length: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    """A new (B, H_kv, capacity, D) buffer like ``like`` holding the first ``length`` tokens of ``old`` (None: empty)."""
    batch, heads, _, dim = like.shape
    new = like.new_empty(batch, heads, capacity, dim)  # (B, H_kv, capacity, D)
    if old is not None and length:
        new[:, :, :length] = old[:, :, :length]
    return new


class KVLabCache(Cache):
    """A cache of kvlab layers, one per model layer; pass it as ``past_key_values`` (also to ``generate``).

    Needs the model to run kvlab attention (``kvlab.attach(model)`` or ``method.apply(model)``).
    """

    def __init__(self, layers: list[KVLayer]):
        if not layers:
            raise ValueError("KVLabCache needs one layer per model layer, got none")
        super().__init__(layers=layers)

    @property
    def batch_size(self) -> int:
        sizes = {layer.batch_size for layer in self.layers if layer.is_initialized}
        if len(sizes) > 1:
            raise ValueError(f"layers disagree on batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else -1

    def kv_bytes(self, dtype: str | torch.dtype = "bf16"):
        """Measured, theoretical and full-cache bytes, floating bytes in the reference ``dtype`` ("bf16", "fp16",
        "fp32" or "native"; see :mod:`kvlab.budget`)."""
        from ..budget import kv_bytes

        return kv_bytes(self, dtype)
