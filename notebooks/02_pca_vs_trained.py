# %% [markdown]
# # 02 · PCA vs trained projections (MatryoshkaKV), and per-head rank search
#
# Feature-axis compression stores each key and value projected on the first r columns of a per-(layer, kv head)
# orthonormal basis. This notebook compares where those bases come from and how the ranks are spread:
#
# - **PCA** (`kvlab.methods.PCA`): eigenvectors of the calibration second moment of post-RoPE keys and of values,
#   in three variants: plain (every token, unweighted), **+ sinks** (the first positions left out of the moments and
#   kept at full rank in the cache) and **+ sinks + attention weighting** (each token weighted by the attention it
#   receives; the method's default, loaded from the artefact shipped under `data/pca/`);
# - **MatryoshkaKV** (`kvlab.methods.MatryoshkaKV`, Lin et al., ICLR 2025): the same bases trained as orthogonal
#   matrices by distillation from the full-cache model, ranks sampled per head during training (shipped under
#   `data/matryoshka/`);
# - **rank allocation**: the same rank for every head (*uniform*) or per-(layer, head, K/V) ranks from a greedy search
#   on measured loss (*searched*, `kvlab.fit.search`), both at the same mean rank.
#
# Every variant is evaluated by wiki perplexity (eval split, "compressed attention throughout" protocol) relative to
# the full cache at each budget (fraction of the full cache's features kept). Further sections look at the per-token
# reconstruction error against the attention tokens receive, the searched rank maps, the Matryoshka and Starbucks
# training schedules from the same PCA start, the training record of the shipped MatryoshkaKV and what training
# changes in the energy captured per rank.

# %% tags=["parameters"]
QUICK = False
MODEL = "smollm2"
BUDGETS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # fraction of features kept per head
PPL_CHUNKS = 12  # wiki eval chunks of PPL_LEN tokens for every perplexity (12 x 512 = 6k tokens)
PPL_LEN = 512
CALIB_CHUNKS = 32  # wiki calib chunks of CALIB_LEN tokens for the unweighted PCA fits (the shipped PCA: 64)
CALIB_LEN = 512
ERROR_CHUNKS = 4  # calib chunks for the per-token reconstruction errors (attention probabilities of every layer)
ERROR_LEN = 512
SCHEDULE_STEPS = 15  # training steps per schedule in the Matryoshka vs Starbucks comparison
SCHEDULE_BATCH = 2
SCHEDULE_LEN = 256  # training chunks (calib split) of SCHEDULE_LEN tokens
SCHEDULE_CHUNKS = 128
SPECTRUM_CHUNKS = 8  # eval chunks for the energy-per-rank comparison
SPECTRUM_LEN = 512
PCA_SOURCE = "shipped"  # where the default PCA comes from: "shipped", a path to an artefact, or None (fit here)
MATRYOSHKA_SOURCE = "shipped"
SEED = 0

# %%
if QUICK:
    BUDGETS = (0.75, 0.5)
    PPL_CHUNKS, PPL_LEN = 2, 256
    CALIB_CHUNKS, CALIB_LEN = 4, 256
    ERROR_CHUNKS, ERROR_LEN = 2, 256
    SCHEDULE_STEPS, SCHEDULE_BATCH, SCHEDULE_LEN, SCHEDULE_CHUNKS = 2, 1, 128, 4
    SPECTRUM_CHUNKS, SPECTRUM_LEN = 2, 256

import dataclasses
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

import kvlab
from kvlab.analysis.spectra import accumulate_moments, received_attention
from kvlab.eval.perplexity import perplexity
from kvlab.methods import Full
from kvlab.methods.artefacts import find_shipped
from kvlab.plotting import budget_axis, heatmap, savefig, use_style
from kvlab.report import save_results

use_style()
torch.manual_seed(SEED)
model, tok = kvlab.load_model(MODEL)
spec = kvlab.ModelSpec.from_model(model)
HALF = 0.5  # the budget of the measured-bytes check, the error analysis and the rank maps
FEATURE_BUDGET = "feature budget (% of each head's dimensions kept)"
seconds = {}


