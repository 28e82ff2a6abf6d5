"""Bytes accounting: what a cache really allocates beside what its method needs in theory and what a full cache holds.

* ``full``: bytes an uncompressed cache would hold for the same tokens (B x H_kv x tokens x head_dim x 2 x dtype).
* ``theoretical``: bytes of the entries the method keeps, counted exactly (no allocator slack, no padding).
* ``reference``: bytes a full cache *needs* for the same tokens: as ``full``, except that a sliding-window layer
  (Gemma3's local layers) counts only the last ``window - 1`` tokens it can still read, as Hugging Face's
  ``DynamicCache`` keeps. Equal to ``full`` on models without sliding windows. kvlab's layers keep the tokens a window
  has left (the mask hides them), so on such models ``measured / reference`` is the honest fraction of what a
  plain cache needs and can exceed ``measured / full``.
* ``measured``: the storage of the tensors the cache holds (each storage counted once), i.e. real memory; a layer
  that defines ``measured_bytes()`` (a paged layer: its blocks in use in a shared pool) reports it itself.

The budget of a method is ``measured / full``; rows per (layer, head, K/V) carry the tokens and features kept, so the
saving can be read per axis (token axis: tokens_kept / tokens_seen; feature axis: dims_kept / dims_full).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch


@dataclass(frozen=True)
class KVBytes:
    full: int
    theoretical: int
    measured: int
    table: pd.DataFrame  # one row per (layer, head, part)
    reference: int | None = None  # window-bounded full (sliding-window layers: their last window - 1 tokens)

    @property
    def budget_vs_reference(self) -> float:
        """Measured bytes as a fraction of what a full cache needs (sliding-window layers bounded by their window)."""
        return self.measured / self.reference if self.reference else float("nan")

    @property
    def budget(self) -> float:
        """Measured bytes as a fraction of the full cache's bytes."""
        return self.measured / self.full if self.full else float("nan")

    @property
    def theoretical_budget(self) -> float:
        return self.theoretical / self.full if self.full else float("nan")

    def as_dict(self) -> dict:
        return {"full": self.full, "theoretical": self.theoretical, "measured": self.measured}

    def by(self, *keys: str) -> pd.DataFrame:
        """Sum of the byte columns grouped by e.g. "layer", "head", "part"."""
        return self.table.groupby(list(keys))[["full", "theoretical", "measured"]].sum()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _plain_layer_rows(layer) -> tuple[list[dict], list[torch.Tensor]]:
    """Rows for a transformers layer (e.g. DynamicLayer): everything it holds is kept."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or keys.numel() == 0:
        return [], []
    batch, heads, tokens, _ = keys.shape
    rows = []
    for part, t in (("K", keys), ("V", values)):
        size = batch * tokens * t.shape[-1] * t.element_size()
        rows += [dict(head=h, part=part, full=size, theoretical=size, tokens_seen=tokens, tokens_kept=tokens,
                      dims_full=t.shape[-1], dims_kept=t.shape[-1]) for h in range(heads)]
    return rows, [keys, values]


def kv_bytes(cache) -> KVBytes:
    """Account the bytes of a kvlab cache (or a transformers DynamicCache) after a forward pass."""
    from .cache import KVLayer

    frames = []
    for layer_idx, layer in enumerate(cache.layers):
        if isinstance(layer, KVLayer):
            rows, tensors = (layer.accounting(), list(layer.tensors())) if layer.is_initialized else ([], [])
        else:
            rows, tensors = _plain_layer_rows(layer)
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        frame.insert(0, "layer", layer_idx)
        seen, needed = getattr(layer, "seen", 0), getattr(layer, "reference_tokens", None)
        frame["reference"] = frame["full"] * (needed / seen) if needed is not None and seen else frame["full"]
        # A layer that shares storage with others (a paged layer's blocks in a pool) states its own share.
        own = getattr(layer, "measured_bytes", None)
        measured = own() if callable(own) else storage_bytes(tensors)
        # A layer's storage is attributed to its rows in proportion to their theoretical bytes.
        weights = frame["theoretical"] / frame["theoretical"].sum() if frame["theoretical"].sum() else 1 / len(frame)
        frame["measured"] = weights * measured
        frames.append(frame)
    if not frames:
        raise ValueError("the cache holds nothing yet: run a forward pass with it first")
    table = pd.concat(frames, ignore_index=True)
    return KVBytes(
        full=int(table["full"].sum()),
        theoretical=int(table["theoretical"].sum()),
        measured=int(round(table["measured"].sum())),
        table=table,
        reference=int(round(table["reference"].sum())),
    )
