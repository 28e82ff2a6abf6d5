# %% [markdown]
# # 07 · The papers' headline tables, with our numbers
#
# Each of the four papers kvlab reproduces has a headline table. This notebook lays our measurements out the same
# way, same rows and columns where our data allows, and names every substitution: the model (SmolLM2-135M
# instead of the papers' GPT-2, TinyLLaMA and 7B-70B models), the datasets (bundled substitutes for WikiText-2,
# C4 and LongBench), the evaluation protocol and the budget definition. It measures nothing itself: every number
# comes from the results JSON another notebook wrote (`kvlab.report.load_results`) or is computed from it
# (`kvlab.papers`); none is typed in. The only numbers of the papers shown are their own headline sentences,
# quoted verbatim from their abstracts with the URL they were read from; the cells of the papers' tables could not
# be read from a stored source, so they are not shown (and table numbers are not claimed).
#
# | paper | its table | our notebook |
# |---|---|---|
# | MatryoshkaKV (Lin et al., ICLR 2025) | quality vs KV cache budget, PCA vs trained projections | 02 |
# | KV-CAR (Roy et al., 2025) | memory reduction vs perplexity and zero-shot accuracy | 03 |
# | KV-Compress (Rehg, 2024) | quality vs compression rate; memory and batch size | 05 |
# | Attention-Gate (Zeng et al., 2024) | Attention-Gate vs StreamingLLM / H2O at an eviction ratio | 04 |
#
# Read the tables against the model's own full cache, never against the papers' absolute numbers: the model
# differs, its 4-bit weights are dequantised, and the test sets differ.
#
# Where the results come from: the results folder of this run (`reports/results/` under `make report`). In QUICK
# mode a missing notebook's results are produced by running it in QUICK mode first; in full mode a missing one is
# an error that names the notebook to run. Results made in the other mode are used with a warning, shown in the
# table's caption.

# %% tags=["parameters", "run-after-others"]
QUICK = False
MODEL = "smollm2"  # the model whose notebook results are read (each notebook's own MODEL parameter)
RUN_MISSING = None  # None: run a missing notebook in QUICK mode only when QUICK; True / False to force
SHOW_DECODE_SPEED = True  # add notebook 06's decode-speed table when its results exist

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from kvlab import papers
from kvlab.plotting import budget_axis, savefig, use_style
from kvlab.report import load_results, results_dir, save_results

use_style()
pd.set_option("display.max_colwidth", None)
print(f"reading results from {results_dir()} ({'QUICK' if QUICK else 'full'} mode)")
results = {nb: papers.load_notebook_results(nb, quick=QUICK, run_missing=RUN_MISSING)
           for nb in ("02_pca_vs_trained", "03_layer_similarity_reuse", "04_attention_score_bias",
                      "05_paged_eviction")}
mismatched = {nb: papers.quick_mismatch(r, nb, QUICK) for nb, r in results.items()}
for nb, r in results.items():
    if r.get("model") not in (None, MODEL):
        mismatched[nb] = (mismatched[nb] + "; " if mismatched[nb] else "") + (
            f"{nb} results are for model {r.get('model')!r}, not MODEL={MODEL!r}: run it with MODEL={MODEL!r}")
for nb, text in mismatched.items():
    if text:
        print(f"WARNING: {text}")
pd.DataFrame({nb: {"quick": r.get("quick"), "model": r.get("model")} for nb, r in results.items()}).T


def show(table: papers.PaperTable) -> None:
    """The table, then its caption (warning, notes, substitutions, the paper's own claim)."""
    if table.warning:
        display(Markdown(f"**WARNING:** {table.warning}"))
    display(table.frame.round(3))
    display(Markdown("\n".join(
        [f"*Mirrors* {table.mirrors}.", ""] + [f"- {note}" for note in table.notes] + [""]
        + [f"- **{aspect}**: {text}" for aspect, text in table.substitutions.items()] + [""]
        + [f"> The paper: \"{c.text}\" ([source]({c.url}))" for c in table.claims])))


tables = []

# %% [markdown]
# ## MatryoshkaKV: quality vs cache budget (notebook 02)
# The paper's main table sets PCA projections against the trained MatryoshkaKV projections at a range of KV cache
# budgets (uniform and searched per-head rates), in zero-shot accuracy of a 7B model. Here: the same variants and
# budgets on SmolLM2, as wiki perplexity relative to the full cache (the notebook measures perplexity, not
# zero-shot accuracy), plus the two training schedules notebook 02 compares; the bytes are measured at 50 %.

# %%
table = papers.matryoshkakv(results["02_pca_vs_trained"], quick=QUICK)
tables.append(table)
show(table)

# %% [markdown]
# ## KV-CAR: memory reduction vs perplexity and accuracy (notebook 03)
# The paper reports, for GPT-2 and TinyLLaMA, the KV cache memory reduction of its autoencoder, of cross-layer
# reuse and of both, next to perplexity (WikiText, C4) and zero-shot accuracy (PIQA, WinoGrande). Same rows and
# columns here, with the memory reduction measured from the bytes the caches really held; the absolute perplexity
# is recomputed as (ratio to full) x (full-cache perplexity) from notebook 03's results.

# %%
table = papers.kvcar(results["03_layer_similarity_reuse"], quick=QUICK)
tables.append(table)
show(table)

