"""Training-free token eviction: StreamingLLM, H2O and SnapKV, one dataclass each on the shared
:class:`~kvlab.cache.eviction.EvictionLayer`.

``budget`` is the fraction of the tokens (hence of the bytes) kept per (row, kv head): after ``compress`` a row
that has seen ``n`` real tokens keeps ``max(1, round_half_up(budget * n))`` of them in every kv head of every layer
(padding is never counted nor kept). Protocol: "compress the context, then continue" only (``protocols``); the
cache refuses a second forward before ``compress`` and refuses to account bytes before it, so the "throughout"
protocol fails loudly instead of silently running the full cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..models import ModelSpec
from .base import Method
from ..cache.eviction import TIER, EvictionLayer, ranks_by_column

POOLINGS = ("max", "avg")


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class TokenEviction(Method):
    """Shared base: builds eviction layers, computes keep counts from the budget, compresses every layer."""

    axes: ClassVar[tuple[str, ...]] = ("token",)
    protocols: ClassVar[tuple[str, ...]] = ("context",)
    decode: ClassVar[bool] = False  # evict again after every forward that follows compress

    budget: float = 0.5

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> EvictionLayer:
        return EvictionLayer(layer_idx, self)

    def records(self, compressed: bool) -> str | None:
        return None

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        raise NotImplementedError

    def keep_counts(self, layer: EvictionLayer) -> torch.Tensor:
        """(B, H_kv): round_half_up(budget x real tokens seen), at least 1, at most what the slots hold."""
        n = torch.floor(float(self.budget) * layer.real_seen.double() + 0.5).long().clamp(min=1)  # (B,)
        return torch.minimum(n[:, None].expand(-1, layer.n_heads), layer.occupied())

    def compress(self, cache, *, attention_mask: torch.Tensor | None = None, **context) -> None:
        """Evict every layer of ``cache`` (filled by a prefill through this method) down to the budget.

        ``attention_mask`` (B, tokens seen), if given, is checked against what the cache saw; ``model``,
        ``position_ids`` and ``setting`` (query-aware or agnostic) are accepted and not needed.
        """
        for layer in self._check_cache(cache, attention_mask):
            layer.compress()

    def _check_cache(self, cache, attention_mask: torch.Tensor | None, kind: type = EvictionLayer) -> list:
        """The layers of ``cache`` if it was built and filled by this method (and matches ``attention_mask``)."""
        layers = list(getattr(cache, "layers", []))
        if not layers or not all(isinstance(layer, kind) for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers}) or ["none"]
            raise ValueError(f"{self.name}.compress needs a cache from {self.name}.new_cache/apply (eviction layers), "
                             f"got layers {kinds}")
        for layer in layers:
            if layer.policy != self:
                raise ValueError(f"layer {layer.layer_idx} was built by {layer.policy!r}, not by {self!r}: compress a "
                                 "cache with the method that created it")
            if not layer.forwards:
                raise RuntimeError(f"{self.name}.compress: the cache is empty; run the prefill through it first")
        if attention_mask is not None:
            first = layers[0]
            if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (first.batch_size, first.seen):
                raise ValueError(f"attention_mask must be (batch, tokens seen) = ({first.batch_size}, {first.seen}), "
                                 f"got {tuple(attention_mask.shape)}")
            real = attention_mask.to(first.real_seen.device).long().sum(-1)
            if not torch.equal(real, first.real_seen):
                raise ValueError(f"attention_mask counts {real.tolist()} real tokens per row but the cache saw "
                                 f"{first.real_seen.tolist()}")
        return layers


@dataclass
class Streaming(TokenEviction):
    """``streaming``: StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

    Keeps the first ``sinks`` real tokens of each row (the attention sinks) and the most recent ones, the same
    positions in every kv head and layer: (B, H_kv, round(budget x n), D) after ``compress``. With ``decode=True``
    the window rolls: after every later forward the oldest non-sink tokens are evicted back to the budget.
    """

    name: ClassVar[str] = "streaming"

    budget: float = 0.5
    sinks: int = 4
    decode: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_int("sinks", self.sinks, 0)

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        cols = layer.index.long().double()  # (B, H_kv, C)
        first = ranks_by_column(layer.index) < self.sinks
        return torch.where(first, 2 * TIER - cols, TIER + cols)  # sinks (earliest first), then the most recent


@dataclass
class H2O(TokenEviction):
    """``h2o``: Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
    of Large Language Models").

    Score of a kept token: the attention it received, summed over every query so far and over the query heads of
    its GQA group (accumulated in ``attend`` by a plain softmax path, (B, H_kv, C) float32). Keeps per (row, kv head)
    the ``round(recent_frac x keep)`` most recent tokens plus the highest-scoring others (the heavy hitters), so
    heads keep different tokens. ``decode=True`` (the paper's generation setting): scores keep accumulating after
    ``compress`` and every later forward evicts the lowest-scoring non-recent tokens back to the budget; the score
    buffer then stays allocated (4 bytes per kept entry, counted in measured bytes).
    """

    name: ClassVar[str] = "h2o"

    budget: float = 0.5
    recent_frac: float = 0.5
    decode: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.recent_frac, bool) or not 0.0 <= float(self.recent_frac) <= 1.0:
            raise ValueError(f"recent_frac must be in [0, 1] (share of the kept tokens that are the most recent), "
                             f"got {self.recent_frac!r}")

    def records(self, compressed: bool) -> str | None:
        return "accumulated" if (not compressed or self.decode) else None

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        if layer.scores is None:
            raise RuntimeError("h2o has no accumulated attention for this layer: compress right after a forward "
                               "through the cache")
        keep = self.keep_counts(layer)  # (B, H_kv)
        n_recent = torch.floor(float(self.recent_frac) * keep.double() + 0.5).long()
        recent = ranks_by_column(layer.index, descending=True) < n_recent[..., None]  # (B, H_kv, C)
        return torch.where(recent, TIER + layer.index.long().double(), layer.scores.double())


@dataclass
class SnapKV(TokenEviction):
    """``snapkv``: SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

    At ``compress``: the attention from the last ``window`` queries of the prompt (the observation window; the last
    forward before compress) to every earlier key, summed over those queries, pooled along positions
    (``pooling="max"`` or ``"avg"``, odd ``kernel``, stride 1, same length) per query head, then summed over the
    query heads of each GQA group: (B, H_kv, C). Keeps the observation window's own tokens plus the top-scoring
    earlier ones per (row, kv head); if the budget is smaller than the window, the most recent window tokens.
    Max pooling makes plateaus of equal scores: ties go to the higher unpooled score, then to the later position.
    Decoding afterwards is not compressed further (as in the paper).
    """

    name: ClassVar[str] = "snapkv"

    budget: float = 0.5
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self):
        super().__post_init__()
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (pooling keeps the length), got {self.kernel}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    def records(self, compressed: bool) -> str | None:
        return None if compressed else "window"

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        if layer.window is None:
            raise RuntimeError("snapkv has no observation-window attention for this layer: compress right after a "
                               "forward through the cache")
        batch, heads, group, slots = layer.window.shape
        occupied = layer.index >= 0  # (B, H_kv, C)
        in_window = torch.zeros_like(occupied)
        in_window[..., slots - layer.window_len:] = True
        in_window &= occupied
        earlier = occupied & ~in_window
        fill = float("-inf") if self.pooling == "max" else 0.0
        x = layer.window.masked_fill(~earlier[:, :, None], fill).reshape(batch * heads * group, 1, slots)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(x, self.kernel, stride=1, padding=self.kernel // 2).reshape(batch, heads, group, slots)
        score = pooled.sum(2).double()  # (B, H_kv, C)
        cols = layer.index.long().double()
        primary = torch.where(in_window, TIER + cols, score.masked_fill(~earlier, float("-inf")))
        return primary, layer.window.sum(2)  # ties of the pooled score (plateaus of a max) go to the higher raw score
