"""Perplexity on fixed-length, non-overlapping chunks of a corpus, evaluated through a method's cache.

Protocols (the result names which one was used):

* ``throughout``: one teacher-forced forward per batch of chunks with ``past_key_values=cache``; every attention
  read goes through the cache (which compresses on write), so even a chunk's own tokens attend through what the
  method keeps. Scored: every predicted token, ``chunk_len - 1`` per chunk.
* ``context``: prefill the first ``round(context_frac * chunk_len)`` tokens, ``method.compress(cache, ...)``, then
  forward the rest with positions continuing. Scored: the continuation tokens only (the first of them is predicted
  from the prefill's last logit), ``chunk_len - context_len`` per chunk.
"""

from __future__ import annotations

import math
import time

import torch

from .forward import Meter, forward, progress_bar, token_logprobs

PROTOCOLS = ("throughout", "context")


def check_protocol(protocol: str, method=None) -> None:
    """``protocol`` must be known and, given a method, one it supports (token eviction: "context" only)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    supported = getattr(method, "protocols", PROTOCOLS)
    if protocol not in supported:
        raise ValueError(f"method {method.name!r} supports protocol(s) {', '.join(supported)}, not {protocol!r}")


def context_length(chunk_len: int, context_frac: float) -> int:
    """Tokens prefilled before compression in the context protocol (at least 1, at most chunk_len - 1)."""
    if not 0.0 < context_frac < 1.0:
        raise ValueError(f"context_frac must be in (0, 1), got {context_frac}")
    return min(chunk_len - 1, max(1, round(chunk_len * context_frac)))


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (B, T) of ``targets`` (B, T) under ``logits`` (B, T, V), computed in fp32."""
    return -token_logprobs(logits, targets)


@torch.inference_mode()
def chunk_nll(model, method, chunks: torch.Tensor, *, batch_size: int = 4, protocol: str = "throughout",
              context_frac: float = 0.5, progress: bool = True, meter: Meter | None = None) -> torch.Tensor:
    """Per-token NLL (n, chunk_len - 1); entry t is the NLL of token t + 1. Unscored entries are NaN."""
    check_protocol(protocol)
    if chunks.ndim != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must be (n, chunk_len >= 2) token ids, got shape {tuple(chunks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, length = chunks.shape
    meter = meter if meter is not None else Meter()
    out = torch.full((n, length - 1), float("nan"))
    ctx = context_length(length, context_frac) if protocol == "context" else length
    with method.attached(model):
        for start in progress_bar(range(0, n, batch_size), desc="perplexity", enabled=progress):
            ids = chunks[start: start + batch_size]
            batch = ids.shape[0]
            mask = torch.ones_like(ids)
            pos = torch.arange(length).expand(batch, length)
            cache = method.new_cache(model)
            if protocol == "throughout":
                logits = forward(model, ids, mask, pos, cache)  # (B, L, V)
                meter.count(mask)
                out[start: start + batch] = _token_nll(logits[:, :-1], ids[:, 1:])
            else:
                last = forward(model, ids[:, :ctx], mask[:, :ctx], pos[:, :ctx], cache, logits_to_keep=1)
                meter.count(mask[:, :ctx])
                method.compress(cache, model=model, attention_mask=mask[:, :ctx], position_ids=pos[:, :ctx])
                nll = [_token_nll(last, ids[:, ctx: ctx + 1])]
                if ctx < length - 1:  # the last token is only a target: never fed
                    logits = forward(model, ids[:, ctx:-1], mask[:, :-1], pos[:, ctx:-1], cache)
                    meter.count(mask[:, ctx:-1])
                    nll.append(_token_nll(logits, ids[:, ctx + 1:]))
                out[start: start + batch, ctx - 1:] = torch.cat(nll, dim=1)
            meter.account(cache)
            del cache
    return out


def perplexity(model, tokenizer, method, corpus="wiki", chunk_len: int = 512, n_chunks: int | None = None, *,
               batch_size: int = 4, protocol: str = "throughout", context_frac: float = 0.5, seed: int | None = None,
               progress: bool = True, meter: Meter | None = None) -> dict:
    """Perplexity of ``model`` run through ``method`` on ``n_chunks`` chunks of ``chunk_len`` tokens.

    ``corpus`` is a corpus name of :func:`kvlab.data.text_chunks` (``"wiki"``, ``"c4"``; split "eval", the first
    ``n_chunks`` chunks, or a seeded random subset with ``seed``) or a ready (n, chunk_len) LongTensor of ids.
    Returns ``{ppl, nll (mean per scored token), tokens (scored), chunk_len, n_chunks, corpus, protocol, ...}``.
    """
    check_protocol(protocol)
    if isinstance(corpus, torch.Tensor):
        chunks, name = corpus, "<tensor>"
        if n_chunks is not None:
            chunks = chunks[:n_chunks]
    else:
        from .. import data

        chunks = data.text_chunks(corpus, tokenizer, chunk_len=chunk_len, n_chunks=n_chunks, split="eval", seed=seed)
        name = corpus
    own = Meter()
    start = time.perf_counter()
    nll = chunk_nll(model, method, chunks, batch_size=batch_size, protocol=protocol, context_frac=context_frac,
                    progress=progress, meter=own)
    own.seconds = time.perf_counter() - start
    if meter is not None:
        meter.add(own)
    scored = nll[~nll.isnan()]
    mean = float(scored.double().mean())
    result = {"ppl": math.exp(mean), "nll": mean, "tokens": int(scored.numel()), "chunk_len": int(chunks.shape[1]),
              "n_chunks": int(chunks.shape[0]), "corpus": name, "split": "eval", "protocol": protocol}
    if protocol == "context":
        result["context_len"] = context_length(chunks.shape[1], context_frac)
    result.update(own.as_dict())
    return result
