"""Continuation perplexity after a compressed context: the long-context yardstick of the token axis.

Each document is ``context_len + continuation_len`` consecutive tokens of a corpus' eval split. The context is
prefilled through the method's cache, ``method.compress`` brings the cache to the budget, and the next
``continuation_len`` tokens are scored teacher-forced through the compressed cache (the first of them from the
prefill's last logit). This is :func:`kvlab.eval.perplexity.chunk_nll`'s ``context`` protocol with the context
length given in tokens. Documents weigh equally; the interval is a t interval over documents of the mean
per-document NLL, exponentiated (``ci95``), and a method can be compared with a reference on the same documents by
:func:`kvlab.eval.stats.paired_ratio_interval` over ``doc_nll``.

    continuation_ppl(model, tok, h2o, context_len=2048, continuation_len=256, n_docs=24)
    # {"ppl": ..., "ci95": [lo, hi], "doc_nll": [...], "budget": measured / full, ...}
"""

from __future__ import annotations

import time

import torch

from .forward import Meter
from .perplexity import chunk_nll
from .stats import ppl_interval

CONTEXT_LENGTHS = (1024, 2048, 4096)


def continuation_ppl(model, tokenizer, method, *, context_len: int = 2048, continuation_len: int = 256,
                     n_docs: int = 24, corpus="wiki", seed: int | None = None, batch_size: int = 1,
                     interval: str = "t", progress: bool = True, meter: Meter | None = None) -> dict:
    """Perplexity of the ``continuation_len`` tokens after a ``context_len``-token context compressed by ``method``.

    ``corpus``: a corpus name (eval split; the first ``n_docs`` documents, or a seeded subset with ``seed``) or a
    ready (n, context_len + continuation_len) LongTensor. A document longer than the model's window is refused
    (ValueError naming the limit). Returns ``{ppl, ci95, nll, doc_nll, n_docs, context_len, continuation_len,
    budget, kv_bytes, ...}``; ``budget`` is measured bytes / full bytes after the continuation.
    """
    from ..models import check_window

    for name, value in (("context_len", context_len), ("continuation_len", continuation_len), ("n_docs", n_docs)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    length = context_len + continuation_len
    check_window(model, length, f"context_len {context_len} + continuation_len {continuation_len}")
    if isinstance(corpus, torch.Tensor):
        if corpus.ndim != 2 or corpus.shape[1] != length:
            raise ValueError(f"a tensor corpus must be (n, context_len + continuation_len = {length}), "
                             f"got {tuple(corpus.shape)}")
        docs, name = corpus[:n_docs], "<tensor>"
    else:
        from .. import data

        docs = data.text_chunks(corpus, tokenizer, chunk_len=length, n_chunks=n_docs, split="eval", seed=seed)
        name = corpus
    frac = context_len / length
    method.prepare(model, tokenizer)
    own = Meter()
    start = time.perf_counter()
    nll = chunk_nll(model, method, docs, batch_size=batch_size, protocol="context", context_frac=frac,
                    progress=progress, meter=own)  # (n, length - 1), NaN outside the continuation
    own.seconds = time.perf_counter() - start
    if meter is not None:
        meter.add(own)
    scored = nll[:, context_len - 1:]  # (n, continuation_len): predictions of tokens context_len .. length - 1
    if bool(scored.isnan().any()) or bool((~nll[:, : context_len - 1].isnan()).any()):
        raise RuntimeError(f"continuation scoring covered other tokens than the last {continuation_len}")
    doc_nll = scored.double().mean(dim=1).tolist()
    result = {"corpus": name, "split": "eval", "context_len": context_len, "continuation_len": continuation_len,
              "n_docs": int(docs.shape[0]), "tokens": int(scored.numel()), "protocol": "context",
              "doc_nll": doc_nll}
    if len(doc_nll) > 1:
        result.update(ppl_interval(doc_nll, method=interval))
    else:
        import math

        result.update({"ppl": math.exp(doc_nll[0]), "ci95": [float("nan"), float("nan")], "nll": doc_nll[0]})
    kv = own.kv_dict()
    result["budget"] = kv["budget"]
    result["budget_vs_reference"] = kv["budget_vs_reference"]  # sliding-window layers counted at their window
    result.update(own.as_dict())
    return result
