"""Zero-shot multiple choice with lm-evaluation-harness semantics, scored through a method's cache.

Tokenisation (lm-eval ``_encode_pair``): trailing spaces of the context move to the continuation;
``whole = tok(ctx + cont)``, ``ctx_ids = tok(ctx)``, ``cont_ids = whole[len(ctx_ids):]`` (no special tokens); an
empty context becomes ``[BOS]`` (or ``[EOS]``) and the continuation is tokenised alone. The log-likelihood of a
choice is the sum of its continuation tokens' log-probs; ``acc`` = argmax loglik is gold, ``acc_norm`` = argmax of
loglik / UTF-8 bytes of the choice text (lm-eval's ``acc_norm`` divides by ``len(choice)`` characters, without the
target delimiter; the same for ASCII text, so kvlab drops the one leading delimiter space before counting).

No recomputation of shared contexts: the unique contexts of all requests are prefilled once, in batches (left
padded, ``position_ids = cumsum(mask) - 1``), with ``logits_to_keep=1`` (the last context logit predicts the first
continuation token). The cache is then expanded to the continuations with ``cache.batch_select_indices`` and the
continuations run right padded, with the attention mask ``ctx mask ++ continuation mask`` and positions continuing
from each context's true length. The last continuation token is only a target, so it is never fed. Contexts are
sorted by length (longest first, so memory peaks early) and grouped under a token budget.

Protocols: ``throughout`` (no explicit compression; the cache compresses on write, so the continuation reads the
context through it) and ``context`` (``method.compress(cache, ...)`` after each context prefill, before expansion).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .forward import (Meter, forward, pad_id_of, pad_left, pad_right, positions, progress_bar,
                      token_logprobs)
from .perplexity import check_protocol

Pair = tuple[tuple[int, ...], tuple[int, ...]]


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prefix_token_id(tokenizer) -> int:
    """lm-eval's ``prefix_token_id``: BOS if the tokenizer has one, else EOS (the context of an empty context)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")


def encode_pair(tokenizer, context: str, continuation: str) -> Pair:
    """Token ids (context, continuation) exactly as lm-eval's HFLM encodes a loglikelihood request."""
    if context == "":
        ctx, cont = [prefix_token_id(tokenizer)], _encode(tokenizer, continuation)
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = _encode(tokenizer, context + continuation)
        ctx = _encode(tokenizer, context)
        cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no token after context {context[-40:]!r}")
    return tuple(ctx), tuple(cont)