def log_y(ax) -> None:
    """Log y axis with plain tick labels (1, 1.5, 2, 3, 5, 7, 10, ...)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


print(f"{MODEL}: {spec.n_layers} layers x {spec.n_kv_heads} kv heads, head_dim {spec.head_dim}; "
      f"{torch.get_num_threads()} threads")

# %% [markdown]
# ## The variants
# The unweighted PCA variants are fitted here on `CALIB_CHUNKS` x `CALIB_LEN` calib tokens; the default PCA and
# MatryoshkaKV come from their shipped artefacts (whose records say how they were made), which also hold the rank
# sensitivity tables the searched allocation reads. The "+ sinks" variant keeps as many sink positions as the
# default PCA. In full mode the unweighted variants see half the shipped PCA's calibration tokens (32 vs 64 chunks
# of 512, to fit the report's time budget; 16k tokens for 64 x 64 moments per head), in QUICK mode far fewer.

# %%
tic = time.perf_counter()
default_pca = kvlab.methods.get("pca", HALF, source=PCA_SOURCE)
SINKS = default_pca.sinks
unweighted = dict(weighting=None, source=None, calib_chunks=CALIB_CHUNKS, chunk_len=CALIB_LEN)
methods = {
    "PCA": kvlab.methods.get("pca", HALF, sinks=0, **unweighted),
    "PCA + sinks": kvlab.methods.get("pca", HALF, sinks=SINKS, **unweighted),
    "PCA + sinks + attention weighting": default_pca,
    "PCA searched": kvlab.methods.get("pca", HALF, allocation="searched", source=PCA_SOURCE),
    "MatryoshkaKV": kvlab.methods.get("matryoshka", HALF, source=MATRYOSHKA_SOURCE),
    "MatryoshkaKV searched": kvlab.methods.get("matryoshka", HALF, allocation="searched", source=MATRYOSHKA_SOURCE),
}
origin = {}
for name, method in methods.items():
    if QUICK and method.source == "shipped" and find_shipped(method.name, model, method.options(),
                                                             method.FIT_OPTIONS) is None:
        raise RuntimeError(f"{name}: no artefact under data/{method.name}/ for {MODEL} and these options; QUICK mode "
                           f"does not fit one (make it with `kvlab fit --method {method.name} --search "
                           f"--out data/{method.name}`)")
    t0 = time.perf_counter()
    method.prepare(model, tok)
    origin[name] = dict(method=method.name, allocation=method.allocation, sinks=method.sinks,
                        weighting=method.weighting, source=method.provenance.get("loaded_from", "fitted here"),
                        seconds=round(time.perf_counter() - t0, 1))
seconds["setup"] = time.perf_counter() - tic
pd.DataFrame(origin).T

# %% [markdown]
# ## Perplexity vs budget
# Wiki perplexity (eval split, `PPL_CHUNKS` chunks of `PPL_LEN` tokens, every token attending through the compressed
# cache) of every variant at every budget, divided by the perplexity of the full cache on the same chunks. Each
# budget reuses the fitted bases (and sensitivity table) of its variant: only the ranks change.

# %%
tic = time.perf_counter()


def ppl(method) -> float:
    return perplexity(model, tok, method, "wiki", chunk_len=PPL_LEN, n_chunks=PPL_CHUNKS, progress=False)["ppl"]


full_ppl = ppl(Full())
rows = [dict(variant=name, budget=b, ppl=ppl(dataclasses.replace(method, budget=b)))
        for name, method in methods.items() for b in BUDGETS]
ppl_frame = pd.DataFrame(rows).assign(ratio=lambda d: d["ppl"] / full_ppl)
seconds["perplexity"] = time.perf_counter() - tic
print(f"full cache: wiki perplexity {full_ppl:.3f} ({PPL_CHUNKS} x {PPL_LEN} tokens); "
      f"{len(rows) + 1} evaluations in {seconds['perplexity']:.0f} s")
ratio_table = ppl_frame.pivot(index="variant", columns="budget", values="ratio").loc[list(methods)]
ratio_table = ratio_table[sorted(BUDGETS, reverse=True)]
ratio_table.rename(columns=lambda b: f"{b:.1%}").round(3).rename_axis("ppl / full ppl", axis=1)

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.5))
sns.lineplot(data=ppl_frame, x="budget", y="ratio", hue="variant", style="variant", markers=True, dashes=False,
             ax=ax)
ax.set(ylabel="perplexity / full-cache perplexity",
       title=f"{MODEL}: wiki perplexity vs feature budget ({PPL_CHUNKS} x {PPL_LEN} eval tokens)")
log_y(ax)
budget_axis(ax, label=FEATURE_BUDGET)
ax.axhline(1, color="grey", lw=0.8, ls=":")
ax.legend(fontsize=8)
key_figure = savefig(fig, "ppl_vs_budget")

# %% [markdown]
# ### Measured bytes at 50 %
# One forward pass of one eval chunk through each variant's cache at 50 %; `kv_bytes()` reports the storage the
# cache really holds (codes of every token plus the full-rank copies of the sink positions) as a fraction of the
# full cache's bytes, next to the exact byte count of what the method keeps (theoretical) and the mean ranks.

# %%
one = kvlab.data.text_chunks("wiki", tok, chunk_len=PPL_LEN, n_chunks=1, split="eval")
bytes_rows = {}
for name, method in methods.items():
    with torch.no_grad(), method.apply(model) as cache:
        model(one, past_key_values=cache, use_cache=True)
    b = cache.kv_bytes()
    key_ranks, value_ranks = method.ranks(spec)
    bytes_rows[name] = {"nominal": HALF, "mean key rank": key_ranks.double().mean().item(),
                        "mean value rank": value_ranks.double().mean().item(),
                        "theoretical": b.theoretical_budget, "measured": b.budget}
measured = pd.DataFrame(bytes_rows).T
measured.round(4)

# %% [markdown]
# ## Why average energy misleads: reconstruction error vs attention received
# Average energy weighs every token alike; attention does not. On `ERROR_CHUNKS` calib chunks, for every layer,
# kv head and token: the relative key reconstruction error ‖k − k U Uᵀ‖ / ‖k‖ at the 50 % rank (U: the first
# half of the variant's key directions), and the attention the token receives (summed over queries and over the
# query heads of its GQA group, `received_attention`). Positions the cache keeps at full rank (the sinks of the
# "+ sinks" variants) count with error 0, as the cache stores them exactly. The attention-weighted mean error
# weights each token's error by the attention it receives.

# %%
tic = time.perf_counter()
ERROR_VARIANTS = ("PCA", "PCA + sinks", "PCA + sinks + attention weighting")
err_ids = kvlab.data.text_chunks("wiki", tok, chunk_len=ERROR_LEN, n_chunks=ERROR_CHUNKS, split="calib", seed=SEED)


def key_errors(method, keys: torch.Tensor, layer: int) -> torch.Tensor:
    """(H_kv, T) relative reconstruction error of keys (H_kv, T, D) in ``method``'s cache at its ranks."""
    ranks = method.ranks(spec)[0][layer]
    out = []
    for h, k in enumerate(keys):
        u = method.key_bases[layer, h, :, : int(ranks[h])]
        out.append((k - (k @ u) @ u.T).norm(dim=-1) / k.norm(dim=-1).clamp_min(1e-12))
    out = torch.stack(out)
    out[:, : method.sinks] = 0.0  # positions < sinks are stored at full rank
    return out


