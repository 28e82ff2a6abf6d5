"""CPU decode speed of each method's cache, against the plain model, beside the bytes-moved bound.

Protocol (:func:`decode_speed`): for each context length, one sequence of that many tokens of the corpus' eval split
(``text_chunks``) is prefilled through the method's cache; token-eviction methods then compress it
(``method.compress(cache, attention_mask=...)``, as :mod:`kvlab.eval.longcontext` does), feature-axis methods store
codes from the start; then ``new_tokens`` tokens are decoded greedily (``torch.inference_mode``, explicit position
ids and a 2-D mask) and only that loop is timed. Batch 1.

Timings on a shared CPU are noisy, so every figure is relative and taken in one run: each repeat runs every method
once, interleaved (the order rotates per repeat), ``ratio`` is a method's tokens/s over ``none``'s (transformers'
own attention and ``DynamicCache``) in the same repeat, and the table reports medians over repeats (ratio_min and
ratio_max show the spread); ``ratio_to_full`` is the same against kvlab's ``full`` cache (same attention code as
the compressed caches, so the difference is what the cache reads) when ``full`` was run. A short warm-up run per method comes first and is not counted.

Bytes: ``kv_bytes``/``kv_budget`` are measured after decoding (:func:`kvlab.budget.kv_bytes`: storage really
allocated, growth slack included, over the full cache's bytes), floating bytes in the bf16 view (the default
reference dtype of :func:`kvlab.budget.kv_bytes`). ``attn_bytes`` is what the attention reads per
decoded token, summed over layers, from :mod:`kvlab.kernels.bytes_model` (dense ``attention`` over the tokens kept,
or ``projected_attention`` over the codes + the full-rank sink copies); ``attn_bound`` = full-cache attention bytes
/ ``attn_bytes``, the memory-bound limit of the attention's speed-up. A whole decode step also reads every weight
once, so ``step_bound`` = (weights + full attention bytes) / (weights + ``attn_bytes``) bounds the end-to-end ratio
for memory-bound decoding. A CPU at batch 1 is not purely memory-bound; the bounds say what bytes alone allow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from ..budget import kv_bytes
from ..kernels.bytes_model import bytes_moved, speedup_bound
from ..models import ModelSpec

COLUMNS = ["context", "method", "budget", "tokens_per_s", "ratio", "ratio_min", "ratio_max", "ratio_to_full", "kv_bytes",
           "kv_budget",
           "attn_bytes", "attn_bound", "step_bound", "prefill_s", "new_tokens", "repeats", "threads"]
DEFAULT_METHODS = ("none", "full", "streaming", "pca")
BASELINE = "none"


def build_methods(names: Sequence, budget: float, model, tokenizer) -> list:
    """Methods by name (``none`` and ``full`` at 100 %, the rest at ``budget``) or as given, prepared to run."""
    from .. import methods as registry

    built = []
    for item in names:
        if isinstance(item, str):
            item = registry.get(item, None if item in ("none", "full") else budget)
        built.append(item.prepare(model, tokenizer) if tokenizer is not None else item)
    return built


def context_ids(tokenizer, context: int, vocab_size: int, corpus: str = "wiki", seed: int = 0) -> torch.Tensor:
    """(1, context) ids: the first ``context`` tokens of the corpus' eval split, or seeded random ids without a
    tokenizer (tiny test models)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab_size, (1, context), generator=g)
    from ..data import text_chunks

    return text_chunks(corpus, tokenizer, chunk_len=context, n_chunks=1, split="eval")


@torch.inference_mode()
def time_decode(model, method, ids: torch.Tensor, new_tokens: int) -> dict:
    """Prefill ``ids`` (1, T) through ``method``'s cache, compress, decode ``new_tokens`` greedily; the seconds of the
    decode loop, of the prefill, and the cache after it."""
    from .forward import forward

    batch, context = ids.shape
    mask = torch.ones(batch, context + new_tokens, dtype=torch.long)  # (B, T + new): every column real
    pos = torch.arange(context)[None].expand(batch, -1)
    with method.attached(model):
        cache = method.new_cache(model)
        tic = time.perf_counter()
        logits = forward(model, ids, mask[:, :context], pos, cache, logits_to_keep=1)[:, -1]  # (B, V)
        method.compress(cache, model=model, attention_mask=mask[:, :context], position_ids=pos, setting="query_aware")
        prefill = time.perf_counter() - tic
        last = pos[:, -1:]
        tic = time.perf_counter()
        for step in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            last = last + 1
            logits = forward(model, nxt, mask[:, : context + step + 1], last, cache, logits_to_keep=1)[:, -1]
        seconds = time.perf_counter() - tic
    return {"seconds": seconds, "prefill_s": prefill, "cache": cache}


