# %% [markdown]
# # 03 · Cross-layer similarity and KV reuse (KV-CAR)
#
# KV-CAR ("KV Cache Compression using Autoencoders and KV Reuse in Large Language Models", 2025) saves cache memory
# on two axes: a per-layer **autoencoder** stores a short code of every key and value vector (feature axis,
# `kvlab.methods.KVCAR`), and **cross-layer reuse** drops a (layer, kv head) whose keys and values are close to the
# layer below's and lets attention read the layer below's entry instead (layer axis, `kvlab.methods.Reuse`). This
# notebook measures how alike the layers' keys and values are, per kv head, which heads are reuse candidates, and
# then what each half and both together (`kvlab.methods.kvcar_reuse.KVCARReuse`, method `kvcar+reuse`) cost in
# perplexity and zero-shot accuracy at the same memory, measured from the bytes the cache really holds.
#
# Similarity (`kvlab.analysis.similarity`), per kv head h and pair of layers (l, m), over the same tokens:
# *cosine* = mean over tokens of cos(x_l,h,t, x_m,h,t) (whether layer m's entry itself could stand in for layer
# l's, which is what reuse does); *linear CKA* (Kornblith et al. 2019) = ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F) with
# centred columns (whether the two carry the same information up to a rotation and scale). Keys are post-RoPE (what
# the cache stores); the first `SKIP_FIRST` positions of every sequence (attention sinks) are left out.
#
# Model: SmolLM2-135M-Instruct (30 layers, 3 kv heads of 64 dims), dequantised from a 4-bit GGUF. The paper reports
# GPT-2 and TinyLlama, neither of which can be fetched here; its numbers are quoted, not reproduced on those models.
# "wiki" and "c4" are the Wikipedia and C4-like texts bundled with exllamav3 (eval split), substitutes for
# WikiText-2 and C4 validation.

# %% tags=["parameters"]
QUICK = False
MODEL = "smollm2"
SIM_CHUNKS = 32  # calib chunks of SIM_LEN tokens for the similarity (and hence the reuse selection)
SIM_LEN = 512
SKIP_FIRST = 4  # sink positions left out of the similarity
BUDGETS = (0.75, 0.6, 0.52)  # overall fraction of the full cache's bytes kept; 0.52 ~ the paper's 47.85 %
REUSE_SHARE = 0.5  # kvcar+reuse: share of the saving asked of reuse, codes cover the rest
THRESHOLDS = (0.95, 0.9, 0.8)  # CKA thresholds for the candidate counts
CORPORA = ("wiki", "c4")
PPL_CHUNKS = 12  # eval chunks of PPL_LEN tokens per corpus
PPL_LEN = 512
TASKS = ("piqa", "winogrande")
LIMIT = 100  # items per zero-shot task (seeded subset of the validation split)
KVCAR_SOURCE = "shipped"  # "shipped" (data/kvcar/, else the default fit, ~5-8 min), a path, or "quick" (tiny fit)
SEED = 0
# issue 19, the layer axis that works: label -> (method, options), all at LAYER_BUDGET, fitted on LAYER_CALIB_CHUNKS
# x 512 wiki calib tokens (closed form, one fit per method and key mode serves every group and rank)
LAYER_BUDGET = 0.515  # codes + sink copies + positions measure <= 0.515: within the paper's 47.85 % saved
LAYER_CALIB_CHUNKS = 16
LAYER_GROUP = 30  # cross_layer: layer 0 full, every later layer predicted from the one below (best of groups 2-30)
LAYER_CONFIGS = {
    "cross_layer (pre-RoPE)": ("cross_layer", {"group": LAYER_GROUP, "map": "layer"}),
    "cross_layer, no prediction": ("cross_layer", {"group": LAYER_GROUP, "map": "none"}),
    "shared_basis g2 (pre-RoPE)": ("shared_basis", {"group": 2}),
}

# %%
if QUICK:
    SIM_CHUNKS, SIM_LEN = 4, 256
    LAYER_CALIB_CHUNKS = 2
    LAYER_CONFIGS = {k: LAYER_CONFIGS[k] for k in ("cross_layer (pre-RoPE)", "shared_basis g2 (pre-RoPE)")}
    BUDGETS = (0.75, 0.52)
    PPL_CHUNKS, PPL_LEN = 2, 256
    LIMIT = 10

