"""Evaluation harness: every method is evaluated by the same batched code, through its own cache.

    perplexity(model, tok, method, "wiki", chunk_len=512, n_chunks=8)          # {ppl, nll, tokens, ...}
    multiple_choice(model, tok, method, "piqa", limit=200)                     # {acc, acc_norm, n, records, ...}
    long_context(model, tok, method, "needle", context_len=2048, setting="query_agnostic")   # {acc, n, ...}
    evaluate(model, tok, method, tasks=["piqa", "needle"], ppl=["wiki"], limit=50)          # JSON-ready dict

Protocols: ``throughout`` (one teacher-forced pass whose every attention read goes through the method's cache)
and ``context`` (prefill the context, ``method.compress``, then score / generate). See each module's docstring.
"""

from .forward import Meter
from .longcontext import SETTINGS, build_prompt, greedy_generate, long_context
from .multiple_choice import encode_pair, loglikelihood_tokens, multiple_choice, naive_loglikelihood_tokens
from .perplexity import PROTOCOLS, chunk_nll, perplexity
from .run import allowed_tasks, evaluate

__all__ = ["Meter", "SETTINGS", "PROTOCOLS", "build_prompt", "greedy_generate", "long_context", "encode_pair",
           "loglikelihood_tokens", "multiple_choice", "naive_loglikelihood_tokens", "chunk_nll", "perplexity",
           "allowed_tasks", "evaluate"]
