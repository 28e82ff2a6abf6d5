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
# Where the results come from: the results folder of this run (`reports/results/` under `make report`, which runs
# this notebook after the others). A missing notebook's results are an error that names the notebook to run;
# results made in the other mode are used with a warning, shown in the table's caption.

# %% tags=["parameters", "run-after-others"]
QUICK = False
MODEL = "smollm2"  # the model whose notebook results are read (each notebook's own MODEL parameter)
SHOW_DECODE_SPEED = True  # add notebook 06's decode-speed table when its results exist

# %%
import pandas as pd
from IPython.display import Markdown, display

from kvlab import papers
from kvlab.plotting import savefig, use_style
from kvlab.report import load_results, results_dir, save_results

use_style()
pd.set_option("display.max_colwidth", None)
print(f"reading results from {results_dir()} ({'QUICK' if QUICK else 'full'} mode)")
results = {nb: papers.load_notebook_results(nb) for key, nb in papers.NOTEBOOKS.items() if key != "decode_speed"}
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



# %% [markdown]
# ## The tables
# - **MatryoshkaKV (notebook 02)**: the paper sets PCA against trained MatryoshkaKV projections at a range of cache
#   budgets (uniform and searched per-head rates), in zero-shot accuracy of a 7B model. Here: the same variants and
#   budgets on SmolLM2 as wiki perplexity relative to the full cache, plus the two training schedules notebook 02
#   compares; bytes measured at 50 %.
# - **KV-CAR (notebook 03)**: memory reduction of the autoencoder, of cross-layer reuse and of both, beside
#   perplexity (wiki, c4) and zero-shot accuracy (PIQA, WinoGrande); the memory reduction is measured from the bytes
#   the caches really held, absolute perplexity recomputed as (ratio to full) x (full-cache perplexity).
# - **KV-Compress, quality vs rate (notebook 05)**: the paper uses LongBench; ours is needle retrieval in wiki
#   haystacks, question inside the compressed context or asked after, with the measured budget of each run.
# - **KV-Compress, physical memory and max batch (notebook 05)**: evicting whole blocks makes physical memory follow
#   the theoretical saving, so more sequences fit. No GPU serving stack here: measured / theoretical bytes (paged,
#   and the same per-head budgets in a dense padded layout) and the largest batch that fits a fixed KV memory.
# - **Attention-Gate vs StreamingLLM / H2O (notebook 04)**: at three budgets under "compress the context, then
#   continue" (the gate also in context, "throughout"), continuation perplexity and measured budget: the
#   training-free methods keep the continuation tokens, the gate does not, so equal nominal budgets are not equal
#   bytes.

# %%
tables = papers.build_all(results, quick=QUICK)
for table in tables:
    display(Markdown(f"### {table.title} (notebook {table.notebook})"))
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
key_figure = savefig(papers.headline_figure(tables), "headline_curves")

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
