"""Analyses of what the KV cache holds: head-wise spectra (feature axis); more to come (cross-layer similarity,
attention-score bias).

    from kvlab.analysis import head_spectra
    spec = head_spectra(model, calib_ids, batch_size=8)       # keys (post-RoPE), keys_pre, values
    spec.rank_for_energy("keys", 0.9)                          # (layers, kv heads) ranks
"""

from .spectra import (PARTS, Moments, Spectra, accumulate_moments, combine, head_spectra, merge,
                      moment_update, received_attention)

__all__ = ["PARTS", "Moments", "Spectra", "accumulate_moments", "combine", "head_spectra", "merge", "moment_update",
           "received_attention"]