frames = []
positions = np.arange(ERROR_LEN)
for chunk in range(ERROR_CHUNKS):
    cap = kvlab.capture(model, err_ids[chunk: chunk + 1], what=("keys", "probs"))
    for layer in range(spec.n_layers):
        keys = cap.keys.pop(layer)[0]  # (H_kv, T, D)
        attn = received_attention(cap.probs.pop(layer), spec.n_kv_heads)[0]  # (H_kv, T)
        for name in ERROR_VARIANTS:
            err = key_errors(methods[name], keys, layer)
            for h in range(spec.n_kv_heads):
                frames.append(pd.DataFrame({"variant": name, "chunk": chunk, "layer": layer, "head": h,
                                            "position": positions, "attention": attn[h].numpy(),
                                            "error": err[h].numpy()}))
    del cap
errors = pd.concat(frames, ignore_index=True)
errors["tokens"] = np.select([errors["position"] == 0, errors["position"] < SINKS],
                             ["position 0", f"positions 1–{SINKS - 1}"], f"positions ≥ {SINKS}")
seconds["errors"] = time.perf_counter() - tic


def error_summary(d: pd.DataFrame) -> pd.Series:
    w = d["attention"]
    return pd.Series({"mean error": d["error"].mean(),
                      "attention-weighted mean error": (w * d["error"]).sum() / w.sum(),
                      "error at position 0": d.loc[d["position"] == 0, "error"].mean(),
                      f"error at positions ≥ {SINKS}": d.loc[d["position"] >= SINKS, "error"].mean()})


