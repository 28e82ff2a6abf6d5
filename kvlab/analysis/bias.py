"""Attention-score bias of token-eviction importance scores: accumulated vs length-normalised vs a future oracle.

H2O ranks a context token by the attention it has accumulated, summed over every query that can see it. In a causal
model the token at position k of a T_c-token context is seen by T_c - k queries, so early tokens collect more merely
by being early. Three scores per (layer, head) over the context positions k < T_c of a sequence of T_c + N tokens:

* ``accumulated``: ``A_k = sum_{q < T_c} p(q, k)``                     (H2O's score after a prefill)
* ``normalized``:  ``A_k / #{q < T_c : q sees k}``                     (mean attention per query that can see k)
* ``oracle``:      ``O_k = sum_{T_c <= q < T_c + N} p(q, k)``          (what the next N queries really read)

``head`` is a kv head (probabilities summed over the query heads of its GQA group, as H2O and SnapKV aggregate;
``level="kv"``) or a query head (``level="query"``). "Sees" follows the model's own mask (causal, sliding windows).

Metrics (tidy pandas frames, one row per sequence x layer x head x ...):

* ``correlation``: columns ``seq, layer, head, score, spearman`` -- Spearman rank correlation of ``accumulated``
  and ``normalized`` with ``oracle`` over the context positions (from ``skip_first`` on);
* ``deciles``: ``seq, layer, head, score, budget, decile, share`` -- for each score (the oracle too) and budget,
  the share of the kept tokens (the top ``round(budget x n)``) that lie in each tenth of the context (decile 0 =
  the earliest positions); shares sum to 1 per (seq, layer, head, score, budget);
* ``overlap``: ``seq, layer, head, score, budget, overlap`` -- |kept by the score ∩ kept by the oracle| / kept.

    from kvlab.analysis.bias import attention_bias
    ids = kvlab.data.text_chunks("wiki", tok, chunk_len=2048, n_chunks=2)       # (2, 2048)
    res = attention_bias(model, ids, context_len=1792, n_future=256, budgets=(0.2,))
    res.summary()

Memory: nothing per query is kept. Each layer's attention probabilities are computed query block by block during an
ordinary forward (``query_chunk`` rows at a time: B x H x chunk x T floats) and reduced at once to the three sums,
so a 2k-token SmolLM2 pass holds ~20 MB of probabilities at a time instead of 30 x 9 x 2k x 2k floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .. import attention
from ..cache.base import FullLayer, KVLabCache
from ..capturing import attention_probs
from ..models import ModelSpec

SCORES: tuple[str, ...] = ("accumulated", "normalized", "oracle")
LEVELS: tuple[str, ...] = ("kv", "query")
QUERY_CHUNK = 256

CORRELATION_COLUMNS = ["seq", "layer", "head", "score", "spearman"]
DECILE_COLUMNS = ["seq", "layer", "head", "score", "budget", "decile", "share"]
OVERLAP_COLUMNS = ["seq", "layer", "head", "score", "budget", "overlap"]


# --------------------------------------------------------------------------------------------------------------
# Sums over queries


class ImportanceSums:
    """Running sums for one layer: attention each context key receives from context queries and from future ones,
    and how many context queries see it. Feed probability blocks (B, H, c, T) with :meth:`add`."""

    def __init__(self, context_len: int, n_future: int, n_kv_heads: int | None = None):
        self.context_len, self.n_future, self.n_kv_heads = context_len, n_future, n_kv_heads
        self.accumulated = self.oracle = self.visible = None  # (B, H, T_c), (B, H, T_c), (B, T_c)

    def add(self, probs: torch.Tensor, q_start: int, mask: torch.Tensor | None = None) -> None:
        """``probs`` (B, H, c, T) of the queries ``q_start .. q_start + c``; ``mask`` (B, 1, c, T) bool or None
        (causal). Keys beyond the context and queries beyond context + n_future are ignored."""
        ctx, end = self.context_len, self.context_len + self.n_future
        batch, heads, n_rows, _ = probs.shape
        if self.accumulated is None:
            h = self.n_kv_heads or heads
            self.accumulated = probs.new_zeros(batch, h, ctx, dtype=torch.float64)
            self.oracle = probs.new_zeros(batch, h, ctx, dtype=torch.float64)
            self.visible = probs.new_zeros(batch, ctx, dtype=torch.float64)
        rows = torch.arange(q_start, q_start + n_rows, device=probs.device)
        p = probs[..., :ctx].double()  # (B, H, c, T_c)
        if self.n_kv_heads:
            p = p.view(batch, self.n_kv_heads, heads // self.n_kv_heads, n_rows, ctx).sum(2)  # (B, H_kv, c, T_c)
        in_ctx, in_future = rows < ctx, (rows >= ctx) & (rows < end)
        self.accumulated += p[:, :, in_ctx].sum(2)
        self.oracle += p[:, :, in_future].sum(2)
        if mask is None:
            sees = (torch.arange(ctx, device=probs.device)[None, :] <= rows[:, None]).expand(batch, n_rows, ctx)
        else:
            sees = mask[:, 0, :, :ctx]  # (B, c, T_c)
        self.visible += sees[:, in_ctx].double().sum(1)

    def scores(self) -> dict[str, torch.Tensor]:
        """``accumulated``, ``normalized``, ``oracle``: (B, H, T_c) float64."""
        return {"accumulated": self.accumulated,
                "normalized": self.accumulated / self.visible.clamp(min=1)[:, None, :],
                "oracle": self.oracle}


def importance_from_probs(probs: torch.Tensor, context_len: int, n_future: int, mask: torch.Tensor | None = None,
                          n_kv_heads: int | None = None) -> dict[str, torch.Tensor]:
    """The three scores (B, H, T_c) from full probabilities (B, H, T, T) (for tests and small inputs)."""
    _check_lengths(context_len, n_future, probs.shape[-1])
    sums = ImportanceSums(context_len, n_future, n_kv_heads)
    sums.add(probs, 0, mask)
    return sums.scores()


class _BiasLayer(FullLayer):
    """A full cache layer that reduces its attention probabilities to :class:`ImportanceSums` on the way."""

    def __init__(self, layer_idx: int, sums: ImportanceSums | None, query_chunk: int):
        super().__init__(layer_idx)
        self.sums, self.query_chunk = sums, query_chunk

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        if self.sums is not None:
            end = min(query.shape[2], self.sums.context_len + self.sums.n_future)
            for start in range(0, end, self.query_chunk):
                stop = min(end, start + self.query_chunk)
                block_mask = None if mask is None else mask[:, :, start:stop]
                probs = attention_probs(query[:, :, start:stop], key, block_mask, scaling)  # (B, H, c, T)
                self.sums.add(probs, start, block_mask)
        return super().attend(query, key, value, mask, scaling=scaling, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Metrics


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (average ranks for ties); NaN where one side is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denom = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(-1) / denom, np.nan)


def kept_mask(score: torch.Tensor, budget: float) -> torch.Tensor:
    """Bool like ``score`` (..., n): the top ``max(1, round_half_up(budget x n))`` entries along the last axis."""
    n = score.shape[-1]
    k = min(n, max(1, int(np.floor(budget * n + 0.5))))
    top = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)


def _frame(values: np.ndarray, layers: Sequence[int], columns: dict, name: str) -> pd.DataFrame:
    """Tidy frame of ``values`` (N, L, H) with seq/layer/head columns and constant ``columns``."""
    n, n_layers, heads = values.shape
    seq, lay, head = np.meshgrid(np.arange(n), np.asarray(layers), np.arange(heads), indexing="ij")
    return pd.DataFrame({"seq": seq.ravel(), "layer": lay.ravel(), "head": head.ravel(), **columns,
                         name: values.ravel()})


def bias_frames(scores: dict[str, torch.Tensor], layers: Sequence[int], budgets: Sequence[float] = (0.2,),
                skip_first: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(correlation, deciles, overlap) frames from per-position scores (N, L, H, T_c) (see the module docstring).

    Positions ``< skip_first`` (e.g. the attention sink) are left out of every metric."""
    missing = [s for s in SCORES if s not in scores]
    if missing:
        raise ValueError(f"scores lacks {missing}; needs {', '.join(SCORES)}")
    _check_budgets(budgets)
    s = {k: v[..., skip_first:].double().cpu() for k, v in scores.items()}
    n_pos = s["oracle"].shape[-1]
    if n_pos < 2:
        raise ValueError(f"skip_first={skip_first} leaves {n_pos} context positions; need at least 2")
    oracle = s["oracle"].numpy()
    correlation = pd.concat([_frame(spearman(s[name].numpy(), oracle), layers, {"score": name}, "spearman")
                             for name in ("accumulated", "normalized")], ignore_index=True)
    decile_of = torch.div(torch.arange(n_pos) * 10, n_pos, rounding_mode="floor")  # (T_c,) 0..9
    deciles, overlaps = [], []
    for budget in budgets:
        kept = {name: kept_mask(s[name], budget) for name in SCORES}  # (N, L, H, T_c)
        n_kept = kept["oracle"].sum(-1).double()  # (N, L, H)
        for name in SCORES:
            for d in range(10):
                share = (kept[name] & (decile_of == d)).sum(-1).double() / n_kept
                deciles.append(_frame(share.numpy(), layers, {"score": name, "budget": budget, "decile": d}, "share"))
            if name != "oracle":
                both = (kept[name] & kept["oracle"]).sum(-1).double() / n_kept
                overlaps.append(_frame(both.numpy(), layers, {"score": name, "budget": budget}, "overlap"))
    return (correlation[CORRELATION_COLUMNS], pd.concat(deciles, ignore_index=True)[DECILE_COLUMNS],
            pd.concat(overlaps, ignore_index=True)[OVERLAP_COLUMNS])


