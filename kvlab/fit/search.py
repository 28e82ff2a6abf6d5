"""Adaptive rank allocation for feature-axis methods: greedy on measured loss, per (layer, kv head, K or V).

Step 1, :func:`measure_sensitivity`: for every unit u = (layer, kv head, part) and every rank r of a grid, the
distillation KL(full model || model with *only u* truncated to rank r) on calibration chunks, measured with the
method's own bases and sinks (one forward pass per (u, r)). Step 2, :func:`allocate`: start every unit at full rank
and repeatedly take the rank step (down to the next grid rank of one unit) that costs the least measured loss per
byte saved, until the average budget is met. The units' losses are assumed additive (the usual assumption of
sensitivity-based mixed-precision search); the notebook checks the searched ranks against uniform ones end to end.
One sensitivity table serves every budget.

    sens = measure_sensitivity(model, pca, calib_ids)          # (L, H, G) per part, G = len(grid)
    key_ranks, value_ranks = allocate(sens, budget=0.5)         # (L, H) ints, mean over units = 0.5 * D
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..cache.base import FullLayer, KVLabCache
from ..cache.projected import ProjectedLayer
from ..models import ModelSpec


@dataclass
class Sensitivity:
    """Measured loss increase per unit and grid rank: ``keys``/``values`` (L, H_kv, G) for ``grid`` (G,) ranks < D."""

    grid: torch.Tensor  # (G,) ascending ranks, all < head_dim
    keys: torch.Tensor  # (L, H_kv, G) KL increase with only (layer, head)'s keys at grid rank
    values: torch.Tensor
    head_dim: int
    tokens: int = 0  # calibration tokens per measurement

    def tensors(self, prefix: str = "sensitivity_") -> dict[str, torch.Tensor]:
        return {f"{prefix}grid": self.grid.float(), f"{prefix}keys": self.keys, f"{prefix}values": self.values,
                f"{prefix}meta": torch.tensor([self.head_dim, self.tokens], dtype=torch.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "sensitivity_") -> "Sensitivity | None":
        if f"{prefix}keys" not in tensors:
            return None
        head_dim, tokens = (int(x) for x in tensors[f"{prefix}meta"].tolist())
        return cls(tensors[f"{prefix}grid"].long(), tensors[f"{prefix}keys"], tensors[f"{prefix}values"], head_dim, tokens)

    def to_frame(self):
        """Long table: layer, head, part, rank, loss (with the full-rank point at loss 0)."""
        import pandas as pd

        rows = []
        for part, table in (("K", self.keys), ("V", self.values)):
            for (layer, head, g), loss in zip(torch.cartesian_prod(*(torch.arange(n) for n in table.shape)).tolist(),
                                              table.flatten().tolist()):
                rows.append(dict(layer=layer, head=head, part=part, rank=int(self.grid[g]), loss=loss))
        return pd.DataFrame(rows)


def _probe_cache(spec: ModelSpec, layer: int, head: int, part: str, rank: int, key_bases, value_bases, sinks,
                 rotary=None, value_decoders=None):
    """A cache with every layer full except ``layer``, where only ``head``'s ``part`` is truncated to ``rank``
    (``rotary``: that layer's rotary embedding for pre-RoPE key bases)."""
    dim = spec.head_dim
    keys = [key_bases[layer, h, :, : rank if (part == "K" and h == head) else dim] for h in range(spec.n_kv_heads)]
    values = [value_bases[layer, h, :, : rank if (part == "V" and h == head) else dim] for h in range(spec.n_kv_heads)]
    decoders = None if value_decoders is None else [
        value_decoders[layer, h, :, : rank if (part == "V" and h == head) else dim] for h in range(spec.n_kv_heads)]
    return KVLabCache([ProjectedLayer(i, keys, values, sinks=sinks, rotary=rotary, value_decoders=decoders)
                       if i == layer else FullLayer(i)
                       for i in range(spec.n_layers)])


@torch.no_grad()
def measure_sensitivity(model, method, data: torch.Tensor, *, grid: list[int] | None = None, batch_size: int = 4,
                        progress: bool = True) -> Sensitivity:
    """KL(full || one unit truncated) for every (layer, kv head, K/V) and grid rank, over rows of ``data`` (N, T).

    ``method`` must be fitted (PCA or MatryoshkaKV: ``key_bases``/``value_bases`` (L, H_kv, D, D), ``sinks``).
    ``grid`` defaults to D/8, D/4, 3D/8, D/2, 3D/4 (finer where the budgets that matter put their ranks). Cost:
    L * H_kv * 2 * G forward passes over ``data`` (SmolLM2: 900 passes; 1 x 256 tokens, about 10 minutes here).
    """
    from tqdm.auto import tqdm

    from .train import check_tokens, forward_logits, teacher_logprobs

    data = check_tokens(data)
    spec = ModelSpec.from_model(model)
    if not getattr(method, "fitted", False):
        raise RuntimeError(f"method {method.name!r} has no bases yet: fit or prepare it before measuring sensitivity")
    key_bases, value_bases = method.key_bases, method.value_bases
    rotaries = method.rotaries(model) if hasattr(method, "rotaries") else [None] * spec.n_layers
    dim = spec.head_dim
    default = [max(1, round(dim * f)) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)]
    grid = sorted(set(r for r in (grid if grid is not None else default) if grid is not None or r < dim))
    if not grid or grid[0] < 1 or grid[-1] >= spec.head_dim:
        raise ValueError(f"grid ranks must lie in 1..{spec.head_dim - 1}, got {grid}")
    batches = [data[i: i + batch_size] for i in range(0, data.shape[0], batch_size)]
    targets = [teacher_logprobs(model, ids) for ids in batches]
    table = {part: torch.zeros(spec.n_layers, spec.n_kv_heads, len(grid)) for part in ("K", "V")}
    units = [(l, h, p) for l in range(spec.n_layers) for h in range(spec.n_kv_heads) for p in ("K", "V")]
    with method.attached(model):
        for layer, head, part in tqdm(units, desc="rank sensitivity", unit="unit", disable=not progress):
            for g, rank in enumerate(grid):
                kl = 0.0
                for ids, target in zip(batches, targets):
                    cache = _probe_cache(spec, layer, head, part, rank, key_bases, value_bases, method.sinks,
                                         rotaries[layer], getattr(method, "value_decoders", None))
                    logp = torch.log_softmax(forward_logits(model, ids, cache).float(), dim=-1)
                    kl += float((target.exp() * (target - logp)).sum(-1).sum())
                table[part][layer, head, g] = kl / data.numel()  # mean over positions
    return Sensitivity(torch.tensor(grid), table["K"], table["V"], spec.head_dim, int(data.numel()))


