"""Intervals and tests the yardsticks report: Wilson intervals for proportions, a one-sided binomial test against
chance, t and bootstrap intervals over documents for perplexity.

    wilson(7, 12)                           # (low, high) 95 % interval of a proportion of 7 / 12
    chance_test(correct=61, n=100, chance=0.5)   # {chance, p_value, above_chance, ...}
    ppl_interval(doc_nll, doc_tokens)      # perplexity and its 95 % interval over documents (t or bootstrap)

A task "separates" only if the full model is above chance on it: averages and retention figures use those tasks
alone (:func:`above_chance_tasks`), and tables mark the others.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ALPHA = 0.05  # one-sided level of the test against chance; intervals are 1 - ALPHA two-sided (95 %)


def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def wilson(successes: int | float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (low, high) of a proportion ``successes / n`` at confidence ``level``."""
    if n < 1:
        raise ValueError(f"n must be >= 1 to give an interval, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_level(n_choices: Sequence[int]) -> float:
    """Expected accuracy of a uniform random guess over items with ``n_choices`` options each."""
    if len(n_choices) == 0 or min(n_choices) < 1:
        raise ValueError(f"n_choices must be a non-empty list of positive counts, got {list(n_choices)[:5]}")
    return float(np.mean([1.0 / k for k in n_choices]))


def chance_test(correct: int, n: int, chance: float, alpha: float = ALPHA) -> dict:
    """One-sided exact binomial test of ``correct`` of ``n`` against the guessing rate ``chance``.

    ``above_chance`` is True when p < ``alpha``; ``min_correct`` is the fewest correct answers of ``n`` that would
    pass (so a table can say how far a task is from separating)."""
    from scipy.stats import binom, binomtest

    if not 0 < chance < 1:
        raise ValueError(f"chance must be in (0, 1), got {chance}")
    correct = int(round(correct))
    p_value = float(binomtest(correct, n, chance, alternative="greater").pvalue)
    min_correct = int(binom.isf(alpha, n, chance)) + 1  # P(X >= min_correct) <= alpha
    low, high = wilson(correct, n)
    return {"chance": chance, "correct": correct, "n": n, "acc": correct / n, "ci95": [low, high],
            "p_value": p_value, "alpha": alpha, "above_chance": p_value < alpha, "min_correct": min_correct}


def above_chance_tasks(full_result: dict) -> list[str]:
    """Names of the tasks an :func:`kvlab.eval.run.evaluate` result of the *full* model is above chance on."""
    return [name for name, r in full_result.get("tasks", {}).items() if r.get("above_chance")]


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of ``values`` (one value per document)."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"an interval over documents needs at least 2 documents, got {x.size}")
    mean = float(x.mean())
    half = float(t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def bootstrap_interval(values: Sequence[float], level: float = 0.95, *, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of ``values`` over documents."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"an interval over documents needs at least 2 documents, got {x.size}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(lo), float(hi)


def ppl_interval(doc_nll: Sequence[float], level: float = 0.95, *, method: str = "t") -> dict:
    """Perplexity exp(mean NLL) over documents with a ``level`` interval of the mean per-document NLL (``method``
    "t" or "bootstrap"), exponentiated. Documents weigh equally (each scores the same number of tokens here)."""
    if method == "t":
        mean, lo, hi = t_interval(doc_nll, level)
    elif method == "bootstrap":
        mean, lo, hi = bootstrap_interval(doc_nll, level)
    else:
        raise ValueError(f"unknown interval method {method!r}; allowed: t, bootstrap")
    return {"ppl": math.exp(mean), "ci95": [math.exp(lo), math.exp(hi)], "nll": mean, "interval": method,
            "n_docs": len(doc_nll)}


def paired_ratio_interval(nll: Sequence[float], ref_nll: Sequence[float], level: float = 0.95) -> dict:
    """Perplexity ratio method / reference on the same documents, with a t interval of the paired per-document NLL
    difference (narrower than the two separate intervals: both see the same documents)."""
    a, b = np.asarray(nll, dtype=np.float64), np.asarray(ref_nll, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired documents differ in number: {a.shape} vs {b.shape}")
    mean, lo, hi = t_interval(a - b, level)
    return {"ratio": math.exp(mean), "ci95": [math.exp(lo), math.exp(hi)], "n_docs": int(a.size)}