error_table = errors.groupby("variant", sort=False).apply(error_summary)
plain = errors[errors["variant"] == "PCA"]
share0 = plain.loc[plain["position"] == 0, "attention"].sum() / plain["attention"].sum()
print(f"{ERROR_CHUNKS} x {ERROR_LEN} tokens, {seconds['errors']:.0f} s; position 0 receives {share0:.1%} of all "
      "attention (over every layer and kv head)")
error_table.round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
edges = np.quantile(np.log10(plain["attention"].clip(lower=1e-6)), np.linspace(0, 1, 21))
binned = errors.assign(bin=np.digitize(np.log10(errors["attention"].clip(lower=1e-6)), edges[1:-1]))
curve = binned[binned["position"] >= SINKS].groupby(["variant", "bin"], sort=False).agg(
    attention=("attention", "median"), error=("error", "mean")).reset_index()
sns.lineplot(data=curve, x="attention", y="error", hue="variant", marker="o", ax=axes[0])
first = plain[plain["position"] == 0]
axes[0].scatter(first["attention"].median(), first["error"].mean(), color="k", marker="*", s=150, zorder=5,
                label="PCA, position 0")
axes[0].set(xscale="log", xlabel="attention received (sum over queries and GQA group)",
            ylabel="relative key error ‖k − kUUᵀ‖ / ‖k‖",
            title=f"Positions ≥ {SINKS}, binned by attention (20 quantile bins)")
axes[0].legend(fontsize=8)
sns.barplot(data=errors, x="tokens", y="error", hue="variant", errorbar=None, ax=axes[1],
            order=["position 0", f"positions 1–{SINKS - 1}", f"positions ≥ {SINKS}"])
axes[1].set(xlabel="", ylabel="mean relative key error", title="Mean error by position, 50 % rank")
axes[1].legend(fontsize=8)
fig.tight_layout()
_ = savefig(fig, "error_vs_attention")

# %%
fig, ax = plt.subplots(figsize=(7, 4))
by_layer = errors.groupby(["variant", "layer"], sort=False).apply(
    lambda d: pd.Series({"mean": d["error"].mean(), "attention-weighted": (d["attention"] * d["error"]).sum()
                         / d["attention"].sum()})).reset_index().melt(["variant", "layer"], var_name="average",
                                                                      value_name="error")
sns.lineplot(data=by_layer, x="layer", y="error", hue="variant", style="average", ax=ax)
ax.set(ylabel="relative key error at 50 % rank", title="Plain vs attention-weighted mean error per layer")
ax.legend(fontsize=8)
_ = savefig(fig, "error_by_layer")

# %% [markdown]
# ## Searched ranks at 50 %
# The greedy search (`kvlab.fit.search.allocate`) starts every (layer, kv head, K/V) unit at full rank and lowers the
# unit whose next grid step costs the least measured loss (KL to the full model with only that unit truncated, from
# the artefact's sensitivity table) per feature, until the mean rank is half the head dimension. Same colour scale
# (1 to head_dim) in every panel.

# %%
searched = {"PCA": methods["PCA searched"], "MatryoshkaKV": methods["MatryoshkaKV searched"]}
fig, axes = plt.subplots(1, 4, figsize=(14, 5.5), sharey=True)
rank_rows = {}
for i, (name, method) in enumerate(searched.items()):
    key_ranks, value_ranks = method.ranks(spec)
    for j, (part, r) in enumerate((("keys", key_ranks), ("values", value_ranks))):
        ax = axes[2 * i + j]
        heatmap(ax, r, xlabel="kv head", ylabel="layer" if ax is axes[0] else "", cbar_label="rank", vmin=1,
                vmax=spec.head_dim, title=f"{name}: {part}")
    rank_rows[name] = {"mean key rank": key_ranks.double().mean().item(),
                       "mean value rank": value_ranks.double().mean().item(),
                       "key ranks min–max": f"{int(key_ranks.min())}–{int(key_ranks.max())}",
                       "value ranks min–max": f"{int(value_ranks.min())}–{int(value_ranks.max())}",
                       "sensitivity tokens": method.sensitivity.tokens}
fig.suptitle(f"Searched ranks at {HALF:.0%} (mean rank {HALF * spec.head_dim:g} of {spec.head_dim})", y=1.0)
fig.tight_layout()
_ = savefig(fig, "searched_ranks")
pd.DataFrame(rank_rows).T

# %% [markdown]
# The sensitivity tables behind those maps: measured loss when a single unit is truncated to each grid rank
# (line: median over the units of a part, band: 25th–75th percentile).