def _plan(pairs: Sequence[Pair], batch_tokens: int) -> list[tuple[list[tuple[int, ...]], list[list[int]]]]:
    """Group unique contexts into batches: [(contexts, requests of each context)], longest first.

    A batch respects, unless a single context alone exceeds it: contexts x longest context <= batch_tokens and
    continuations x (longest context + longest continuation) <= batch_tokens (the expanded cache and the
    continuation forward).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(ctx, []).append(i)
    order = sorted(groups, key=lambda c: (-len(c), -max(len(pairs[i][1]) for i in groups[c]), c))
    batches, current, width, cont_width, n_cont = [], [], 0, 0, 0
    for ctx in order:
        reqs = groups[ctx]
        w = max(width, len(ctx))
        cw = max(cont_width, max(len(pairs[i][1]) for i in reqs))
        nc = n_cont + len(reqs)
        if current and ((len(current) + 1) * w > batch_tokens or nc * (w + cw) > batch_tokens):
            batches.append((current, [groups[c] for c in current]))
            current, w, cw, nc = [], len(ctx), max(len(pairs[i][1]) for i in reqs), len(reqs)
        current.append(ctx)
        width, cont_width, n_cont = w, cw, nc
    if current:
        batches.append((current, [groups[c] for c in current]))
    return batches


@torch.inference_mode()
def loglikelihood_tokens(model, method, pairs: Sequence[Pair], *, batch_tokens: int = 4096, pad_id: int = 0,
                         protocol: str = "throughout", progress: bool = True,
                         meter: Meter | None = None) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, continuation is the greedy one) per (ctx_ids, cont_ids) pair.

    Each unique context is prefilled once; see the module docstring.
    """
    check_protocol(protocol)
    if any(len(ctx) == 0 or len(cont) == 0 for ctx, cont in pairs):
        raise ValueError("every pair needs a non-empty context and continuation (use encode_pair)")
    meter = meter if meter is not None else Meter()
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    plan = _plan(pairs, batch_tokens)
    bar = progress_bar(total=len(pairs), desc="loglikelihood", enabled=progress)
    with method.attached(model):
        for contexts, requests in plan:
            cache = method.new_cache(model)
            ids, mask = pad_left(contexts, pad_id)  # (Bc, Tc)
            pos = positions(mask)
            last = forward(model, ids, mask, pos, cache, logits_to_keep=1)[:, -1].float()  # (Bc, V)
            meter.count(mask)
            if protocol == "context":
                method.compress(cache, model=model, attention_mask=mask, position_ids=pos)
            rows = [row for row, reqs in enumerate(requests) for _ in reqs]
            order = [i for reqs in requests for i in reqs]
            conts = [pairs[i][1] for i in order]
            select = torch.tensor(rows, dtype=torch.long)
            tokens, cmask = pad_right(conts, pad_id)  # (Bk, Tk)
            first = torch.log_softmax(last[select], dim=-1)  # (Bk, V) predicts continuation token 0
            logp = torch.zeros(tokens.shape, dtype=torch.float32)
            logp[:, 0] = first.gather(-1, tokens[:, :1]).squeeze(-1)
            greedy = first.argmax(-1) == tokens[:, 0]
            greedy = greedy.unsqueeze(1).expand(tokens.shape).clone()
            if tokens.shape[1] > 1:
                cache.batch_select_indices(select.to(ids.device))
                # the last token of each continuation is only a target: never fed (masked as padding)
                cont_len = cmask.sum(-1)
                feed_mask = cmask.clone()
                feed_mask[torch.arange(len(conts)), cont_len - 1] = 0
                feed, feed_mask = tokens[:, :-1], feed_mask[:, :-1]
                lengths = mask.sum(-1)[select]
                full_mask = torch.cat([mask[select], feed_mask], dim=1)
                logits = forward(model, feed, full_mask, positions(feed_mask, lengths), cache)  # (Bk, Tk-1, V)
                meter.count(feed_mask)
                logp[:, 1:] = token_logprobs(logits, tokens[:, 1:])
                greedy[:, 1:] = logits.argmax(-1).cpu() == tokens[:, 1:]
                del logits
            meter.account(cache)
            del cache
            logp = logp * cmask
            greedy = greedy | ~cmask.bool()
            for k, i in enumerate(order):
                results[i] = (float(logp[k].double().sum()), bool(greedy[k].all()))
            bar.update(len(order))
    bar.close()
    return results  # type: ignore[return-value]


@torch.inference_mode()
def naive_loglikelihood_tokens(model, pairs: Sequence[Pair]) -> list[float]:
    """Reference: each (context + continuation) alone, no padding, no cache, the plain model. Slow; for tests."""
    out = []
    for ctx, cont in pairs:
        ids = torch.tensor([list(ctx) + list(cont)])
        logits = model(input_ids=ids).logits[0, len(ctx) - 1: -1].double()  # (len(cont), V), exact reference
        lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(cont)[:, None])
        out.append(float(lp.double().sum()))
    return out


def _choice_bytes(continuation: str) -> int:
    text = continuation[1:] if continuation.startswith(" ") else continuation
    return max(1, len(text.encode("utf-8")))


