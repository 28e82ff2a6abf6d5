# %% [markdown]
# # 08 · Composing axes: projected features × token eviction under one byte budget
#
# Every paper compresses one axis of the KV cache. kvlab can apply methods on different axes **through one cache**:
# `composed` stores each kept token as its codes on the PCA (or MatryoshkaKV) bases at rank r = f·D, and a token
# method (H2O, SnapKV, StreamingLLM) decides which tokens each kv head keeps, from the attention the compressed model
# computes. One overall budget b (fraction of the full cache's bytes) is split between the axes: the rank fraction f
# and the token fraction b / f. Section 1 searches f on calibration text (perplexity of a continuation after
# compressing the context), section 2 puts compositions and single methods on one frontier of quality vs the bytes
# the caches **measured**, section 3 checks the target: at 1/8 of the full cache's bytes, a composition keeps ≥ 90 %
# of the full cache's average accuracy and beats every single method at the same bytes.
#
# Quality: average accuracy over multiple-choice tasks, `FEWSHOT`-shot (solved examples drawn from validation items
# that are not evaluated), so the prompt that is compressed is a few hundred tokens long; protocol "context" (prefill
# the prompt, compress it, score the answers). Bytes: `kv_bytes()` of every cache of the run, answers included
# (token methods keep the answer tokens they are fed; the composition keeps them as codes).

# %% tags=["parameters"]
QUICK = False
MODEL = "smollm2"
TASKS = ("arc_easy", "piqa")
LIMIT = 100  # items per task (seeded subset of the validation split)
FEWSHOT = 5
TARGET_BUDGET = 0.125  # measured fraction of the full cache's bytes
SINGLES = {"pca": (0.25, 0.125), "matryoshka": (0.25, 0.125), "h2o": (0.25, 0.125, 0.0625),
           "snapkv": (0.125, 0.0625)}  # method -> nominal budgets
TOKEN_OPTIONS = {"h2o": {"decode": True}}  # H2O evicts the answer tokens too (the paper's generation setting)
COMPOSITIONS = {("matryoshka", "h2o"): (0.25, 0.125, 0.0625), ("pca", "h2o"): (0.125,)}  # (feature, token): budgets
PRECISION = {  # compositions with the precision axis (notebook 09), fixed splits: label -> (options, budgets)
    "h2o x 4-bit": ({"feature": None, "token": "h2o", "bits": 4}, (0.125,)),
    "pca x h2o x 4-bit": ({"feature": "pca", "token": "h2o", "bits": 4, "feature_budget": 0.5}, (0.125, 0.0625)),
}
SINGLES_PRECISION = {"quant": (0.3125, 0.1875)}  # nominal bf16 budgets -> 4 and 2 bits (groups of 32)
SPLITS = (0.25, 0.375, 0.5, 0.75, 1.0)  # rank fractions f tried by the split search (those >= the budget)
SPLIT_CHUNKS = 2  # wiki calibration chunks of SPLIT_LEN tokens for the split search
SPLIT_LEN = 512
SEED = 0

# %%
if QUICK:
    LIMIT, SINGLES, COMPOSITIONS = 12, {"pca": (0.125,), "h2o": (0.25, 0.125)}, {("pca", "h2o"): (0.125,)}
    PRECISION, SINGLES_PRECISION = {}, {}
    SPLITS, SPLIT_CHUNKS, SPLIT_LEN = (0.25, 0.5, 1.0), 1, 256

import time

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

import kvlab
from kvlab.eval import frontier
from kvlab.methods import Composed, get
from kvlab.methods.feature_x_token import search_split
from kvlab.plotting import savefig, use_style
from kvlab.report import save_results

use_style()
torch.manual_seed(SEED)
T_START = time.perf_counter()
model, tok = kvlab.load_model(MODEL)
spec = kvlab.ModelSpec.from_model(model)
seconds = {}
features = {name: get(name).prepare(model, tok) for name in dict.fromkeys(f for f, _ in COMPOSITIONS)}  # shipped
print(f"{MODEL}: {spec.n_layers} layers x {spec.n_kv_heads} kv heads x head_dim {spec.head_dim}; "
      f"{torch.get_num_threads()} threads; feature bases: "
      + ", ".join(f"{n} ({m.provenance.get('loaded_from', 'fitted here')})" for n, m in features.items()))