import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

import kvlab
from kvlab.analysis.similarity import layer_similarity
from kvlab.eval.run import evaluate
from kvlab.methods import artefacts
from kvlab.methods.kvcar_reuse import KVCARReuse
from kvlab.methods.kvcar import KVCAR
from kvlab.methods.reuse import Reuse
from kvlab.plotting import budget_axis, heatmap, savefig, use_style
from kvlab.report import save_results

use_style()
torch.manual_seed(SEED)
model, tok = kvlab.load_model(MODEL)
spec = kvlab.ModelSpec.from_model(model)
L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
seconds = {}
print(f"{MODEL}: {L} layers x {H} kv heads, head_dim {D}; {torch.get_num_threads()} thread(s)")

# %% [markdown]
# ## Similarity of every pair of layers, per kv head
# One streaming pass over the calibration chunks accumulates, per part and kv head, the cross-covariance of all
# layers at once (`layer_similarity`); nothing per token is kept.

# %%
tic = time.perf_counter()
calib = kvlab.data.text_chunks("wiki", tok, chunk_len=SIM_LEN, n_chunks=SIM_CHUNKS, split="calib")
sim = layer_similarity(model, calib, batch_size=4, skip_first=SKIP_FIRST)
seconds["similarity"] = time.perf_counter() - tic
print(sim, f"{seconds['similarity']:.1f} s")


def off_diagonal(m: torch.Tensor, k: int) -> torch.Tensor:
    """(H, L - k): similarity of layer l + k to layer l."""
    return m.diagonal(offset=k, dim1=1, dim2=2)


distances = [k for k in (1, 2, 4, 8, 16) if k < L]
by_distance = pd.DataFrame({(metric, part): [float(off_diagonal(sim.metric(metric, part), k).mean()) for k in distances]
                            for metric in ("cka", "cosine") for part in ("keys", "values")},
                           index=pd.Index(distances, name="layer distance"))
by_distance.round(3)

# %% [markdown]
# ## Adjacent layers, per (layer, kv head)
# Row l is layer l against layer l − 1 (row 0 has nothing below it). Left two panels: linear CKA; right two: cosine
# of aligned tokens. Same colour scale per metric.

# %%
fig, axes = plt.subplots(1, 4, figsize=(15, 6), sharey=True)
adjacent = {}
for i, (metric, part) in enumerate([(m, p) for m in ("cka", "cosine") for p in ("keys", "values")]):
    a = torch.full((L, H), float("nan"), dtype=torch.float64)
    a[1:] = sim.adjacent(part, metric)
    adjacent[(metric, part)] = a
    heatmap(axes[i], a, xlabel="kv head", ylabel="layer" if i == 0 else "", cbar_label=f"{metric} to layer below",
            vmin=0 if metric == "cka" else -0.2, vmax=1, title=f"{metric}: {part}")
fig.suptitle(f"Adjacent-layer similarity ({sim.n_tokens:,} tokens per head)", y=1.0)
fig.tight_layout()
key_figure = savefig(fig, "adjacent_similarity")

# %% [markdown]
# ## Every pair of layers, for a few heads
# Linear CKA of all layer pairs for the kv head with the highest and the one with the lowest mean adjacent CKA
# (keys and values; both taken as the smaller of the two, as reuse needs both).

# %%
both_adjacent = sim.adjacent("both", "cka")  # (L - 1, H)
head_mean = both_adjacent.mean(0)
shown_heads = sorted({int(head_mean.argmax()), int(head_mean.argmin())})
fig, axes = plt.subplots(len(shown_heads), 2, figsize=(11, 4.8 * len(shown_heads)), squeeze=False)
for r, h in enumerate(shown_heads):
    for c, part in enumerate(("keys", "values")):
        heatmap(axes[r, c], sim.cka[part][h], xlabel="layer", ylabel="layer", cbar_label="linear CKA", vmin=0,
                vmax=1, title=f"kv head {h}: {part}")