def _stderr(x: np.ndarray) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n)."""
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def score_items(items, logliks: Sequence[float], greedy: Sequence[bool] | None = None) -> tuple[dict, pd.DataFrame]:
    """Metrics and per-item records from the log-likelihoods of every request of ``items`` (in order)."""
    records, k = [], 0
    for item in items:
        n = len(item.requests)
        ll = np.asarray(logliks[k: k + n], dtype=np.float64)
        lengths = np.asarray([_choice_bytes(cont) for _, cont in item.requests], dtype=np.float64)
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
        records.append({"task": item.task, "idx": item.idx, "gold": item.gold, "pred": pred, "pred_norm": pred_norm,
                        "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold),
                        "loglik": ll.tolist(), "bytes": lengths.astype(int).tolist(),
                        "greedy": list(greedy[k: k + n]) if greedy is not None else None})
        k += n
    frame = pd.DataFrame(records)
    acc, acc_norm = frame["acc"].to_numpy(), frame["acc_norm"].to_numpy()
    metrics = {"acc": float(acc.mean()), "acc_norm": float(acc_norm.mean()), "n": len(frame),
               "stderr_acc": _stderr(acc), "stderr_acc_norm": _stderr(acc_norm)}
    metrics.update(_against_chance(int(acc.sum()), len(frame), [item.n_choices for item in items]))
    return metrics, frame


def _against_chance(correct: int, n: int, n_choices) -> dict:
    """Chance level of ``acc``, its Wilson 95 % interval and a one-sided binomial test against chance."""
    from .stats import chance_level, chance_test

    chance = chance_level(n_choices)
    test = chance_test(correct, n, chance)
    return {"chance": chance, "acc_ci95": test["ci95"], "p_vs_chance": test["p_value"],
            "above_chance": test["above_chance"], "min_correct_above_chance": test["min_correct"]}


def multiple_choice(model, tokenizer, method, task, limit: int | None = None, seed: int = 0, *,
                    batch_tokens: int = 4096, protocol: str = "throughout", progress: bool = True,
                    meter: Meter | None = None, num_fewshot: int = 0) -> dict:
    """Zero-shot accuracy of ``model`` through ``method`` on ``task`` (a name of ``kvlab.data.TASKS`` or a list
    of ``MCItem``); ``num_fewshot`` solved examples before each context (:func:`kvlab.data.tasks.with_fewshot`). ``limit`` items (seeded subset, clamped to the split size). Returns a dict with ``acc``,
    ``acc_norm``, ``n``, ``stderr_acc``, ``stderr_acc_norm``, ``chance`` (mean 1 / choices), ``acc_ci95`` (Wilson),
    ``p_vs_chance`` and ``above_chance`` (one-sided binomial test of ``acc`` at this ``n``, 5 %), ``task``, ``protocol``, meter figures, and
    ``records``: a DataFrame with one row per item (drop it before JSON)."""
    check_protocol(protocol)
    if isinstance(task, str):
        from .. import data

        if task not in data.TASKS:
            raise ValueError(f"unknown task {task!r}; allowed: {', '.join(data.TASKS)}")
        if limit is not None:
            from ..data.tasks import task_size

            limit = min(int(limit), task_size(task))
        items, name = data.load_task(task, limit=limit, seed=seed), task
    else:
        items = list(task)[:limit] if limit is not None else list(task)
        name = items[0].task if items else "<items>"
    if not items:
        raise ValueError(f"task {name!r} gave no items")
    if num_fewshot:
        from ..data.tasks import with_fewshot

        items = with_fewshot(items, num_fewshot, seed=seed + 1234)
    pairs = [encode_pair(tokenizer, ctx, cont) for item in items for ctx, cont in item.requests]
    own = Meter()
    start = time.perf_counter()
    scored = loglikelihood_tokens(model, method, pairs, batch_tokens=batch_tokens, pad_id=pad_id_of(tokenizer),
                                  protocol=protocol, progress=progress, meter=own)
    own.seconds = time.perf_counter() - start
    if meter is not None:
        meter.add(own)
    metrics, frame = score_items(items, [s[0] for s in scored], [s[1] for s in scored])
    unique = len({p[0] for p in pairs})
    return {**metrics, "task": name, "protocol": protocol, "num_fewshot": num_fewshot, "requests": len(pairs),
            "unique_contexts": unique,
            **own.as_dict(), "records": frame}
