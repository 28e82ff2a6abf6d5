"""Methods registry: one dataclass per method; ``get(name, **options)`` builds one by name."""

from __future__ import annotations

import dataclasses

from .attention_gate import AttentionGate
from .compose import KVCARReuse
from .composed import Composed
from .cross_layer import CrossLayer
from .shared_basis import SharedBasis
from .base import Full, Method, NoCompression
from .matryoshka import MatryoshkaKV
from .pca import PCA
from .kvcar import KVCAR
from .kvcompress import KVCompress
from .reuse import Reuse
from .token_methods import H2O, SnapKV, Streaming

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoCompression, Full, PCA, MatryoshkaKV, KVCAR, Reuse, KVCARReuse, Streaming, H2O, SnapKV,
                              KVCompress, AttentionGate, Composed, CrossLayer, SharedBasis)
}


def get(name: str, budget: float | None = None, **options) -> Method:
    """Build method ``name`` with a budget and options; clear errors for unknown names or options."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    allowed = {f.name for f in dataclasses.fields(cls) if f.init and f.repr} - {"budget"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for method {name!r}; allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    if budget is not None:
        options["budget"] = budget
    return cls(**options)


__all__ = ["Method", "NoCompression", "Full", "PCA", "MatryoshkaKV", "KVCAR", "Reuse", "KVCARReuse", "Streaming", "H2O",
           "SnapKV", "KVCompress", "AttentionGate", "Composed", "CrossLayer", "SharedBasis", "REGISTRY", "get"]
