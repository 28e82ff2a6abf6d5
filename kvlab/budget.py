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

Reference dtype (``kv_bytes(cache, dtype=...)``, default ``"bf16"``): bytes are reported as if the cache's floating
tensors were held in the dtype people deploy. Every tensor stored in the cache's own float dtype (the model's: fp32
for kvlab's bundled model) is counted at the reference dtype's size; everything else counts as stored: integer
tensors (packed quantized codes, token indices, block tables) and tensors with a fixed dtype (float16 scales and zero
points of a quantized cache, float32 statistics in a bf16 cache). ``"fp32"`` gives the fp32 view (what kvlab reported
before the precision axis, for an fp32 model), ``"native"`` the bytes the tensors really hold. A full cache's budget
is the same in every view; a method whose storage mixes integers and floats (a quantized cache, the int16 index of an
eviction cache) has a different budget in each, so every table says which view it used. Rows may carry ``fixed``:
the part of their theoretical bytes not in the cache's float dtype (0 when absent).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch


REFERENCE_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                    "fp32": torch.float32, "native": None}
DEFAULT_DTYPE = "bf16"


def reference_dtype(dtype) -> tuple[str, torch.dtype | None]:
    """(label, torch dtype or None for native) from a label or a torch floating dtype."""
    if isinstance(dtype, torch.dtype):
        for label, d in REFERENCE_DTYPES.items():
            if d == dtype:
                return label, d
    elif dtype in REFERENCE_DTYPES:
        return dtype, REFERENCE_DTYPES[dtype]
    raise ValueError(f"reference dtype must be one of {', '.join(REFERENCE_DTYPES)} (or torch.bfloat16 / float16 / "
                     f"float32), got {dtype!r}")


@dataclass(frozen=True)
class KVBytes:
    full: int
    theoretical: int
    measured: int
    table: pd.DataFrame  # one row per (layer, head, part)
    dtype: str = DEFAULT_DTYPE  # the reference dtype of the floating bytes (see the module docstring)
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
        return {"full": self.full, "theoretical": self.theoretical, "measured": self.measured, "dtype": self.dtype}

    def by(self, *keys: str) -> pd.DataFrame:
        """Sum of the byte columns grouped by e.g. "layer", "head", "part"."""
        return self.table.groupby(list(keys))[["full", "theoretical", "measured"]].sum()


def storage_bytes(tensors, native: torch.dtype | None = None, ratio: float = 1.0) -> float:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once); storages of tensors in
    the ``native`` dtype are counted x ``ratio`` (reference dtype size / native size), the others as stored."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes() * (ratio if native is not None and t.dtype == native else 1)
    return total if ratio != 1.0 else int(total)


def _ratio(native: torch.dtype | None, reference: torch.dtype | None) -> float:
    if native is None or reference is None:
        return 1.0
    return torch.empty((), dtype=reference).element_size() / torch.empty((), dtype=native).element_size()


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


def kv_bytes(cache, dtype=DEFAULT_DTYPE) -> KVBytes:
    """Account the bytes of a kvlab cache (or a transformers DynamicCache) after a forward pass, with floating bytes
    counted in the reference ``dtype`` ("bf16" default, "fp16", "fp32", or "native"; see the module docstring)."""
    from .cache.base import KVLayer

    label, reference = reference_dtype(dtype)
    frames = []
    for layer_idx, layer in enumerate(cache.layers):
        if isinstance(layer, KVLayer):
            rows, tensors = (layer.accounting(), list(layer.tensors())) if layer.is_initialized else ([], [])
            native = layer.dtype if layer.is_initialized else None
        else:
            rows, tensors = _plain_layer_rows(layer)
            native = tensors[0].dtype if tensors else None
        if not rows:
            continue
        ratio = _ratio(native, reference)
        frame = pd.DataFrame(rows)
        frame.insert(0, "layer", layer_idx)
        fixed = frame["fixed"].fillna(0) if "fixed" in frame else 0  # rows without integer storage have none
        frame["full"] = frame["full"] * ratio
        frame["theoretical"] = (frame["theoretical"] - fixed) * ratio + fixed
        seen, needed = getattr(layer, "seen", 0), getattr(layer, "reference_tokens", None)
        frame["reference"] = frame["full"] * (needed / seen) if needed is not None and seen else frame["full"]
        # A layer that shares storage with others (a paged layer's blocks in a pool) states its own share.
        own = getattr(layer, "measured_bytes", None)
        measured = own(ratio) if callable(own) else storage_bytes(tensors, native, ratio)
        # A layer's storage is attributed to its rows in proportion to their theoretical bytes.
        weights = frame["theoretical"] / frame["theoretical"].sum() if frame["theoretical"].sum() else 1 / len(frame)
        frame["measured"] = weights * measured
        frames.append(frame)
    if not frames:
        raise ValueError("the cache holds nothing yet: run a forward pass with it first")
    table = pd.concat(frames, ignore_index=True)
    return KVBytes(
        full=int(round(table["full"].sum())),
        theoretical=int(round(table["theoretical"].sum())),
        measured=int(round(table["measured"].sum())),
        table=table,
        dtype=label,
        reference=int(round(table["reference"].sum())),
    )
