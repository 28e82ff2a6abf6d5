"""KV cache storage: a transformers ``Cache`` whose layers really hold what a method keeps, one module per layout.

    base.py       KVLabCache, KVLayer (update / attend / tensors / accounting), FullLayer (everything, the reference)
    coded.py      CodedLayer: entries stored as codes, decoded on read (feature axis; sinks kept full size)
    projected.py  ProjectedLayer: codes on an orthonormal basis per (layer, kv head), pre- or post-RoPE keys
    eviction.py   EvictionLayer: a kept subset of tokens per (row, kv head), ragged (token axis)
    paged.py      PagedLayer over one block pool: evicted blocks return to the pool (KV-Compress)
    quantize.py   integer codes with real bit packing, per channel / per token groups (precision axis)
    quantized.py  QuantLayer: KIVI-quantized entries beside a full-precision recent window

Methods (:mod:`kvlab.methods`) decide what to keep; these layers store it and count its bytes.
"""

from .base import FullLayer, KVLabCache, KVLayer, grow_tokens

__all__ = ["FullLayer", "KVLabCache", "KVLayer", "grow_tokens"]