fig.tight_layout()
_ = savefig(fig, "cka_layer_by_layer")

# %% [markdown]
# ## Reuse candidates
# A head is reused as a whole (keys and values), so its score is the smaller of the two. CKA is blind to rotations,
# but reuse substitutes the entry itself: a high-CKA head whose cosine is low would be a poor stand-in, so both are
# shown.

# %%
frame = Reuse(threshold=THRESHOLDS[-1], similarity=sim).to_frame(spec).query("layer > 0").copy()
frame["cka_both"] = frame[["cka_keys", "cka_values"]].min(axis=1)
frame["cosine_both"] = frame[["cosine_keys", "cosine_values"]].min(axis=1)
candidates = pd.DataFrame({
    f"CKA ≥ {t}": {"heads (both K and V)": int((frame["cka_both"] >= t).sum()),
                   "keys alone": int((frame["cka_keys"] >= t).sum()),
                   "values alone": int((frame["cka_values"] >= t).sum())} for t in THRESHOLDS}).T
candidates["bytes saved if all reused"] = (candidates["heads (both K and V)"] / (L * H)).map("{:.1%}".format)
display(candidates)
top = frame.sort_values("cka_both", ascending=False).head(12)
display(top[["layer", "head", "cka_keys", "cka_values", "cosine_keys", "cosine_values"]].round(3))

fig, ax = plt.subplots(figsize=(6, 4.5))
sns.scatterplot(data=frame, x="cka_both", y="cosine_both", hue="head", palette="colorblind", ax=ax)
ax.set(xlabel="adjacent CKA (min of keys, values)", ylabel="adjacent cosine (min of keys, values)",
       title="Information shared vs entry interchangeable")
_ = savefig(fig, "cka_vs_cosine")
cka_cos_corr = float(np.corrcoef(frame["cka_both"], frame["cosine_both"])[0, 1])
print(f"correlation of adjacent CKA and cosine over {len(frame)} (layer, head): {cka_cos_corr:.2f}")

# %% [markdown]
# ## The autoencoders
# KV-CAR's feature half: `KVCAR` with a shared linear autoencoder per layer for keys and one for values, code size
# D/4 = 16, layers compressed cheapest first by their measured KL cost. The shipped artefact (`data/kvcar/`, made by
# `kvlab fit --method kvcar --budget 0.5`) is used when present; otherwise the full run fits it with the default
# options (reconstruction, then 50 distillation steps), and QUICK runs a tiny fit (reconstruction only, layer costs
# on 128 tokens), so QUICK numbers for KV-CAR are those of an *untrained* (PCA-initialised) autoencoder.

# %%
tic = time.perf_counter()
default = KVCAR(budget=0.5)
shipped_path = artefacts.find_shipped("kvcar", model, default.options(), KVCAR.FIT_OPTIONS)
if KVCAR_SOURCE == "shipped" and shipped_path is not None:
    kvcar, kvcar_from = default.prepare(model, tok), f"shipped artefact {shipped_path.name}"
elif KVCAR_SOURCE not in ("shipped", "quick"):
    kvcar, kvcar_from = KVCAR.load(KVCAR_SOURCE), f"artefact {KVCAR_SOURCE}"
elif QUICK or KVCAR_SOURCE == "quick":
    kvcar = KVCAR(budget=0.5, steps=0, calib_chunks=2, chunk_len=256, score_chunks=1, score_chunk_len=128,
                  source=None).prepare(model, tok)
    kvcar_from = "tiny fit (2 x 256 calib tokens, no distillation, layer costs on 128 tokens)"
else:
    kvcar, kvcar_from = default.prepare(model, tok), "default fit (no shipped artefact)"
seconds["kvcar"] = time.perf_counter() - tic
print(f"KVCAR from {kvcar_from}: code dim {kvcar.autoencoders.code_dim}, {kvcar.trained_steps} distillation steps, "
      f"{seconds['kvcar']:.0f} s")
kvcar.to_frame(spec).set_index("layer")[["compressed", "score", "key_error", "value_error"]].T.round(4)