def attention_bytes(cache, spec: ModelSpec, dtype_bytes: int) -> tuple[int, int]:
    """(bytes the method's attention reads per decoded token, bytes full-cache attention would read), summed over
    layers, from :func:`kvlab.kernels.bytes_model.bytes_moved` at batch 1."""
    table = kv_bytes(cache).table
    ours = full = 0
    common = dict(batch=1, heads=spec.n_heads, head_dim=spec.head_dim, dtype_bytes=dtype_bytes)
    for layer_idx, rows in table.groupby("layer"):
        keys, values = rows[rows.part == "K"].sort_values("head"), rows[rows.part == "V"].sort_values("head")
        kv_heads, dv = len(keys), int(values.dims_full.iloc[0])
        full += bytes_moved("attention", kv_heads=kv_heads, value_dim=dv, tokens=int(keys.tokens_seen.max()), **common)
        tokens = int(round(keys.tokens_kept.mean()))
        if "bits" in rows and rows["bits"].notna().all():  # quantized: the dense read scaled by the bytes stored
            fraction = float(rows.theoretical.sum() / rows.full.sum()) * int(keys.tokens_seen.max()) / max(tokens, 1)
            ours += fraction * bytes_moved("attention", kv_heads=kv_heads, value_dim=dv, tokens=tokens, **common)
            continue
        if (keys.dims_kept == keys.dims_full).all() and (values.dims_kept == values.dims_full).all():
            ours += bytes_moved("attention", kv_heads=kv_heads, value_dim=dv, tokens=tokens, **common)
            continue
        ours += bytes_moved("projected_attention", key_ranks=keys.dims_kept.astype(int).tolist(),
                            value_ranks=values.dims_kept.astype(int).tolist(), value_dim=dv, tokens=tokens, **common)
        slots = getattr(cache.layers[layer_idx], "sink_slots", None)
        sinks = int((slots >= 0).sum()) if slots is not None else 0  # full-rank copies, read densely
        ours += sinks * kv_heads * (spec.head_dim + dv) * dtype_bytes
    return ours, full


def bytes_per_token(spec: ModelSpec, contexts: Sequence[int], budget: float = 0.5, sinks: int = 4,
                    dtype_bytes: int = 2) -> pd.DataFrame:
    """Bytes the attention of all layers reads per decoded token (batch 1), by the bytes model, for the full cache,
    a token-evicted cache keeping ``budget`` of the tokens (dense ``attention`` over round(budget x T) tokens) and a
    projected cache at ``budget`` of the rank (``projected_attention`` with rank round(budget x D) per kv head, plus
    ``sinks`` full-rank copies); ``bound_*`` = full / method, the memory-bound limit of the attention's speed-up."""
    common = dict(batch=1, heads=spec.n_heads, head_dim=spec.head_dim, dtype_bytes=dtype_bytes)
    rank = [max(1, round(budget * spec.head_dim))] * spec.n_kv_heads
    rows = []
    for t in contexts:
        full = bytes_moved("attention", kv_heads=spec.n_kv_heads, tokens=t, **common)
        tokens = bytes_moved("attention", kv_heads=spec.n_kv_heads, tokens=max(1, round(budget * t)), **common)
        projected = (bytes_moved("projected_attention", key_ranks=rank, value_ranks=rank, tokens=t, **common)
                     + min(sinks, t) * spec.n_kv_heads * 2 * spec.head_dim * dtype_bytes)
        rows.append({"context": t, "full": full * spec.n_layers, "tokens": tokens * spec.n_layers,
                     "rank": projected * spec.n_layers, "bound_tokens": speedup_bound(full, tokens),
                     "bound_rank": speedup_bound(full, projected)})
    return pd.DataFrame(rows)


