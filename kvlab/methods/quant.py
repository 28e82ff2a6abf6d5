"""``quant``: the KV cache quantized to 2, 4 or 8 bits, keys per channel and values per token (KIVI).

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache": keys have outlier *channels*, so
each channel of a block of ``group_size`` tokens shares a scale and zero point; values have no such structure and
the attention output mixes values token by token, so each token's groups of ``group_size`` channels share one. The
``residual`` most recent tokens (up to ``residual + group_size - 1``: keys are quantized in whole blocks) stay at
full precision. Storage and reads: :class:`~kvlab.cache.quantized.QuantLayer` (codes packed 8 / bits per byte,
float16 scales and zero points, all counted in measured bytes).

Bytes per cached number, long contexts (tail excluded): bits / 8 for the code + 4 / group_size for the two float16
parameters of its group, i.e. ``bits / 16 + 2 / group_size`` of a bf16 cache (the ``budget`` this method reports as
its nominal one: 0.1875 at 2 bits and groups of 32, 0.156 with groups of 64; 2-bit codes alone are 1/8 of bf16, so
with its scales counted a 2-bit cache is always above 1/8). Protocols: both (the cache is written as the model
reads, as in the paper).

    q = kvlab.methods.get("quant", bits=2, group_size=32, residual=32)
    with q.apply(model) as cache:
        model.generate(ids, past_key_values=cache, max_new_tokens=32)
    cache.kv_bytes().budget      # measured, bf16 view

Bad options (bits not in {2, 4, 8}, group_size < 1 or not dividing head_dim, residual < 0) raise ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..models import ModelSpec
from ..cache.quantize import BITS, check_options
from . import options as _options
from .base import Method
from ..cache.quantized import QuantLayer


def nominal_budget(bits: int, group_size: int) -> float:
    """Long-context bytes over a bf16 cache's: code bits / 16 + two float16 parameters per group."""
    return bits / 16 + 2 / group_size


@dataclass
class Quant(Method):
    """Keys per channel, values per token, ``bits`` in {2, 4, 8}, ``group_size`` (tokens per key block and channels
    per value group; must divide head_dim), ``residual`` recent tokens at full precision. ``bits=None`` picks the
    most bits whose nominal budget (:func:`nominal_budget`) fits ``budget``."""

    name: ClassVar[str] = "quant"
    axes: ClassVar[tuple[str, ...]] = ("precision",)
    protocols: ClassVar[tuple[str, ...]] = ("throughout", "context")

    budget: float | None = None
    bits: int | None = None
    group_size: int = 32
    residual: int = 32

    def __post_init__(self):
        _options.check(self)  # types and ranges first: the budget is compared below, before the base class runs
        check_options(2 if self.bits is None else self.bits, self.group_size, self.residual)
        if self.bits is None:
            if self.budget is None:
                self.bits = 2
            else:
                fits = [b for b in BITS if nominal_budget(b, self.group_size) <= float(self.budget) + 1e-12]
                if not fits:
                    raise ValueError(f"budget {self.budget} is below the smallest quantized cache with group_size "
                                     f"{self.group_size}: 2 bits take {nominal_budget(2, self.group_size):.4f} of a "
                                     "bf16 cache (codes + float16 scales and zero points); give a larger budget, a "
                                     "larger group_size, or compose with another axis (`composed`)")
                self.bits = max(fits)
        self.budget = min(1.0, nominal_budget(self.bits, self.group_size))
        super().__post_init__()

    def check(self, spec: ModelSpec) -> None:
        check_options(self.bits, self.group_size, self.residual, spec.head_dim)

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> QuantLayer:
        self.check(spec)
        return QuantLayer(layer_idx, self.bits, self.group_size, self.residual)