# %% [markdown]
# ## Memory vs quality
# At every overall budget (fraction of the full cache's bytes kept), three ways to get there:
#
# - **KV-CAR codes**: `KVCAR` at that budget (the same autoencoders; layers reselected by cost);
# - **reuse**: `Reuse` at that budget (the most similar adjacent heads by CKA of keys and values);
# - **both**: `kvcar+reuse`: reuse takes `REUSE_SHARE` of the saving, codes the rest; a reused head reads the layer
#   below's *decoded* entry.
#
# Protocol: compressed attention throughout (one teacher-forced forward per batch; every read goes through the cache).
# Memory reduction = 1 − measured bytes / full bytes, summed over every cache the perplexity run built
# (`cache.kv_bytes()`; sink copies of coded layers included). Zero-shot: lm-eval `acc`, seeded subsets of `LIMIT`
# items.

# %%
def methods_at(budget: float) -> dict:
    return {"KV-CAR codes": kvcar.with_budget(budget), "reuse": Reuse(budget=budget, similarity=sim),
            "both": KVCARReuse(budget=budget, reuse_share=REUSE_SHARE, kvcar=kvcar, similarity=sim)}


def run(method) -> dict:
    p = evaluate(model, tok, method, ppl=CORPORA, limit=PPL_CHUNKS, chunk_len=PPL_LEN, seed=SEED, progress=False)
    t = evaluate(model, tok, method, tasks=TASKS, limit=LIMIT, seed=SEED, progress=False)
    row = {"measured": p["budget"], "theoretical": p["budget_theoretical"],
           "tasks_measured": t["budget"], "kv_bytes": p["kv_bytes"]}
    row.update({f"ppl_{c}": p["ppl"][c]["ppl"] for c in CORPORA})
    row.update({f"tokens_{c}": p["ppl"][c]["tokens"] for c in CORPORA})
    row.update({f"acc_{task}": t["tasks"][task]["acc"] for task in TASKS})
    row.update({f"n_{task}": t["tasks"][task]["n"] for task in TASKS})
    return row


tic = time.perf_counter()
rows = [{"method": "full", "budget": 1.0, **run(kvlab.methods.get("full"))}]
plans = {}
for budget in BUDGETS:
    for name, method in methods_at(budget).items():
        rows.append({"method": name, "budget": budget, **run(method)})
        plans[(name, budget)] = method
seconds["evaluate"] = time.perf_counter() - tic
results_frame = pd.DataFrame(rows)
results_frame["reduction"] = 1 - results_frame["measured"]
full_row = results_frame.iloc[0]
for c in CORPORA:
    results_frame[f"ppl_{c} / full"] = results_frame[f"ppl_{c}"] / full_row[f"ppl_{c}"]
for task in TASKS:
    results_frame[f"Δacc_{task}"] = results_frame[f"acc_{task}"] - full_row[f"acc_{task}"]
n_items = {task: int(full_row[f"n_{task}"]) for task in TASKS}
print(f"perplexity: {PPL_CHUNKS} chunks x {PPL_LEN} tokens per corpus (eval split); zero-shot n = {n_items}; "
      f"{seconds['evaluate']:.0f} s")
shown = ["method", "budget", "measured", "theoretical", "reduction"] + [f"ppl_{c}" for c in CORPORA] + \
        [f"ppl_{c} / full" for c in CORPORA] + [f"acc_{t}" for t in TASKS]
results_frame[shown].round(4)

# %%
fig, axes = plt.subplots(1, len(CORPORA) + len(TASKS), figsize=(4.6 * (len(CORPORA) + len(TASKS)), 4.2))
compressed = results_frame[results_frame["method"] != "full"]
for ax, corpus in zip(axes, CORPORA):
    sns.lineplot(data=compressed, x="reduction", y=f"ppl_{corpus} / full", hue="method", marker="o", ax=ax)
    ax.axhline(1, color="grey", lw=0.8, ls=":", label="full cache")
    ax.set_yscale("log")
    ax.set(ylabel="perplexity / full-cache perplexity",
           title=f"{corpus} ({PPL_CHUNKS} x {PPL_LEN} tokens; full {full_row[f'ppl_{corpus}']:.2f})")