def weight_bytes(model) -> int:
    """Bytes of the distinct parameter storages: what one decode step reads once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decode_speed(model, tokenizer=None, methods: Sequence = DEFAULT_METHODS, contexts: Sequence[int] = (512, 4096),
                 budget: float = 0.5, new_tokens: int = 32, repeats: int = 3, corpus: str = "wiki", warmup: bool = True,
                 progress: bool = True) -> pd.DataFrame:
    """One row per (context, method) with the columns :data:`COLUMNS` (see the module docstring).

    ``methods``: names or Method instances; ``none`` is added first when missing (every ratio is to it)."""
    from tqdm.auto import tqdm

    _check(contexts, budget, new_tokens, repeats)
    names = [m if isinstance(m, str) else getattr(m, "bench_label", None) or m.name for m in methods]
    if BASELINE not in names:
        methods, names = [BASELINE, *methods], [BASELINE, *names]
    if len(set(names)) != len(names):
        raise ValueError(f"methods must be distinct, got {names}")
    built = build_methods(methods, budget, model, tokenizer)
    spec = ModelSpec.from_model(model)
    dtype_bytes = next(model.parameters()).element_size()
    weights = weight_bytes(model)
    if warmup:
        for method in built:
            time_decode(model, method, context_ids(tokenizer, 16, spec.vocab_size, corpus), 2)
    rows = []
    bar = tqdm(total=len(contexts) * repeats * len(built), desc="decode speed", unit="run", disable=not progress)
    for context in contexts:
        ids = context_ids(tokenizer, context, spec.vocab_size, corpus)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for repeat in range(repeats):
            shift = repeat % len(built)
            for name, method in list(zip(names, built))[shift:] + list(zip(names, built))[:shift]:
                bar.set_postfix_str(f"{context} tokens, {name}")
                run = time_decode(model, method, ids, new_tokens)
                if repeat:  # bytes are the same every repeat: keep one cache
                    del run["cache"]
                runs[name].append(run)
                bar.update()
        for name, method in zip(names, built):
            speed = pd.Series([new_tokens / r["seconds"] for r in runs[name]])
            ratio = speed / pd.Series([new_tokens / r["seconds"] for r in runs[BASELINE]])
            to_full = (speed / pd.Series([new_tokens / r["seconds"] for r in runs["full"]])).median() \
                if "full" in runs else float("nan")
            cache = runs[name][0]["cache"]
            kb = kv_bytes(cache)
            ours, full = attention_bytes(cache, spec, dtype_bytes)
            rows.append(dict(context=context, method=name, budget=float(getattr(method, "budget", 1.0)),
                             tokens_per_s=speed.median(), ratio=ratio.median(), ratio_min=ratio.min(),
                             ratio_max=ratio.max(), ratio_to_full=to_full, kv_bytes=kb.measured, kv_budget=kb.budget, attn_bytes=ours,
                             attn_bound=speedup_bound(full, ours),
                             step_bound=speedup_bound(weights + full, weights + ours),
                             prefill_s=pd.Series([r["prefill_s"] for r in runs[name]]).median(),
                             new_tokens=new_tokens, repeats=repeats, threads=torch.get_num_threads()))
        for name in names:
            runs[name][0].pop("cache", None)
    bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)


def _check(contexts, budget, new_tokens, repeats) -> None:
    if not contexts or any(isinstance(c, bool) or not isinstance(c, int) or c < 2 for c in contexts):
        raise ValueError(f"contexts must be integers >= 2 (tokens), got {list(contexts)}")
    if not 0 < float(budget) <= 1:
        raise ValueError(f"budget must be in (0, 1] (fraction of the full cache's bytes kept), got {budget}")
    for what, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")


def results_path(model_name: str, budget: float, contexts: Sequence[int], new_tokens: int, folder=None) -> Path:
    """``data/results/decode/<model>@<budget>-c<contexts>-n<new tokens>-t<threads>.csv`` (or under ``folder``)."""
    from ..report import repo_root

    folder = Path(folder) if folder is not None else repo_root() / "data" / "results" / "decode"
    stem = f"{model_name}@{budget:g}-c{'-'.join(map(str, contexts))}-n{new_tokens}-t{torch.get_num_threads()}"
    return folder / f"{stem}.csv"


def conditions(model_name: str) -> dict:
    """What a timing depends on, for the record."""
    import os
    import platform

    return {"model": model_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()], "batch": 1,
            "dtype": "float32"}