# %% [markdown]
# ## 1 · Splitting one budget between the axes
# For each composition and budget b: every rank fraction f in `SPLITS` with f ≥ b (the token method keeps b / f of
# the context's tokens). Score: perplexity of the last quarter of `SPLIT_CHUNKS` wiki *calibration* chunks after
# compressing the first three quarters — data the evaluation below never sees. H2O runs with `decode=True`, so the
# scored tokens are evicted back to the budget too and every split holds the same bytes at the end (without it, f = 1
# would keep the whole continuation at full size and win by holding more). The split with the lowest perplexity is
# kept.

# %%
tic = time.perf_counter()
searches, chosen = [], {}
for (feature, token), budgets in COMPOSITIONS.items():
    for budget in budgets:
        best, table = search_split(model, tok, budget, feature=feature, token=token,
                                   splits=[f for f in SPLITS if f >= budget - 1e-12], n_chunks=SPLIT_CHUNKS,
                                   chunk_len=SPLIT_LEN, prepared=features[feature],
                                   token_options=TOKEN_OPTIONS.get(token, {}))
        searches.append(table.assign(composition=f"{feature} x {token}", budget=budget))
        chosen[feature, token, budget] = best
search_table = pd.concat(searches, ignore_index=True)
seconds["split search"] = time.perf_counter() - tic
fig, ax = plt.subplots(figsize=(6.5, 3.8))
sns.lineplot(search_table, x="feature_budget", y="ppl", hue="composition", style="budget", markers=True, ax=ax)
ax.set_yscale("log")
ax.set_xlabel("rank fraction f = r / D (token fraction = budget / f)")
ax.set_ylabel("continuation perplexity (wiki calib)")
ax.set_title("Where to spend the bytes: features or tokens")
savefig(fig, "split_search")
display(search_table.round(3))

# %% [markdown]
# ## 2 · One frontier: single methods and compositions
# The full cache, each single method at its budgets (PCA and MatryoshkaKV: the shipped bases at uniform rank b·D;
# H2O: b of the tokens, answers evicted too; SnapKV: b of the prompt's tokens, answers kept), and each composition at
# its searched split, all evaluated on the same items. x: the measured budget (what the caches held at the end,
# answers included), so a method that keeps the answers in full sits to the right of its nominal budget.

# %%
tic = time.perf_counter()
families = {"full cache": [get("full")]}
for name, budgets in SINGLES.items():
    families[name] = [get(name, budget=b, **TOKEN_OPTIONS.get(name, {})).prepare(model, tok) for b in budgets]
for (feature, token), budgets in COMPOSITIONS.items():
    families[f"{feature} x {token}"] = [chosen[feature, token, b] for b in budgets]
for name, budgets in SINGLES_PRECISION.items():
    families[name] = [get(name, budget=b) for b in budgets]
for label, (options, budgets) in PRECISION.items():
    families[label] = [Composed(budget=b, token_options=TOKEN_OPTIONS.get(options["token"], {}),
                                feature_method=features.get(options["feature"]), **options).prepare(model, tok)
                       for b in budgets]
grid = frontier.run_grid(model, tok, families, tasks=TASKS, limit=LIMIT, num_fewshot=FEWSHOT, seed=SEED)
seconds["grid"] = time.perf_counter() - tic
full_acc = float(grid.loc[grid["family"] == "full cache", "avg_acc"].iloc[0])
points = grid[grid["family"] != "full cache"]
fig = frontier.plot_frontier(points, full_acc=full_acc)
fig.axes[0].set_title(f"{MODEL}: average accuracy ({', '.join(TASKS)}, {FEWSHOT}-shot, n = {LIMIT} each) vs bytes")
key_figure = savefig(fig, "frontier")
columns = ["family", "budget_nominal", "budget_measured", "feature_budget", "token_budget", *TASKS, "avg_acc",
           "seconds"]