# --------------------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class BiasResult:
    """Per-position scores (N, L, H, T_c) float32 under ``scores`` and the three metric frames."""

    context_len: int
    n_future: int
    level: str
    layers: list[int]
    budgets: tuple[float, ...]
    scores: dict[str, torch.Tensor] = field(repr=False)
    correlation: pd.DataFrame = field(repr=False)
    deciles: pd.DataFrame = field(repr=False)
    overlap: pd.DataFrame = field(repr=False)

    def summary(self) -> pd.DataFrame:
        """Per score and budget: mean Spearman with the oracle, mean overlap with the oracle's kept set, and the
        share of kept tokens in the first and last tenth of the context (means over sequences, layers, heads)."""
        rho = self.correlation.groupby("score")["spearman"].mean()
        ov = self.overlap.groupby(["score", "budget"])["overlap"].mean()
        dec = self.deciles.groupby(["score", "budget", "decile"])["share"].mean()
        rows = []
        for (score, budget), _ in self.deciles.groupby(["score", "budget"]):
            rows.append({"score": score, "budget": budget, "spearman": rho.get(score, 1.0),  # oracle vs itself: 1
                         "overlap": ov.get((score, budget), 1.0), "first_decile": dec[(score, budget, 0)],
                         "last_decile": dec[(score, budget, 9)]})
        return pd.DataFrame(rows)


