"""``evaluate``: the one entry the CLI calls; runs perplexity, zero-shot and long-context tasks through a method.

Bytes (``kv_bytes`` and ``budget``): every cache the run creates (one per batch) is accounted once, after its last
forward, with :func:`kvlab.budget.kv_bytes`; ``full``, ``theoretical`` and ``measured`` are *sums over all those
caches*. ``budget = measured / full`` is therefore the fraction of the full cache's bytes the method really held,
weighted by how many token-slots each cache covered, on exactly the work evaluated (methods compared on the same
tasks/limit/seed see the same workload, so their budgets are comparable). Each evaluation carries its own
``kv_bytes`` as well. ``budget_nominal`` is the method's requested budget; ``budget_theoretical`` the exact-entries
figure without allocator slack.
"""

from __future__ import annotations

import math
import time

from .forward import Meter
from .continuation import continuation_ppl
from .longcontext import LONG_TASKS, SETTINGS, long_context
from .multiple_choice import multiple_choice
from .perplexity import check_protocol, perplexity


CONTINUATION = "continuation"  # perplexity of the next tokens after a compressed context of ``context_len`` tokens


def allowed_tasks() -> tuple[str, ...]:
    from ..data import TASKS

    return tuple(TASKS) + LONG_TASKS + (CONTINUATION,)


def allowed_corpora() -> tuple[str, ...]:
    from ..data.text import TEXT_NAMES

    return tuple(TEXT_NAMES)


def check_names(tasks=(), ppl=()) -> None:
    """ValueError naming what is allowed, for unknown task or corpus names."""
    bad = [t for t in tasks if t not in allowed_tasks()]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, bad))}; allowed: {', '.join(allowed_tasks())}")
    bad = [c for c in ppl if c not in allowed_corpora()]
    if bad:
        raise ValueError(f"unknown corpus/corpora {', '.join(map(repr, bad))}; allowed: {', '.join(allowed_corpora())}")


def jsonable(value):
    """JSON-ready copy: NaN/inf -> None, tuples -> lists, unknown objects -> a short repr."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return jsonable(value.item())
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _drop(result: dict, *keys) -> dict:
    return {k: v for k, v in result.items() if k not in keys}


def evaluate(model, tokenizer, method, *, tasks=(), ppl=(), limit: int | None = None, context_len: int = 2048,
             seed: int = 0, progress: bool = True, protocol: str = "throughout", chunk_len: int = 512,
             batch_size: int = 4, batch_tokens: int = 4096, long_n: int = 10, long_settings=SETTINGS,
             max_new_tokens: int = 32, prompt: str = "chat", num_fewshot: int = 0,
             continuation_len: int = 256, continuation_docs: int = 24) -> dict:
    """Evaluate ``model`` through ``method``; a JSON-ready dict (see the module docstring for bytes).

    ``tasks``: zero-shot names of ``kvlab.data.TASKS`` and/or ``needle``, ``longqa``, ``continuation`` (wiki
    continuation perplexity of ``continuation_len`` tokens after a compressed ``context_len``-token context, over
    ``limit or continuation_docs`` documents, with a 95 % interval); ``ppl``: corpora (``wiki``,
    ``c4``). ``limit`` bounds items per zero-shot task (seeded subset), perplexity chunks (the first ``limit``
    chunks of the eval split) and long-context items (default ``long_n``). ``protocol`` applies to perplexity and
    zero-shot tasks (``num_fewshot`` solved examples before each item, drawn from the items not evaluated);
    long-context tasks always prefill, compress, then generate (``context``) and run each of
    ``long_settings`` (their ``acc``/``n`` at the top are the first setting's, every setting is under
    ``settings``).
    """
    tasks, ppl = list(tasks), list(ppl)
    check_names(tasks, ppl)
    check_protocol(protocol, method)
    bad = [s for s in long_settings if s not in SETTINGS]
    if bad or not long_settings:
        raise ValueError(f"long_settings must be a non-empty subset of {SETTINGS}, got {long_settings}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    method.prepare(model, tokenizer)  # fits on the default calibration data if the method needs it
    meter = Meter()
    start = time.perf_counter()
    out_ppl, out_tasks = {}, {}
    for corpus in ppl:
        n_chunks = limit
        if limit is not None:
            from ..data.text import tokenize_split

            n_chunks = min(limit, tokenize_split(corpus, tokenizer, split="eval").numel() // chunk_len)
        out_ppl[corpus] = perplexity(model, tokenizer, method, corpus, chunk_len=chunk_len, n_chunks=n_chunks,
                                     batch_size=batch_size, protocol=protocol, progress=progress, meter=meter)
    for task in tasks:
        if task == CONTINUATION:
            out_tasks[task] = continuation_ppl(model, tokenizer, method, context_len=context_len,
                                               continuation_len=continuation_len, n_docs=limit or continuation_docs,
                                               progress=progress, meter=meter)
        elif task in LONG_TASKS:
            per = {}
            for setting in long_settings:
                r = long_context(model, tokenizer, method, task, context_len=context_len, n=limit or long_n,
                                 setting=setting, max_new_tokens=max_new_tokens, seed=seed, prompt=prompt,
                                 progress=progress, meter=meter)
                per[setting] = _drop(r, "task")
            first = per[long_settings[0]]
            out_tasks[task] = {"acc": first["acc"], "n": first["n"], "setting": long_settings[0],
                               "context_len": context_len, "protocol": "context", "prompt": prompt,
                               "settings": per}
        else:
            r = multiple_choice(model, tokenizer, method, task, limit=limit, seed=seed, batch_tokens=batch_tokens,
                                protocol=protocol, progress=progress, meter=meter, num_fewshot=num_fewshot)
            out_tasks[task] = _drop(r, "records", "task")
    seconds = time.perf_counter() - start
    kv = meter.kv_dict()
    result = {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "method": method.name,
        "budget": kv["budget"],
        "budget_nominal": getattr(method, "budget", None),
        "budget_theoretical": kv["theoretical_budget"],
        "options": method.options() if hasattr(method, "options") else {},
        "artefact": (getattr(method, "provenance", None) or {}).get("loaded_from"),  # fitted tensors used, if loaded
        "protocol": protocol,
        "tasks": out_tasks,
        "ppl": out_ppl,
        "kv_bytes": kv,
        "seconds": seconds,
        "tokens_forwarded": meter.tokens,
        "tokens_per_second": meter.tokens / seconds if seconds else None,
        "settings": {"limit": limit, "seed": seed, "context_len": context_len, "chunk_len": chunk_len,
                     "batch_size": batch_size, "batch_tokens": batch_tokens, "long_settings": list(long_settings),
                     "max_new_tokens": max_new_tokens, "prompt": prompt,
                     "num_fewshot": num_fewshot, "continuation_len": continuation_len},
    }
    return jsonable(result)