display(grid.reindex(columns=columns).round(3))
display(frontier.pareto(points).reindex(columns=columns).round(3))

# %% [markdown]
# ## 3 · The target at 1/8 of the bytes
# Every family's average accuracy at a measured budget of `TARGET_BUDGET`, interpolated in log bytes between its two
# evaluated points around it (the point itself when one was evaluated within 10 % of it; NaN: the family never held
# that few bytes as evaluated). Target: the best composition that uses both axes keeps 90 % of the full cache's
# average accuracy and beats every single method there. A composition whose searched split keeps one axis whole
# (`single_axis`: rank fraction 1 or token fraction 1) *is* a single method and cannot beat one. With n items per
# task the standard error of one accuracy is about sqrt(p (1 - p) / n), ~0.05 at n = 100; `stderr_of_margin` is that
# of the difference of two such means: margins smaller than it are not evidence.

# %%
at_target = frontier.compare_at(grid[grid["family"] != "full cache"], TARGET_BUDGET, full_acc=full_acc)
target = frontier.target_met(at_target, n=LIMIT * len(TASKS))
display(at_target.round(3))
display(pd.Series(target))


# %% [markdown]
# ### Reading (full mode, 2026-12-03: n = 100 per task, 5-shot, 1 thread, 1,338 s)
# Full cache 0.635 (arc_easy 0.59, piqa 0.68). H2O (answers evicted too) holds that almost unchanged down to 1/8 of
# the bytes (0.630 at 0.126 measured) and 0.600 at 1/16; SnapKV keeps the answers, so at nominal 1/8 it holds 0.22
# of the bytes (0.585). PCA and MatryoshkaKV alone at uniform rank 1/4 or 1/8 fall to chance (0.39-0.42): a 5-shot
# prompt's tokens are mostly redundant, its features are not. So the split search (calibration perplexity) puts the
# whole budget into tokens at 1/4 and 1/8 (rank fraction 1: the composition *is* H2O, 0.630), and at 1/16 picks rank
# 3/4 by a hair (31.32 vs 31.34), which the tasks then score below H2O alone (0.55 vs 0.60). Target: 90 % of full at
# 1/8 — met, by H2O alone; a composition beating every single method — **not met** on this model and these tasks.
# The numbers above the reading are those of the run that produced this page.

# %%


def as_table(frame: pd.DataFrame, title: str, caption: str) -> dict:
    frame = frame.astype(object).where(frame.notna(), None)
    return {"title": title, "caption": caption, "columns": list(frame.columns), "rows": frame.values.tolist()}


frontier_table = grid.reindex(columns=columns[:-1]).round(4)
seconds["total"] = time.perf_counter() - T_START
results = {
    "quick": QUICK, "model": MODEL, "tasks": list(TASKS), "limit": LIMIT, "fewshot": FEWSHOT,
    "singles": {k: list(v) for k, v in SINGLES.items()},
    "compositions": {f"{f} x {t}": list(b) for (f, t), b in COMPOSITIONS.items()},
    "target_budget": TARGET_BUDGET, "full_acc": full_acc, "at_target": at_target.to_dict("records"),
    "grid": grid.to_dict("records"), "split_search": search_table.to_dict("records"),
    "target": target,
    "tables": [as_table(frontier_table, "Composition frontier (notebook 08)",
                        f"{MODEL}; {', '.join(TASKS)} {FEWSHOT}-shot, n = {LIMIT} per task; 'context' protocol; "
                        "budget_measured = bytes the caches held / full cache, answers included."),
               as_table(at_target.round(4), f"At {TARGET_BUDGET:g} of the bytes (notebook 08)",
                        "average accuracy at that measured budget (interpolated in log bytes); single_axis: the "
                        "searched split kept one axis whole, so the composition is a single method there.")],
    "seconds": seconds,
    "key_figure": key_figure.name,
}
save_results(results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