# %%
sens = pd.concat({name: m.sensitivity.to_frame() for name, m in searched.items()}, names=["method"]).reset_index(0)
sens["part"] = sens["part"].map({"K": "keys", "V": "values"})
fig, ax = plt.subplots(figsize=(7, 4))
sns.lineplot(data=sens, x="rank", y="loss", hue="method", style="part", estimator="median",
             errorbar=("pi", 50), marker="o", ax=ax)
ax.set(xlabel="rank of the one truncated unit", ylabel="KL to the full model (per token)",
       title="Rank sensitivity of one (layer, kv head, part)")
ax.set_yscale("log")
_ = savefig(fig, "sensitivity")

# %% [markdown]
# ## Matryoshka vs Starbucks schedules
# Two MatryoshkaKV trainings from the same start (the default PCA's bases) and the same `SCHEDULE_CHUNKS` training
# chunks of `SCHEDULE_LEN` calib tokens, `SCHEDULE_STEPS` steps of `SCHEDULE_BATCH` chunks each:
# *matryoshka* draws a rank from the eighths of the head dimension independently for every head, K and V, one
# student pass per step; *starbucks* sums the loss over the fixed ranks D/4, D/2, 3D/4 (three student passes per
# step). Then perplexity at every budget (same chunks as above), uniform ranks, next to the untrained start.

# %%
tic = time.perf_counter()
train_ids = kvlab.data.text_chunks("wiki", tok, chunk_len=SCHEDULE_LEN, n_chunks=SCHEDULE_CHUNKS, split="calib",
                                   seed=SEED)
start = methods["PCA + sinks + attention weighting"]
trained, schedule_info = {}, {}
for schedule in ("matryoshka", "starbucks"):
    method = kvlab.methods.MatryoshkaKV(budget=HALF, schedule=schedule, sinks=start.sinks, source=None,
                                        batch_size=SCHEDULE_BATCH, seed=SEED, key_bases=start.key_bases.clone(),
                                        value_bases=start.value_bases.clone())
    t0 = time.perf_counter()
    method.fit(model, train_ids, steps=SCHEDULE_STEPS, train_data=train_ids, progress=False)
    trained[schedule] = method
    schedule_info[schedule] = {"steps": method.trained_steps, "tokens": method.trained_tokens,
                               "wall seconds": time.perf_counter() - t0,
                               "first loss": method.history["loss"].iloc[0],
                               "last loss": method.history["loss"].iloc[-1]}
schedule_rows = [dict(schedule=s, budget=b, ppl=ppl(dataclasses.replace(m, budget=b)))
                 for s, m in trained.items() for b in BUDGETS]
schedule_frame = pd.concat([
    ppl_frame[ppl_frame["variant"] == "PCA + sinks + attention weighting"].assign(schedule="untrained (PCA start)"),
    pd.DataFrame(schedule_rows).assign(ratio=lambda d: d["ppl"] / full_ppl)])[["schedule", "budget", "ppl", "ratio"]]
seconds["schedules"] = time.perf_counter() - tic
print("loss: summed over the schedule's student passes (one for matryoshka, three for starbucks)")
display(pd.DataFrame(schedule_info).T.astype({"steps": int, "tokens": int}).round(3))
schedule_table = schedule_frame.pivot(index="schedule", columns="budget", values="ratio")
schedule_table = schedule_table.loc[["untrained (PCA start)", "matryoshka", "starbucks"], sorted(BUDGETS, reverse=True)]
schedule_table.rename(columns=lambda b: f"{b:.1%}").round(3).rename_axis("ppl / full ppl", axis=1)

# %%
fig, ax = plt.subplots(figsize=(7, 4))
sns.lineplot(data=schedule_frame, x="budget", y="ratio", hue="schedule", marker="o", ax=ax)
ax.set(ylabel="perplexity / full-cache perplexity",
       title=f"Schedules after {SCHEDULE_STEPS} steps from the same PCA start")
log_y(ax)
budget_axis(ax, label=FEATURE_BUDGET)
ax.axhline(1, color="grey", lw=0.8, ls=":")
_ = savefig(fig, "schedules")