def _check_lengths(context_len: int, n_future: int, total: int) -> None:
    if not isinstance(context_len, int) or context_len < 2:
        raise ValueError(f"context_len must be an int >= 2, got {context_len!r}")
    if not isinstance(n_future, int) or n_future < 1:
        raise ValueError(f"n_future must be an int >= 1, got {n_future!r}")
    if context_len + n_future > total:
        raise ValueError(f"context_len + n_future = {context_len + n_future} exceeds the {total} tokens given")


def _check_budgets(budgets: Sequence[float]) -> None:
    if not budgets or any(not 0.0 < float(b) <= 1.0 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of fractions in (0, 1], got {budgets!r}")


@torch.no_grad()
def attention_bias(model, ids: torch.Tensor, *, context_len: int, n_future: int, budgets: Sequence[float] = (0.2,),
                   layers: Sequence[int] | None = None, level: str = "kv", skip_first: int = 0, batch_size: int = 1,
                   query_chunk: int = QUERY_CHUNK) -> BiasResult:
    """Compare accumulated, length-normalised and oracle importance on ``ids`` (N, T) (unpadded real text, e.g.
    ``kvlab.data.text_chunks("wiki", tok, chunk_len=2048)``): the first ``context_len`` tokens are the context, the
    next ``n_future`` the continuation whose attention is the oracle. One forward per ``batch_size`` sequences."""
    if ids.ndim != 2:
        raise ValueError(f"ids must be (sequences, tokens), got shape {tuple(ids.shape)}")
    _check_lengths(context_len, n_future, ids.shape[1])
    _check_budgets(budgets)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if batch_size < 1 or query_chunk < 1:
        raise ValueError(f"batch_size and query_chunk must be >= 1, got {batch_size}, {query_chunk}")
    if not 0 <= skip_first <= context_len - 2:
        raise ValueError(f"skip_first must be in 0..{context_len - 2}, got {skip_first}")
    spec = ModelSpec.from_model(model)
    layers = list(range(spec.n_layers)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < spec.n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} invalid: the model has {spec.n_layers} layers "
                         f"(0..{spec.n_layers - 1})")
    ids = ids[:, : context_len + n_future]
    device = next(model.parameters()).device
    per_batch: list[dict[str, torch.Tensor]] = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start: start + batch_size].to(device)
        n_kv = spec.n_kv_heads if level == "kv" else None
        sums = {i: ImportanceSums(context_len, n_future, n_kv) for i in layers}
        cache = KVLabCache([_BiasLayer(i, sums.get(i), query_chunk) for i in range(spec.n_layers)])
        mask = torch.ones_like(batch)
        with attention.attach(model):
            model(batch, attention_mask=mask, position_ids=attention.padded_positions(mask), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
        layer_scores = [sums[i].scores() for i in layers]
        per_batch.append({name: torch.stack([s[name] for s in layer_scores], 1).float().cpu() for name in SCORES})
        del cache
    scores = {name: torch.cat([b[name] for b in per_batch]) for name in SCORES}  # (N, L, H, T_c)
    correlation, deciles, overlap = bias_frames(scores, layers, budgets, skip_first)
    return BiasResult(context_len, n_future, level, layers, tuple(float(b) for b in budgets), scores, correlation,
                      deciles, overlap)
