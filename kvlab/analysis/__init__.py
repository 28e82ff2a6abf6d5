"""Analyses of what the KV cache holds: head-wise spectra (feature axis), cross-layer similarity (layer axis),
attention-score bias of token-eviction importance scores (token axis).

    from kvlab.analysis import head_spectra, layer_similarity
    spec = head_spectra(model, calib_ids, batch_size=8)       # keys (post-RoPE), keys_pre, values
    spec.rank_for_energy("keys", 0.9)                          # (layers, kv heads) ranks
    sim = layer_similarity(model, calib_ids, skip_first=4)     # cosine / linear CKA between layers, per kv head
    sim.adjacent("keys", "cka")                                # (layers - 1, kv heads)
    res = attention_bias(model, ids, context_len=1792, n_future=256)   # accumulated / normalized / oracle importance
    res.summary()
"""

from .bias import BiasResult, ImportanceSums, attention_bias, bias_frames, importance_from_probs
from .similarity import LayerSimilarity, SimilarityStats, aligned_cosine, layer_similarity, linear_cka
from .spectra import (PARTS, Moments, Spectra, accumulate_moments, combine, head_spectra, merge,
                      moment_update, received_attention)

__all__ = ["PARTS", "Moments", "Spectra", "accumulate_moments", "combine", "head_spectra", "merge", "moment_update",
           "received_attention", "LayerSimilarity", "SimilarityStats", "aligned_cosine", "layer_similarity",
           "linear_cka", "BiasResult", "ImportanceSums", "attention_bias", "bias_frames", "importance_from_probs"]