# %% [markdown]
# ## Training record of the shipped MatryoshkaKV
# The per-step distillation loss (weighted KL to the full model + next-token CE, at sampled ranks) of the run
# that made the shipped artefact, from its provenance record, against training tokens and wall time.
# Its record's wiki perplexities (uniform ranks, measured by `kvlab fit` on its own eval chunks) are shown next to
# those of the shipped PCA record, and we check whether training started from the shipped PCA's bases.

# %%
shipped = methods["MatryoshkaKV"]
runs = shipped.provenance.get("runs", [])
run_frames, tokens0, seconds0 = [], 0, 0.0
for run in runs:  # several runs continue one another: offset their tokens and wall time
    h = pd.DataFrame(run["history"])
    run_frames.append(h.assign(tokens=h["tokens"] + tokens0, seconds=h["seconds"] + seconds0))
    tokens0, seconds0 = tokens0 + run["tokens"], seconds0 + run["seconds"]
history = pd.concat(run_frames, ignore_index=True) if run_frames else pd.DataFrame(columns=["loss", "tokens"])
if len(history):
    window = max(1, len(history) // 20)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x, label in ((axes[0], "tokens", "training tokens seen"), (axes[1], "seconds", "wall time (s)")):
        ax.plot(history[x], history["loss"], lw=0.6, alpha=0.5, label="every step")
        ax.plot(history[x], history["loss"].rolling(window, min_periods=1).mean(), lw=2,
                label=f"running mean over {window} steps")
        ax.set(xlabel=label)
    axes[0].set(ylabel="distillation loss", title=f"{len(history)} steps")
    axes[0].legend()
    axes[1].set(title=f"{len(runs)} run(s), schedule {shipped.schedule}")
    _ = savefig(fig, "shipped_training")
same_start = shipped.init_key_bases is not None and bool(
    torch.allclose(shipped.init_key_bases, start.key_bases, atol=1e-5)
    and torch.allclose(shipped.init_value_bases, start.value_bases, atol=1e-5))
record = {"trained steps": shipped.trained_steps, "trained tokens": shipped.trained_tokens,
          "train seconds": round(sum(run["seconds"] for run in runs), 1),
          "first-10 mean loss": float(history["loss"].head(10).mean()) if len(history) else None,
          "last-10 mean loss": float(history["loss"].tail(10).mean()) if len(history) else None,
          "started from the shipped PCA bases": same_start}
print(pd.Series(record).to_string())
record_ppl = pd.DataFrame({"PCA (record)": start.metrics.get("wiki_ppl", {}),
                           "MatryoshkaKV (record)": shipped.metrics.get("wiki_ppl", {})}).T
if "full" in record_ppl:
    record_ppl = record_ppl.div(record_ppl["full"], axis=0).drop(columns="full").add_suffix(" / full")
print(shipped.metrics.get("wiki_ppl_chunks", "no perplexities in the record"))
record_ppl.round(3)

# %% [markdown]
# ## What training does to the spectrum
# Energy captured by the first r columns of a basis on held-out keys and values: energy_r = trace(U_rᵀ M U_r) /
# trace(M), M the uncentred second moment of the eval-split keys (post-RoPE) or values of a head over
# `SPECTRUM_CHUNKS` x `SPECTRUM_LEN` tokens (sink positions excluded: the cache keeps them exact), averaged over all
# (layer, kv head). Compared: the shipped MatryoshkaKV's trained bases, the PCA bases its training started from,
# and the eigenvectors of M itself (the most energy any basis can capture on these tokens).

# %%
tic = time.perf_counter()
spec_ids = kvlab.data.text_chunks("wiki", tok, chunk_len=SPECTRUM_LEN, n_chunks=SPECTRUM_CHUNKS, split="eval")
moments, _ = accumulate_moments(model, spec_ids, batch_size=4, parts=("keys", "values"), skip_first=SINKS)


def energy(bases: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(L, H, D): trace(U_r^T M U_r) / trace(M) for r = 1..D, bases (L, H, D, D), M (L, H, D, D)."""
    u = bases.double()
    captured = torch.einsum("lhdi,lhde,lhei->lhi", u, m, u)
    return captured.cumsum(-1) / m.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)


init_bases = {"keys": shipped.init_key_bases, "values": shipped.init_value_bases}
if init_bases["keys"] is None:  # an artefact without its start: the default PCA's bases
    init_bases = {"keys": start.key_bases, "values": start.value_bases}
energy_rows = []
for part, trained_bases in (("keys", shipped.key_bases), ("values", shipped.value_bases)):
    m = moments[(SINKS, None)][part].matrix()
    optimum = torch.linalg.eigvalsh(m).flip(-1).cumsum(-1) / m.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    for label, e in (("MatryoshkaKV (trained)", energy(trained_bases, m)),
                     ("PCA start", energy(init_bases[part], m)), ("eigenvectors of M (eval optimum)", optimum)):
        mean = e.reshape(-1, spec.head_dim).mean(0).numpy()
        energy_rows.append(pd.DataFrame({"part": part, "basis": label, "rank": np.arange(1, spec.head_dim + 1),
                                         "energy": mean}))
energies = pd.concat(energy_rows, ignore_index=True)
seconds["spectrum"] = time.perf_counter() - tic

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
sns.lineplot(data=energies, x="rank", y="energy", hue="basis", style="part", ax=axes[0])
axes[0].set(xlabel="rank r", ylabel="fraction of energy captured (mean over heads)", title="Energy vs rank")
wide = energies.pivot_table(index=["part", "rank"], columns="basis", values="energy").reset_index()
wide["trained − start"] = wide["MatryoshkaKV (trained)"] - wide["PCA start"]
sns.lineplot(data=wide, x="rank", y="trained − start", hue="part", ax=axes[1])
axes[1].axhline(0, color="grey", lw=0.8, ls=":")
axes[1].set(xlabel="rank r", ylabel="energy: trained − PCA start", title="Change made by training")
fig.tight_layout()
_ = savefig(fig, "energy_trained_vs_pca")
ranks_shown = sorted({max(1, round(spec.head_dim * b)) for b in BUDGETS})
energy_table = energies[energies["rank"].isin(ranks_shown)].pivot_table(index=["part", "basis"], columns="rank",
                                                                         values="energy")
energy_table.round(4)

# %% [markdown]
# ## Issue 19's levers: pre-RoPE keys, a key-light K/V split, output-aware values
# Three options of `kvlab.methods.PCA`, each measured beside the default (post-RoPE keys, plain values, attention
# weighting, sinks): `keys="pre_rope"` fits the key bases on keys before rotary and the cache rotates the rebuilt
# keys back on read; a *key-light split* gives keys `KEY_SHARE` of the per-head dims and values the rest (same
# bytes; `allocation="split"` picks the share by held-out KL); `values="output_aware"` fits value bases that
# minimise the error after each head's slice of `o_proj` (same bytes, a decoder beside the encoder). The pre-RoPE
# fits use `LEVER_CALIB` calibration tokens (the shipped artefacts `data/pca/smollm2-pre_rope*.safetensors` in full
# mode, if their options match).
#
# Reading (from `benchmarks/feature_axis.py --ablation`, 2026-12-04, not this notebook's run: uniform D/2 ranks,
# 12 x 512 eval tokens of wiki and of c4 (6,132 scored each); c4 was never used for calibration): the shipped
# post-RoPE PCA costs 2.28x / 2.99x the full cache's wiki / c4 perplexity at 0.508 of the bytes; pre-RoPE keys
# 1.81x / 2.44x at 0.511 (the kept positions add 0.3 %), fitted on a quarter of the calibration tokens;
# output-aware values on top 1.81x / 2.20x; the K/V split picked by held-out KL (keys 24, values 40 of 64) on top
# 1.51x / 1.81x. At 25 %: 17.0x / 10.1x post-RoPE, 10.2x / 7.5x pre-RoPE, 9.8x / 7.0x with output-aware values.
# The target (<= 1.25x at 50 %) is not met yet.

# %%
tic = time.perf_counter()
KEY_SHARE = 0.25
LEVER_CALIB = dict(calib_chunks=CALIB_CHUNKS, chunk_len=CALIB_LEN) if QUICK else dict(calib_chunks=16)
pre = kvlab.methods.get("pca", HALF, keys="pre_rope", source=PCA_SOURCE, **LEVER_CALIB).prepare(model, tok)
if getattr(pre, "value_moments", None) is not None:  # fitted here: output-aware values from the same moments
    aware = dataclasses.replace(pre)
    aware.value_moments, aware.provenance = pre.value_moments, dict(pre.provenance)
    aware.make_output_aware(model)
else:
    aware = kvlab.methods.get("pca", HALF, keys="pre_rope", values="output_aware", source=PCA_SOURCE,
                              **LEVER_CALIB).prepare(model, tok)


def key_light(method, budget: float):
    total = 2 * max(1, round(budget * spec.head_dim))
    k = max(1, round(KEY_SHARE * total))
    shape = (spec.n_layers, spec.n_kv_heads)
    return dataclasses.replace(method, budget=budget, key_ranks=torch.full(shape, k).tolist(),
                               value_ranks=torch.full(shape, min(spec.head_dim, total - k)).tolist())


levers = {
    "pre-RoPE keys": lambda b: dataclasses.replace(pre, budget=b),
    "pre-RoPE + key-light split": lambda b: key_light(pre, b),
    "pre-RoPE + output-aware values": lambda b: dataclasses.replace(aware, budget=b),
    "pre-RoPE + output-aware + key-light split": lambda b: key_light(aware, b),
}
lever_rows = [dict(variant="post-RoPE (default PCA)", budget=b, ratio=r) for b, r in
              zip(*ppl_frame[ppl_frame.variant == "PCA + sinks + attention weighting"][["budget", "ratio"]].T.values)]
for name, make in levers.items():
    for b in BUDGETS:
        lever_rows.append(dict(variant=name, budget=b, ratio=ppl(make(b)) / full_ppl))
lever_frame = pd.DataFrame(lever_rows)
with torch.no_grad(), key_light(aware, HALF).apply(model) as cache:
    model(one, past_key_values=cache, use_cache=True)
lever_bytes = cache.kv_bytes()
seconds["levers"] = time.perf_counter() - tic
print(f"pre-RoPE + output-aware + key-light split at {HALF:.0%}: measured budget {lever_bytes.budget:.4f} "
      f"(theoretical {lever_bytes.theoretical_budget:.4f}); {seconds['levers']:.0f} s")
lever_table = lever_frame.pivot(index="variant", columns="budget", values="ratio")
lever_table[sorted(BUDGETS, reverse=True)].rename(columns=lambda b: f"{b:.1%}").round(3)

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.5))
sns.lineplot(data=lever_frame, x="budget", y="ratio", hue="variant", style="variant", markers=True, dashes=False,
             ax=ax)
ax.set(ylabel="perplexity / full-cache perplexity",
       title=f"{MODEL}: the feature-axis levers ({PPL_CHUNKS} x {PPL_LEN} wiki eval tokens)")
log_y(ax)
budget_axis(ax, label=FEATURE_BUDGET)
ax.axhline(1, color="grey", lw=0.8, ls=":")
ax.legend(fontsize=8)
_ = savefig(fig, "levers_vs_budget")

# %%
def by_budget(frame: pd.DataFrame, key: str) -> dict:
    return {k: {f"{b:g}": float(r) for b, r in zip(g["budget"], g["ratio"])} for k, g in frame.groupby(key, sort=False)}


half_rank = round(HALF * spec.head_dim)
results = {
    "quick": QUICK,
    "model": MODEL,
    "budgets": list(BUDGETS),
    "ppl_tokens": PPL_CHUNKS * PPL_LEN,
    "full_ppl": full_ppl,
    "ppl_ratio": by_budget(ppl_frame, "variant"),
    "measured_budget_at_50": measured["measured"].to_dict(),
    "theoretical_budget_at_50": measured["theoretical"].to_dict(),
    "searched_mean_ranks_at_50": {name: {"keys": row["mean key rank"], "values": row["mean value rank"]}
                                  for name, row in rank_rows.items()},
    "key_error_at_50": {name: dict(zip(("mean", "attention_weighted", "position0", "rest"), map(float, row)))
                        for name, row in error_table.iterrows()},
    "attention_share_position0": float(share0),
    "schedule_ppl_ratio": by_budget(schedule_frame, "schedule"),
    "lever_ppl_ratio": by_budget(lever_frame, "variant"),
    "lever_measured_budget_at_50": lever_bytes.budget,
    "lever_theoretical_budget_at_50": lever_bytes.theoretical_budget,
    "schedule_seconds": {s: info["wall seconds"] for s, info in schedule_info.items()},
    "schedule_steps": SCHEDULE_STEPS,
    "shipped_matryoshka": {**record, "record_wiki_ppl": shipped.metrics.get("wiki_ppl"),
                           "pca_record_wiki_ppl": start.metrics.get("wiki_ppl")},
    "energy_at_half_rank": energies[energies["rank"] == half_rank].pivot(index="part", columns="basis",
                                                                         values="energy").to_dict("index"),
    "seconds": seconds,
    "key_figure": key_figure.name,
}
save_results(results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