for ax, task in zip(axes[len(CORPORA):], TASKS):
    sns.lineplot(data=compressed, x="reduction", y=f"acc_{task}", hue="method", marker="o", ax=ax)
    ax.axhline(full_row[f"acc_{task}"], color="grey", lw=0.8, ls=":", label="full cache")
    ax.set(ylabel="accuracy (acc)", title=f"{task} (n = {n_items[task]})")
for ax in axes:
    ax.axvline(0.4785, color="k", lw=0.6, ls="--")
    budget_axis(ax, label="memory reduction (measured bytes)")
    ax.legend(fontsize=7)
fig.suptitle("Dashed vertical line: the paper's 47.85 % reduction", y=1.02)
fig.tight_layout()
_ = savefig(fig, "quality_vs_memory")

# %% [markdown]
# ## What each method keeps, per (layer, kv head)
# At the smallest budget: 0 = reused (stores nothing), d/D = stored as codes, 1 = stored in full (sink copies not
# shown).

# %%
low = min(BUDGETS)


def kept_map(name: str, method) -> torch.Tensor:
    keep = torch.ones(L, H)
    if name in ("KV-CAR codes", "both"):
        layers, d = method.plan(spec)[1:] if name == "both" else method.plan(spec)
        keep[layers] = d / D
    if name in ("reuse", "both"):
        reused = method.plan(spec)[0] if name == "both" else method.selection(spec)
        keep[reused] = 0.0
    return keep


fig, axes = plt.subplots(1, 3, figsize=(12, 6), sharey=True)
kept_maps = {}
for ax, name in zip(axes, ("KV-CAR codes", "reuse", "both")):
    kept_maps[name] = kept_map(name, plans[(name, low)])
    heatmap(ax, kept_maps[name], xlabel="kv head", ylabel="layer" if ax is axes[0] else "",
            cbar_label="fraction of the head's bytes kept", vmin=0, vmax=1, cmap="viridis",
            title=f"{name} @ {low:.0%}: keeps {kept_maps[name].mean():.1%}")
fig.tight_layout()
_ = savefig(fig, "chosen_heads")
plan_both = plans[("both", low)].to_frame(spec)
print(f"both @ {low:.0%}: {int(plan_both['reused'].sum())} heads reused (of {L * H}), "
      f"{int(plan_both['compressed'].sum())} stored as codes, of which "
      f"{int((plan_both['compressed'] & plan_both['layer'].isin(plan_both.query('reused')['read_from'])).sum())} "
      "are read by a reusing head above")

# %% [markdown]
# ## Against the paper's claim
# The paper: up to **47.85 %** memory reduction with minimal impact on perplexity and zero-shot accuracy, on GPT-2
# and TinyLlama (its own tables; not reproduced here). Here: SmolLM2-135M, the budget closest to that reduction,
# measured bytes, `n` as stated.

# %%
near = min(BUDGETS, key=lambda b: abs((1 - b) - 0.4785))
claim_rows = {"paper (GPT-2, TinyLlama)": {"memory reduction": 0.4785, "ppl wiki / full": "minimal",
                                           "ppl c4 / full": "minimal", "Δacc piqa": "minimal",
                                           "Δacc winogrande": "minimal"}}
for _, r in results_frame[results_frame["budget"] == near].iterrows():
    claim_rows[f"{r['method']} (SmolLM2, here)"] = {
        "memory reduction": round(r["reduction"], 4),
        **{f"ppl {c} / full": round(r[f"ppl_{c} / full"], 3) for c in CORPORA},
        **{f"Δacc {t}": round(r[f"Δacc_{t}"], 3) for t in TASKS}}
claim = pd.DataFrame(claim_rows).T
print(f"budget {near}; perplexity {PPL_CHUNKS} x {PPL_LEN} tokens per corpus; zero-shot n = {n_items} "
      f"(standard error of an accuracy ~ {0.5 / np.sqrt(min(n_items.values())):.2f}); KVCAR from {kvcar_from}")
claim

