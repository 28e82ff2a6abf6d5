"""``kvcompress``: KV-Compress (Rehg 2024, "KV-Compress: Paged KV-Cache Compression with Variable Compression Rates
per Attention Head", arXiv:2410.00161), the reference PyTorch implementation on :mod:`kvlab.cache.paged`.

What the paper does, in this package's terms (protocol "compress the context, then continue"):

1. Prefill into a paged cache (:class:`~kvlab.cache.paged.PagedLayer`: blocks of ``block_size`` tokens of one (layer, kv
   head), per-head block tables, one :class:`~kvlab.cache.paged.BlockPool` per cache).
2. Metric per cached token: the attention it receives from the last ``window`` queries of the prefill (the
   observation window), per query head: ``metric="l1"`` sums the probabilities over the window queries,
   ``"l2"`` takes the root of the sum of their squares (the paper's squared-attention metric; the default), ``"max"``
   the largest probability any window query gives it (issue 22: a token one question token points at is not
   outvoted by the many window queries that ignore it).
   Optional max pooling along positions (``kernel`` > 1, as SnapKV; 1 = none), centred on the token
   (``pool_align="center"``) or over it and the ``kernel - 1`` tokens before it (``"after"``, issue 22: a token
   is kept when a token shortly before it scores high, so the kept span runs *after* what the window attends to;
   a question attends to the needle's key, and the answer follows the key). Query-group compression: the metric
   of a kv head's token aggregates its GQA group's query heads (``group_agg="sum"`` or ``"max"``), so the cache of a
   kv head is compressed once, never repeated per query head.
   Shapes: window probabilities (B, H_kv, G, w, C) -> per query head (B, H_kv, G, C) -> per kv head (B, H_kv, C).
3. One global budget per sequence: ``round(budget x sum over (layer, kv head) of its real tokens)`` entries, chosen
   by one ranking over every (layer, kv head, token) of the row (attention probabilities sum to 1 per query, so they
   compare across heads and layers); heads therefore keep different numbers of tokens (variable compression rates).
   The paper evicts in block units; here the ranking is over units of ``block_size`` tokens: each (layer, head)'s
   tokens are sorted by metric, the protected ones (the first ``sinks`` real tokens and the observation window) plus
   the best others up to a multiple of the block size form its mandatory first unit, the rest is cut into blocks
   of ``block_size`` tokens valued by their mean metric, and the best units over the whole row are taken until the
   kept count is nearest the budget. Each head then keeps a multiple of ``block_size`` tokens (or all it has), at
   least its protected tokens; the total is within half a block of the budget (unless the protected tokens alone
   exceed it: protection shrinks to the per-head budget rounded down to blocks, at least one block, the window
   first). ``floor`` (issue 22, not the paper's) gives every (layer, head) a mandatory first unit of at least
   ``floor`` tokens (rounded up to blocks), filled by its own best tokens, so the global ranking cannot starve a
   head (e.g. a retrieval head whose scores are small next to layer 0's); a floor the budget cannot pay for is an
   error. Eviction compacts the kept tokens into the first blocks of each head and returns every other block to
   the pool's free list, so measured bytes follow the theoretical ones. ``scope="layer"`` (an option, not the
   paper's) plans each layer on its own: ``budget`` of its tokens, ranked across its heads. Under the model-wide
   ranking, SmolLM2's layer 0 (attention spread over many tokens, so many moderate scores) keeps nearly all of its
   tokens at 2x while later layers' heads keep a few hundred of 2,100.
4. Later forwards append to the blocks; decode steps read through the block tables with the paged decode kernel
   (:mod:`kvlab.kernels.paged_attention`). No further eviction during decoding (the paper's vLLM integration also
   compresses during decoding; the context protocol here compresses once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..cache import paged
from ..models import ModelSpec
from ..cache.eviction import TIER, ranks_by_column
from .token import TokenEviction, check_int

METRICS = ("l1", "l2", "max")
GROUP_AGGS = ("sum", "max")
SCOPES = ("model", "layer")
POOL_ALIGNS = ("center", "after")


@dataclass
class KVCompress(TokenEviction):
    """``kvcompress``: paged per-head variable-rate eviction with one global budget (see the module docstring).

    Options: ``budget`` (fraction of the cache's tokens, hence bytes, kept over all layers and heads), ``window``
    (observation window: the last queries of the prefill, also protected), ``metric`` ("l1", "l2"), ``group_agg``
    ("sum", "max" over the query heads of a GQA group), ``kernel`` (odd max-pooling width, 1 = none), ``sinks``
    (first real tokens protected), ``block_size`` (tokens per block), ``scope`` ("model": the paper's one ranking
    over every layer and head; "layer": each layer keeps ``budget`` of its own tokens, ranked across its heads),
    ``floor`` (tokens every (layer, kv head) keeps at least, rounded up to blocks; 0 = none, the paper),
    ``pool_align`` ("center": the pooling window centred on the token; "after": the token and the ones before it).

    Errors (``ValueError`` at ``compress``): an observation window longer than a row's context (the window would
    be the whole prompt: nothing is observed "from the end"), a floor above the per-head budget.
    """

    name: ClassVar[str] = "kvcompress"

    budget: float = 0.5
    window: int = 32
    metric: str = "l2"
    group_agg: str = "sum"
    kernel: int = 1
    sinks: int = 4
    block_size: int = 16
    scope: str = "model"
    floor: int = 0
    pool_align: str = "center"

    def __post_init__(self):
        super().__post_init__()
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1)
        check_int("sinks", self.sinks, 0)
        check_int("block_size", self.block_size, 1)
        check_int("floor", self.floor, 0)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (max pooling keeps the length), got {self.kernel}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.group_agg not in GROUP_AGGS:
            raise ValueError(f"group_agg must be one of {', '.join(GROUP_AGGS)}, got {self.group_agg!r}")
        if self.pool_align not in POOL_ALIGNS:
            raise ValueError(f"pool_align must be one of {', '.join(POOL_ALIGNS)}, got {self.pool_align!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    # ---------------------------------------------------------------------------------------------- cache

    def make_layer(self, layer_idx: int, spec: ModelSpec, pool: "paged.BlockPool | None" = None) -> "paged.PagedLayer":
        return paged.PagedLayer(layer_idx, self, pool if pool is not None else paged.BlockPool(self.block_size))

    def new_cache(self, model) -> "paged.PagedCache":
        spec = ModelSpec.from_model(model)
        pool = paged.BlockPool(self.block_size)
        return paged.PagedCache([self.make_layer(i, spec, pool) for i in range(spec.n_layers)], pool)

    # ---------------------------------------------------------------------------------------------- policy

    def records(self, compressed: bool) -> str | None:
        return None if compressed else "window"

    def window_stat(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, G, w, C) window probabilities -> (B, H_kv, G, C) per query head."""
        if self.metric == "max":
            return probs.amax(-2)
        return probs.sum(-2) if self.metric == "l1" else probs.square().sum(-2).sqrt()

    def keep_counts(self, layer) -> torch.Tensor:
        if not layer.compressed:
            raise RuntimeError("kvcompress chooses keep counts over the whole cache: call method.compress(cache)")
        return layer.occupied()  # nothing more to evict after compress

    def token_metric(self, layer) -> torch.Tensor:
        """(B, H_kv, C) float64 metric of the layer's slots before compress, -inf for empty slots (padding): the
        window statistics pooled (``kernel``) over the tokens before the observation window (those in it keep their
        own value), then aggregated over the query heads of each group (``group_agg``)."""
        if layer.window is None:
            raise RuntimeError("kvcompress has no observation-window attention for this layer: compress right after "
                               "the prefill through the cache")
        stat = layer.window  # (B, H_kv, G, C)
        index = layer.index  # (B, H_kv, C)
        occupied = index >= 0
        if self.kernel > 1:
            in_window = ranks_by_column(index, descending=True) < layer.window_len  # (B, H_kv, C)
            earlier = (occupied & ~in_window)[:, :, None]  # (B, H_kv, 1, C)
            batch, heads, group, slots = stat.shape
            x = stat.masked_fill(~earlier, float("-inf")).reshape(batch * heads * group, 1, slots)
            if self.pool_align == "after":  # window [i - kernel + 1, i]: the span after a hot token is kept
                x = F.pad(x, (self.kernel - 1, 0), value=float("-inf"))
                pooled = F.max_pool1d(x, self.kernel, stride=1).reshape(stat.shape)
            else:
                pooled = F.max_pool1d(x, self.kernel, stride=1, padding=self.kernel // 2).reshape(stat.shape)
            stat = torch.where(earlier, pooled, stat)
        score = (stat.sum(2) if self.group_agg == "sum" else stat.amax(2)).double()  # (B, H_kv, C)
        return score.masked_fill(~occupied, float("-inf"))

    def priority(self, layer) -> torch.Tensor:
        """Within one head: the first ``sinks`` tokens, then the observation window, then by ``token_metric``."""
        score = self.token_metric(layer)
        sink = ranks_by_column(layer.index) < self.sinks
        recent = ranks_by_column(layer.index, descending=True) < layer.window_len
        return torch.where(sink, 2 * TIER, torch.where(recent, TIER, score))

    # ---------------------------------------------------------------------------------------------- compress

    def compress(self, cache, *, attention_mask: torch.Tensor | None = None, **context) -> None:
        """Evict every layer of ``cache`` (filled by one prefill through this method) to one global budget.

        ``attention_mask`` (B, tokens seen), if given, is checked against what the cache saw; ``model``,
        ``position_ids`` and ``setting`` are accepted and not needed."""
        layers = self._check_cache(cache, attention_mask, kind=paged.PagedLayer)
        for layer in layers:
            if layer.compressed:
                raise RuntimeError(f"{self.name}.compress: the cache is already compressed (compress once, right "
                                   "after the prefill)")
        shortest = int(layers[0].real_seen.min())
        if self.window > shortest:
            raise ValueError(f"{self.name}: the observation window ({self.window} queries) is longer than the context "
                             f"({shortest} real tokens in the shortest row); allowed: window <= context length")
        plan = self.plan(layers)
        for layer, (keep, priority) in zip(layers, plan):
            layer.compress(keep, priority)

    def plan(self, layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: keep counts (B, H_kv) and the within-head priority (B, H_kv, C) (see the module docstring);
        with ``scope="layer"`` every layer is planned on its own, to ``budget`` of its tokens."""
        if self.scope == "layer":
            return [step for layer in layers for step in self._plan([layer])]
        return self._plan(layers)

    def _plan(self, layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
        S = self.block_size
        metrics = [self.token_metric(layer) for layer in layers]  # each (B, H_kv, C_l)
        width = max(m.shape[-1] for m in metrics)
        metric = torch.stack([F.pad(m, (0, width - m.shape[-1]), value=float("-inf")) for m in metrics], 1)
        batch, n_layers, heads, _ = metric.shape  # (B, L, H_kv, C)
        index = torch.stack([F.pad(layer.index.long(), (0, width - layer.index.shape[-1]), value=-1)
                             for layer in layers], 1)  # (B, L, H_kv, C)
        occupied = index >= 0
        n = occupied.sum(-1)  # (B, L, H_kv)
        target = torch.floor(float(self.budget) * n.sum((1, 2)).double() + 0.5).long()  # (B,)
        if self.floor:
            need = n.clamp(max=-(-self.floor // S) * S).sum((1, 2))  # (B,) tokens the floors alone keep
            if bool((need > target).any()):
                row = int((need > target).nonzero()[0])
                raise ValueError(f"{self.name}: floor={self.floor} tokens per (layer, kv head) (in blocks of {S}: "
                                 f"{int(need[row])} tokens) is above the budget ({int(target[row])} tokens of "
                                 f"{int(n[row].sum())}); allowed: floor <= budget x tokens per head")
        # protection per row: sinks + observation window, at most the per-head budget rounded down to blocks
        per_head = target.double() / (n_layers * heads)
        allowed = torch.clamp(torch.floor(per_head / S).long() * S, min=S)  # (B,)
        sinks = torch.clamp(allowed, max=self.sinks)
        window_len = max(layer.window_len for layer in layers)  # the observation window actually seen
        window = torch.clamp(allowed - sinks, max=window_len)  # (B,)
        flat_index = index.reshape(batch, n_layers * heads, width)
        first = ranks_by_column(flat_index).reshape(index.shape) < sinks[:, None, None, None]
        last = ranks_by_column(flat_index, descending=True).reshape(index.shape) < window[:, None, None, None]
        protected = (first | last) & occupied  # (B, L, H_kv, C)
        free = metric.masked_fill(protected | ~occupied, float("-inf"))  # (B, L, H_kv, C) metric of the others
        keep = torch.stack([self._allocate(free[b], n[b], protected[b].sum(-1), int(target[b])) for b in range(batch)])
        plan = []
        for i, layer in enumerate(layers):
            c = layer.index.shape[-1]
            score = free[:, i, :, :c]
            sink_first = first[:, i, :, :c] & occupied[:, i, :, :c]
            priority = torch.where(protected[:, i, :, :c], TIER + sink_first.double() * TIER, score)
            plan.append((keep[:, i], priority))
        return plan

    def _allocate(self, free: torch.Tensor, n: torch.Tensor, protected: torch.Tensor, target: int) -> torch.Tensor:
        """Keep counts (L, H_kv) for one row: ``free`` (L, H_kv, C) metric of the unprotected occupied tokens (-inf
        elsewhere), ``n`` (L, H_kv) occupied, ``protected`` (L, H_kv) protected counts, ``target`` tokens to keep."""
        S = self.block_size
        shape = n.shape
        free, n, protected = free.reshape(-1, free.shape[-1]), n.reshape(-1), protected.reshape(-1)  # U = L x H_kv
        ranked = free.sort(dim=-1, descending=True).values  # (U, C) unprotected tokens by metric, -inf last
        base = torch.minimum(n, (protected + S - 1) // S * S)  # (U,) mandatory: protected rounded up to blocks
        if self.floor:  # the floor, in whole blocks, filled by each head's best unprotected tokens
            base = torch.maximum(base, n.clamp(max=-(-self.floor // S) * S))
        rest = n - base  # tokens in the optional units
        units = int((rest.max() + S - 1) // S) if rest.numel() else 0
        remaining = target - int(base.sum())
        if units == 0 or remaining <= 0:
            return base.reshape(shape)
        start = (base - protected)[:, None, None]  # first unprotected token past the mandatory unit
        steps = torch.arange(units, device=n.device)[None, :, None] * S + torch.arange(S, device=n.device)
        pos = start + steps  # (U, K, S) sorted positions of each unit's tokens
        valid = pos < (n - protected)[:, None, None]
        vals = ranked.gather(1, pos.clamp(max=ranked.shape[-1] - 1).reshape(len(n), -1)).reshape(pos.shape)
        size = valid.sum(-1)  # (U, K)
        mean = vals.masked_fill(~valid, 0.0).sum(-1) / size.clamp(min=1)
        mean = mean.masked_fill(size == 0, float("-inf"))
        # one ranking of every unit of the row: by mean metric, ties to the earlier unit of a head (so that a head
        # always takes a prefix of its units), then to the earlier head
        k = torch.arange(units, device=n.device).expand(len(n), units).reshape(-1)
        order = k.argsort(stable=True)
        order = order[mean.reshape(-1)[order].argsort(descending=True, stable=True)]
        sizes = size.reshape(-1)[order]
        before = sizes.cumsum(0) - sizes
        take = (2 * before + sizes <= 2 * remaining) & (sizes > 0)  # nearest total: a unit goes in if it gets closer
        heads = torch.arange(len(n), device=n.device).repeat_interleave(units)[order]
        extra = torch.zeros_like(n).scatter_add_(0, heads, sizes * take)
        return (base + extra).reshape(shape)