def allocate(sens: Sensitivity, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (L, H_kv) key and value ranks whose mean is at most ``budget * head_dim`` (and within one grid step).

    Curves are made monotone (a lower rank never costs less than a higher one: c(r) = max over r' >= r), then
    every step lowers the unit whose next grid step costs least loss per feature dropped.
    """
    dim = sens.head_dim
    grid = [int(r) for r in sens.grid.tolist()]
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if budget * dim < grid[0] - 1e-9:
        raise ValueError(f"budget {budget} is below the smallest searched rank ({grid[0]} of {dim} features, "
                         f"{grid[0] / dim:.3f}); measure a finer grid")
    levels = grid + [dim]  # index i -> rank levels[i]; every unit starts at the top (full rank, loss 0)
    curves = {}
    for part, table in (("K", sens.keys), ("V", sens.values)):
        full = torch.cat([table, torch.zeros(*table.shape[:2], 1)], dim=-1).clamp_min(0)  # (L, H, G+1)
        monotone = full.flip(-1).cummax(-1).values.flip(-1)
        for layer in range(table.shape[0]):
            for head in range(table.shape[1]):
                curves[(layer, head, part)] = monotone[layer, head].tolist()
    at = {unit: len(levels) - 1 for unit in curves}
    total, target = dim * len(curves), budget * dim * len(curves)
    heap = []

    def push(unit):
        i = at[unit]
        if i > 0:
            cost = (curves[unit][i - 1] - curves[unit][i]) / (levels[i] - levels[i - 1])
            heapq.heappush(heap, (cost, unit))

    for unit in curves:
        push(unit)
    while total > target + 1e-9 and heap:
        _, unit = heapq.heappop(heap)
        i = at[unit]
        total -= levels[i] - levels[i - 1]
        at[unit] = i - 1
        push(unit)
    shape = (sens.keys.shape[0], sens.keys.shape[1])
    ranks = {p: torch.zeros(shape, dtype=torch.long) for p in ("K", "V")}
    for (layer, head, part), i in at.items():
        ranks[part][layer, head] = levels[i]
    return ranks["K"], ranks["V"]


OBJECTIVE = "mean per-position KL(full-cache model || compressed model) on held-out token ids"


@torch.no_grad()
def heldout_kl(model, method, data: torch.Tensor, *, batch_size: int = 4, targets=None) -> float:
    """The search objective on held-out ids ``data`` (N, T): mean per-position KL(full || ``method``)."""
    from .train import check_tokens, forward_logits, teacher_logprobs

    data = check_tokens(data, "held-out data")
    batches = [data[i: i + batch_size] for i in range(0, data.shape[0], batch_size)]
    targets = targets if targets is not None else [teacher_logprobs(model, ids) for ids in batches]
    kl = 0.0
    with method.attached(model):
        for ids, target in zip(batches, targets):
            logp = torch.log_softmax(forward_logits(model, ids, method.new_cache(model)).float(), dim=-1)
            kl += float((target.exp() * (target - logp)).sum(-1).sum())
    return kl / data.numel()


@torch.no_grad()
def search_split(model, method, data: torch.Tensor, *, fractions=(0.25, 0.375, 0.5, 0.625, 0.75),
                 batch_size: int = 4, progress: bool = False):
    """Split one feature budget between keys and values, judged on held-out ids ``data`` (N, T).

    ``method`` (fitted PCA / MatryoshkaKV) keeps ``budget * D`` dims per head on average over K and V, i.e.
    2 * budget * D per head in all; each fraction f gives keys r_k = round(f * 2 * budget * D) and values the rest
    (clamped to 1..D), uniform over heads. Returns (key rank, value rank, table rows) of the split with the lowest
    :func:`heldout_kl`; the uniform split (f = 0.5) is always among the candidates."""
    from tqdm.auto import tqdm

    from .train import teacher_logprobs

    spec = ModelSpec.from_model(model)
    total = 2 * max(1, round(method.budget * spec.head_dim))
    candidates = sorted({(min(spec.head_dim, max(1, round(f * total))),) for f in (*fractions, 0.5)})
    pairs = sorted({(k, min(spec.head_dim, max(1, total - k))) for (k,) in candidates})
    batches = [data[i: i + batch_size] for i in range(0, data.shape[0], batch_size)]
    targets = [teacher_logprobs(model, ids) for ids in batches]
    shape = (spec.n_layers, spec.n_kv_heads)
    rows = []
    for k, v in tqdm(pairs, desc="K/V split", disable=not progress):
        probe = _with_ranks(method, torch.full(shape, k).tolist(), torch.full(shape, v).tolist())
        rows.append({"key_rank": k, "value_rank": v, "heldout_kl": heldout_kl(model, probe, data, batch_size=batch_size,
                                                                              targets=targets)})
    best = min(rows, key=lambda r: r["heldout_kl"])
    return best["key_rank"], best["value_rank"], rows


def _with_ranks(method, key_ranks, value_ranks):
    """A copy of ``method`` sharing its bases, at explicit per-head ranks."""
    import dataclasses

    other = dataclasses.replace(method, key_ranks=key_ranks, value_ranks=value_ranks)
    other.sensitivity = method.sensitivity
    return other
