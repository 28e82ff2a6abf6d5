"""Evaluation harness: every method is evaluated by the same batched code, through its own cache.

    perplexity(model, tok, method, "wiki", chunk_len=512, n_chunks=8)          # {ppl, nll, tokens, ...}
    multiple_choice(model, tok, method, "piqa", limit=200)                     # {acc, acc_norm, n, records, ...}
    long_context(model, tok, method, "needle", context_len=2048, setting="query_agnostic")   # {acc, n, ...}
    evaluate(model, tok, method, tasks=["piqa", "needle"], ppl=["wiki"], limit=50)          # JSON-ready dict
    continuation_ppl(model, tok, method, context_len=2048, continuation_len=256, n_docs=24)   # {ppl, ci95, ...}
    needle_grid(model, tok, method, lengths=(1024, 2048), depths=(0.1, 0.5, 0.9))  # one row per needle

Statistics (``kvlab.eval.stats``): chance level and a binomial test per zero-shot task (``above_chance``), Wilson
intervals for proportions, t / bootstrap intervals over documents for perplexity.

Protocols: ``throughout`` (one teacher-forced pass whose every attention read goes through the method's cache)
and ``context`` (prefill the context, ``method.compress``, then score / generate). See each module's docstring.
"""

from .continuation import continuation_ppl
from .forward import Meter
from .longcontext import SETTINGS, build_prompt, greedy_generate, long_context
from .needle_grid import needle_grid, summarise
from .multiple_choice import encode_pair, loglikelihood_tokens, multiple_choice, naive_loglikelihood_tokens
from .perplexity import PROTOCOLS, chunk_nll, perplexity
from .run import allowed_tasks, evaluate

__all__ = ["continuation_ppl", "needle_grid", "summarise", "Meter", "SETTINGS", "PROTOCOLS", "build_prompt", "greedy_generate", "long_context", "encode_pair",
           "loglikelihood_tokens", "multiple_choice", "naive_loglikelihood_tokens", "chunk_nll", "perplexity",
           "allowed_tasks", "evaluate"]