# %% [markdown]
# ## The layer axis that works: cross-layer prediction and shared bases (issue 19)
# Aligned entries of adjacent layers do not match (cosine ~0), but they are linearly related (CKA .3-.65), so
# instead of reusing an entry, **predict** it (`cross_layer`): in groups of adjacent layers the first (anchor) is
# stored in full and each next layer's pre-RoPE keys and values are predicted from the layer below's decoded entries
# by a fitted linear map (each kv head from all kv heads below), and only a low-rank residual code is stored. Or
# **share subspaces** (`shared_basis`): one pre-RoPE key basis and one value basis per group of adjacent layers, codes
# per layer. With `LAYER_GROUP` = 30 (the best group size of the screen in `benchmarks/layer_axis.py`), layer 0 is
# stored in full and every later layer is predicted from the one below it. Both fitted in closed form on wiki calib text; bytes measured; the same protocol and chunks as above.
# Ablation: no prediction (the residual is the entry itself: per-layer PCA of the predicted layers).
# `benchmarks/layer_axis.py` runs the larger grid (groups, K/V splits, post-RoPE keys) and a text never calibrated on.

# %%
from dataclasses import replace as _replace

from kvlab.data import text_chunks

tic = time.perf_counter()
layer_calib = text_chunks("wiki", tok, chunk_len=512 if not QUICK else 256, n_chunks=LAYER_CALIB_CHUNKS, split="calib")
layer_fits, layer_rows = {}, []
for label, (name, options) in LAYER_CONFIGS.items():
    fit_key = (name, options.get("map"), options.get("keys"))
    if fit_key not in layer_fits:
        fit_options = {k: options[k] for k in ("map", "keys") if k in options}
        layer_fits[fit_key] = kvlab.methods.get(name, LAYER_BUDGET, **fit_options).fit(model, layer_calib)
    base = layer_fits[fit_key]
    method = _replace(base, budget=LAYER_BUDGET, **options)
    method.provenance, method.metrics = base.provenance, base.metrics
    p = evaluate(model, tok, method, ppl=CORPORA, limit=PPL_CHUNKS, chunk_len=PPL_LEN, seed=SEED, progress=False)
    layer_rows.append({"config": label, "method": name, "ranks (K, V)": method.ranks(spec),
                       "measured": p["budget"], "theoretical": p["budget_theoretical"],
                       "parameter MB": method.parameter_bytes(spec) / 2**20,
                       **{f"ppl_{c} / full": p["ppl"][c]["ppl"] / full_row[f"ppl_{c}"] for c in CORPORA}})
seconds["layer_axis"] = time.perf_counter() - tic
layer_frame = pd.DataFrame(layer_rows)
reference = results_frame[results_frame["budget"] == near][["method", "measured", "theoretical"] +
                                                          [f"ppl_{c} / full" for c in CORPORA]]
print(f"budget {LAYER_BUDGET}; fits on {tuple(layer_calib.shape)} calib ids; perplexity {PPL_CHUNKS} x {PPL_LEN} "
      f"tokens per corpus; {seconds['layer_axis']:.0f} s; below: the paper's methods at budget {near}")
display(layer_frame.round(4))
reference.rename(columns={"method": "config"}).round(4)

