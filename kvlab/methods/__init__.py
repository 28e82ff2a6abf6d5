"""Methods registry: one dataclass per method; ``get(name, **options)`` builds one by name."""

from __future__ import annotations

import difflib

from .attention_gate import AttentionGate
from .kvcar_reuse import KVCARReuse
from .feature_x_token import Composed
from .cross_layer import CrossLayer
from .shared_basis import SharedBasis
from .base import Full, Method, NoCompression
from . import options as _options
from .matryoshka import MatryoshkaKV
from .pca import PCA
from .kvcar import KVCAR
from .kvcompress import KVCompress
from .quant import Quant
from .reuse import Reuse
from .token import H2O, SnapKV, Streaming

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoCompression, Full, PCA, MatryoshkaKV, KVCAR, Reuse, KVCARReuse, Streaming, H2O, SnapKV,
                              KVCompress, AttentionGate, Composed, Quant, CrossLayer, SharedBasis)
}


def get(name: str, budget: float | None = None, **options) -> Method:
    """Build method ``name`` with a budget and options; clear errors for unknown names or options."""
    if not isinstance(name, str) or name not in REGISTRY:
        close = difflib.get_close_matches(str(name), REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    _options.unknown(cls, options)
    if budget is not None:
        options["budget"] = budget
    return cls(**options)


__all__ = ["Method", "NoCompression", "Full", "PCA", "MatryoshkaKV", "KVCAR", "Reuse", "KVCARReuse", "Streaming", "H2O",
           "SnapKV", "KVCompress", "AttentionGate", "Composed", "Quant", "CrossLayer", "SharedBasis", "REGISTRY", "get"]