# %% [markdown]
# ## KV-Compress: quality vs compression rate (notebook 05)
# The paper compares methods across compression rates on LongBench. Our long-context task is needle retrieval in
# wiki haystacks (in both settings: the question inside the compressed context, or asked after), every method
# at every rate, with the measured budget of each run.

# %%
table = papers.kvcompress_quality(results["05_paged_eviction"], quick=QUICK)
tables.append(table)
show(table)

# %% [markdown]
# ## KV-Compress: physical memory and max batch vs compression rate (notebook 05)
# The paper's point: evicting whole blocks of a paged cache makes the physical memory follow the theoretical
# saving, so more sequences fit and vLLM's throughput grows with the batch. We have no GPU serving stack: the
# table shows measured / theoretical bytes (paged, and the same per-head budgets in a dense padded layout) and the
# largest batch that fits a fixed KV memory budget, the quantity the paper's throughput comes from.

# %%
table = papers.kvcompress_memory(results["05_paged_eviction"], quick=QUICK)
tables.append(table)
show(table)

# %% [markdown]
# ## Attention-Gate vs StreamingLLM / H2O (notebook 04)
# The paper compares Attention-Gate, after continual pre-training, with StreamingLLM and H2O at an eviction ratio,
# by accuracy per task and on average. Here at three budgets, under "compress the context, then continue" (and
# the gate also in context, "throughout"), with the continuation's perplexity and the measured budget: the
# training-free methods keep the continuation tokens, the gate does not, so equal nominal budgets are not equal
# bytes.

# %%
table = papers.attention_gate(results["04_attention_score_bias"], quick=QUICK)
tables.append(table)
show(table)

# %% [markdown]
# ## Decode speed (notebook 06, when its results exist)
# None of the papers' speed numbers can be compared on this CPU; notebook 06's decode-speed measurements are shown
# beside their bytes bound only when its results are present (it is not run from here).

# %%
decode = None
if SHOW_DECODE_SPEED:
    try:
        decode_results = load_results("06_kernels")
    except FileNotFoundError as exc:
        print(f"skipped: {exc}")
    else:
        decode = papers.decode_speed(decode_results, quick=QUICK)
        tables.append(decode)
        show(decode)

# %% [markdown]
# ## One figure: our headline curves
# Each panel is one paper's headline trade-off on SmolLM2, against the measured (or nominal, where only that
# exists) budget, from the tables above.

# %%
fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
mkv = tables[0].frame
budget_cols = [c for c in mkv.columns if c.endswith("%") and "@" not in c]
xs = [float(c.rstrip(" %")) / 100 for c in budget_cols]
for row in ("PCA (uniform ranks)", "MatryoshkaKV (uniform ranks)", "MatryoshkaKV (searched ranks)"):
    if row in mkv.index:
        axes[0].plot(xs, mkv.loc[row, budget_cols].astype(float), marker="o", label=row)
axes[0].set(yscale="log", ylabel="wiki ppl / full", title="MatryoshkaKV (02)")
budget_axis(axes[0], label="feature budget (nominal)")
kv = tables[1].frame.drop(index="full cache")
for prefix, rows in kv.groupby(kv.index.str.split(" @ ").str[0], sort=False):
    axes[1].plot(1 - rows["memory reduction (measured)"], rows["wiki ppl / full"], marker="o", label=prefix)
axes[1].set(yscale="log", ylabel="wiki ppl / full", title="KV-CAR (03)")
budget_axis(axes[1], label="measured budget")
mem = tables[3].frame
rates = [int(r.rstrip("x")) for r in mem.index]
for col in [c for c in mem.columns if c.startswith("max batch")]:
    axes[2].plot(rates, mem[col], marker="o", label=col.removeprefix("max batch: "))
axes[2].set(yscale="log", xlabel="compression rate", ylabel="sequences that fit", title="KV-Compress (05): max batch")
axes[2].set_xscale("log", base=2)
axes[2].set_xticks(rates, [f"{r}x" for r in rates])
axes[2].minorticks_off()
ag = tables[4].frame.drop(index="full cache")
for prefix, rows in ag.groupby(ag.index.str.split(" @ ").str[0], sort=False):
    axes[3].plot(rows["measured budget (ppl run)"], rows["wiki ppl / full"], marker="o", label=prefix)
axes[3].set(ylabel="continuation ppl / full", title="Attention-Gate vs StreamingLLM / H2O (04)")
budget_axis(axes[3], label="measured budget (ppl run)")
for ax in axes:
    ax.legend(fontsize=7)
fig.tight_layout()
key_figure = savefig(fig, "headline_curves")

# %%
save_results({
    "quick": QUICK,
    "sources": {nb: {"quick": r.get("quick"), "model": r.get("model"), "mismatch": mismatched[nb]}
                for nb, r in results.items()},
    "decode_speed_shown": decode is not None,
    "tables": [papers.table_json(t) for t in tables],
    "substitutions": {t.key: t.substitutions for t in tables},
    "paper_claims": {t.key: [{"text": c.text, "url": c.url} for c in t.claims] for t in tables},
    "key_figure": key_figure.name,
})
pd.Series({t.title: f"{t.frame.shape[0]} rows x {t.frame.shape[1]} columns" for t in tables})
