"""Needle retrieval over a grid of context lengths and depths, in both settings, with Wilson intervals.

Each cell (length, depth, setting) holds ``n_per_cell`` needles (own key, value and haystack offset each) answered by
greedy decoding after the context is compressed: ``query_aware`` (the question is part of what gets compressed) or
``query_agnostic`` (compress the document, then ask). The same items are used by every method and both settings.

    table = needle_grid(model, tok, h2o, lengths=(1024, 2048), depths=(0.1, 0.5, 0.9), n_per_cell=4)
    summarise(table)   # hits, n, acc and Wilson 95 % interval per (setting, length) and per setting
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .forward import Meter
from .longcontext import SETTINGS, long_context
from .stats import wilson

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def needle_grid(model, tokenizer, method, *, lengths: Sequence[int] = (1024, 2048),
                depths: Sequence[float] = DEPTHS, n_per_cell: int = 2, settings: Sequence[str] = SETTINGS,
                seed: int = 0, batch_size: int = 1, max_new_tokens: int = 32, prompt: str = "chat",
                progress: bool = True, meter: Meter | None = None) -> pd.DataFrame:
    """One row per needle: setting, length, depth (requested and realised), hit (0/1), prediction, answer.

    ``max_new_tokens`` must leave room for the model's preamble: SmolLM2 answers "The special magic number for
    <key> mentioned in the provided text is" (16 tokens) before the 7 digits, so 16 scores every answer wrong."""
    if n_per_cell < 1:
        raise ValueError(f"n_per_cell must be >= 1, got {n_per_cell}")
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"settings must be a non-empty subset of {SETTINGS}, got {list(settings)}")
    if not lengths or not depths:
        raise ValueError("lengths and depths must be non-empty")
    rows = []
    for length in lengths:
        cell_depths = [float(d) for d in depths for _ in range(n_per_cell)]
        for setting in settings:
            r = long_context(model, tokenizer, method, "needle", context_len=int(length), n=len(cell_depths),
                             setting=setting, depths=cell_depths, seed=seed, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, prompt=prompt, progress=progress, meter=meter)
            for depth, rec in zip(cell_depths, r["records"]):
                rows.append({"setting": setting, "length": int(length), "depth": depth, "depth_real": rec["depth"],
                             "hit": float(rec["score"]), "prediction": rec["prediction"],
                             "answer": rec["answers"][0], "budget": r["kv_bytes"]["budget"],
                             "budget_vs_reference": r["kv_bytes"]["budget_vs_reference"]})
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, by: Sequence[str] = ("setting", "length")) -> pd.DataFrame:
    """Hits, n, accuracy and its Wilson 95 % interval per group of ``by`` (e.g. ("setting",) for the whole grid)."""
    out = []
    for key, part in table.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        hits, n = int(part["hit"].sum()), len(part)
        low, high = wilson(hits, n)
        out.append({**dict(zip(by, key)), "hits": hits, "n": n, "acc": hits / n, "ci_low": low, "ci_high": high})
    return pd.DataFrame(out)