# %% [markdown]
# ## Reading
# What the full run measured on SmolLM2 (2026-12-02, 1,438 s at 1 thread: 16,256 similarity tokens, 12 x 512
# perplexity tokens per corpus, n = 200 items per task, the shipped distilled autoencoders; the full mode now uses
# n = 100 items per task to fit the report's time budget, so its accuracies carry a standard error of ~0.05 and can
# move a few points from those quoted here); QUICK runs (a few hundred tokens, n = 10, an untrained autoencoder) only
# exercise the code:
#
# - **Similarity decays with layer distance, and aligned cosine is about zero everywhere.** Mean CKA to the layer
#   below is 0.54 for keys and 0.37 for values, falling to 0.42 / 0.21 sixteen layers apart; the mean cosine of
#   aligned tokens is within ±0.06 of 0 at every distance. Every layer has its own W_k and W_v, so neighbouring
#   layers carry related information in unrelated coordinates: CKA (rotation-blind) sees it, the entry itself is
#   not interchangeable. No head reaches CKA 0.8 in both keys and values, and over heads adjacent CKA and cosine
#   are not positively correlated (−0.14).
# - **Reuse is the expensive half at equal bytes.** At 25 / 40 / 49 % measured reduction, wiki perplexity over full:
#   KV-CAR codes 1.18x / 1.56x / 2.00x, reuse 8.0x / 90x / 435x, both (half of the saving each) 2.2x / 4.1x / 9.2x;
#   c4 the same order (codes 1.25x / 1.68x / 2.43x). A reused head hands attention another layer's keys, which its
#   queries were not trained against. PIQA (full 0.61): codes 0.625 / 0.605 / 0.555, reuse 0.60 / 0.515 / 0.515,
#   both 0.59 / 0.595 / 0.58. WinoGrande is at chance for this model (full 0.46, every variant 0.49–0.575): with a
#   standard error of ~0.035 it cannot tell the variants apart.
# - **The paper's claim does not transfer as is** to SmolLM2 under compressed-attention-throughout: at 49.5 %
#   measured reduction the autoencoder alone doubles wiki perplexity (2.0x, c4 2.4x) and costs 5.5 PIQA points; the
#   target (≥ 47.85 % with perplexity within +5 % and accuracy within a point) is met by no variant. The paper's
#   models (GPT-2, TinyLlama, with 8-16x more parameters per head) and its training budget differ; the reuse half is
#   limited by the near-zero cosines above, whatever the model is trained on.

# %%
def per_method(column: str) -> dict:
    out = {}
    for name, g in results_frame.groupby("method", sort=False):
        out[name] = {f"{b:g}": float(v) for b, v in zip(g["budget"], g[column])}
    return out


results = {
    "quick": QUICK,
    "model": MODEL,
    "shape": [L, H, D],
    "similarity_tokens": int(sim.n_tokens),
    "budgets": list(BUDGETS),
    "reuse_share": REUSE_SHARE,
    "kvcar_from": kvcar_from,
    "kvcar_code_dim": int(kvcar.autoencoders.code_dim),
    "cka_by_distance": {part: {str(k): float(by_distance.loc[k, ("cka", part)]) for k in distances}
                        for part in ("keys", "values")},
    "cosine_by_distance": {part: {str(k): float(by_distance.loc[k, ("cosine", part)]) for k in distances}
                           for part in ("keys", "values")},
    "adjacent_cka": {part: adjacent[("cka", part)][1:].tolist() for part in ("keys", "values")},
    "adjacent_cosine": {part: adjacent[("cosine", part)][1:].tolist() for part in ("keys", "values")},
    "candidates": {k: int(v) for k, v in candidates["heads (both K and V)"].items()},
    "cka_cosine_correlation": cka_cos_corr,
    "shown_heads": shown_heads,
    "n_items": n_items,
    "ppl_tokens_per_corpus": {c: int(full_row[f"tokens_{c}"]) for c in CORPORA},
    "full": {**{f"ppl_{c}": float(full_row[f"ppl_{c}"]) for c in CORPORA},
             **{f"acc_{t}": float(full_row[f"acc_{t}"]) for t in TASKS}, "measured": float(full_row["measured"])},
    "measured_budget": per_method("measured"),
    "theoretical_budget": per_method("theoretical"),
    "ppl_ratio": {c: per_method(f"ppl_{c} / full") for c in CORPORA},
    "acc": {t: per_method(f"acc_{t}") for t in TASKS},
    "kept_maps_at_lowest": {k: v.tolist() for k, v in kept_maps.items()},
    "both_plan_at_lowest": {"reused": int(plan_both["reused"].sum()), "coded": int(plan_both["compressed"].sum())},
    "claim_budget": near,
    "layer_axis": {r["config"]: {"method": r["method"], "ranks": list(r["ranks (K, V)"]), "measured": r["measured"],
                                 "theoretical": r["theoretical"],
                                 "ppl_ratio": {c: r[f"ppl_{c} / full"] for c in CORPORA}} for r in layer_rows},
    "layer_budget": LAYER_BUDGET,
    "seconds": seconds,
    "key_figure": key_figure.name,
}
save_results(results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
