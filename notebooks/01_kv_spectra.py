# %% [markdown]
# # 01 · Head-wise spectra of keys and values
#
# How many dimensions does each (layer, kv head) of the cache really use? For every head we accumulate, over
# calibration text, the second moment E[x xᵀ] (64 x 64) of the keys after RoPE (what the cache stores), of the
# keys before RoPE and of the values, and take its eigen-decomposition. The energy captured by the top r
# eigenvectors is what a rank-r PCA projection of that head keeps (1 - energy = relative squared reconstruction
# error), so these spectra bound what the feature-axis methods (PCA projection, MatryoshkaKV) can do at each
# rank, and their eigenvectors are the PCA method's projections.
#
# Definitions (`kvlab.analysis.spectra`): uncentred moments (the cache stores x, not x − mean) unless said
# otherwise; *rank for 90 %* = smallest r whose top-r directions hold ≥ 90 % of the energy; *effective rank* =
# exp of the entropy of the normalised eigenvalues (Roy & Vetterli 2007), between 1 and 64.
# The first tokens of every sequence (attention sinks) take much of the attention and are often said to have
# outlying norms; we measure their norms here and show spectra with and without them. Calibration text: Wikipedia articles from exllamav3's calibration set (`wiki`, `calib` split),
# a substitute for WikiText-2.

# %% tags=["parameters"]
QUICK = False
MODEL = "smollm2"
CHUNK_LEN = 512  # tokens per calibration sequence
N_CHUNKS = 64  # 64 x 512 = 32k calibration tokens
BATCH_SIZE = 8
SINKS = 4  # positions treated as attention sinks (as StreamingLLM)
WEIGHTED_CHUNKS = 16  # sequences for the attention-weighted spectra (they need the attention probabilities)
ENERGY = 0.9
SEED = 0

# %%
if QUICK:
    CHUNK_LEN, N_CHUNKS, BATCH_SIZE, WEIGHTED_CHUNKS = 256, 4, 4, 2

import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import kvlab
from kvlab.analysis.spectra import PARTS, Spectra, accumulate_moments, combine, merge
from kvlab.plotting import heatmap, savefig, use_style
from kvlab.report import save_results

use_style()
torch.manual_seed(SEED)
model, tok = kvlab.load_model(MODEL)
spec = kvlab.ModelSpec.from_model(model)
ids = kvlab.data.text_chunks("wiki", tok, chunk_len=CHUNK_LEN, n_chunks=N_CHUNKS, split="calib")
LABEL = {"keys": "keys (post-RoPE)", "keys_pre": "keys (pre-RoPE)", "values": "values"}
print(f"{MODEL}: {spec.n_layers} layers x {spec.n_kv_heads} kv heads, head_dim {spec.head_dim}; "
      f"calibration {ids.shape[0]} x {ids.shape[1]} = {ids.numel():,} tokens; {torch.get_num_threads()} threads")

# %% [markdown]
# ## One streaming pass
# One forward pass per batch; per (layer, part) a single batched matmul accumulates XᵀX for all kv heads. The
# moments of position 0 and of positions 1..`SINKS`−1 are kept apart, so spectra with and without the sinks come
# from the same pass. The data go through in two pieces (the first `WEIGHTED_CHUNKS` sequences, which the
# attention-weighted section below reuses, and the rest); moments add up, so the spectra are those of all tokens.

# %%
SEGMENTS = (0, 1, SINKS)
sub, rest = ids[:WEIGHTED_CHUNKS], ids[WEIGHTED_CHUNKS:]
tic = time.perf_counter()
sub_moments, seconds = accumulate_moments(model, sub, batch_size=BATCH_SIZE, parts=PARTS, skip_first=SEGMENTS)
rest_moments, rest_seconds = accumulate_moments(model, rest, batch_size=BATCH_SIZE, parts=PARTS, skip_first=SEGMENTS)
moments = merge(sub_moments, rest_moments)
seconds = {k: seconds[k] + rest_seconds[k] for k in seconds}
no_sinks = Spectra.from_moments(combine(moments, SINKS), skip_first=SINKS)
with_sinks = Spectra.from_moments(combine(moments, 0))
centred = Spectra.from_moments(combine(moments, SINKS), centered=True, skip_first=SINKS)
seconds["eigh"] = no_sinks.seconds["eigh"] + with_sinks.seconds["eigh"] + centred.seconds["eigh"]
seconds["total"] = time.perf_counter() - tic
print(", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
      f"({ids.numel() / seconds['total']:,.0f} tokens/s; everything but the forward passes: "
      f"{seconds['total'] - seconds['forward']:.1f} s)")


def table(s: Spectra) -> pd.DataFrame:
    return s.summary((0.5, ENERGY, 0.99)).rename(index=LABEL).round(1)


pd.concat({f"sinks excluded (positions < {SINKS})": table(no_sinks), "all tokens": table(with_sinks),
           "centred, sinks excluded": table(centred)})

# %% [markdown]
# ## Rank for 90 % energy and effective rank, per layer and kv head
# Same colour scale (1..64) in every panel.

# %%
def maps(s: Spectra, value, label: str, name: str, vmin=1, vmax=spec.head_dim):
    fig, axes = plt.subplots(1, len(PARTS), figsize=(4.0 * len(PARTS), 5.5), sharey=True)
    for ax, part in zip(axes, PARTS):
        heatmap(ax, value(s, part), xlabel="kv head", ylabel="layer" if ax is axes[0] else "", cbar_label=label,
                vmin=vmin, vmax=vmax, title=LABEL[part])
    fig.suptitle(f"{MODEL}, {s.n_tokens:,} tokens per head, positions < {s.skip_first} excluded", y=1.0)
    fig.tight_layout()
    return savefig(fig, name)


key_figure = maps(no_sinks, lambda s, p: s.rank_for_energy(p, ENERGY), f"rank for {ENERGY:.0%} energy",
                  "rank_for_90pct_energy")
maps(no_sinks, lambda s, p: s.effective_rank(p), "effective rank", "effective_rank")

# %%
fig, ax = plt.subplots(figsize=(7, 4))
layers = np.arange(spec.n_layers)
for part in PARTS:
    r = no_sinks.rank_for_energy(part, ENERGY).double()
    ax.plot(layers, r.mean(1), marker="o", ms=3, label=LABEL[part])
    ax.fill_between(layers, r.min(1).values, r.max(1).values, alpha=0.2)
ax.set(xlabel="layer", ylabel=f"rank for {ENERGY:.0%} energy", ylim=(0, spec.head_dim + 1),
       title="Rank needed per layer (line: mean over kv heads, band: min–max)")
ax.legend()
savefig(fig, "rank_by_layer")

# %% [markdown]
# ## Energy captured vs rank
# Fraction of each head's energy held by its top-r principal directions; line = mean over all (layer, kv head),
# band = 10th–90th percentile of heads. Dashed: all tokens, sinks included.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
ranks = np.arange(1, spec.head_dim + 1)
for part, colour in zip(PARTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
    for ax in axes:
        e = no_sinks.energy(part).reshape(-1, spec.head_dim).numpy()
        ax.plot(ranks, e.mean(0), color=colour, label=LABEL[part])
        ax.fill_between(ranks, np.quantile(e, 0.1, 0), np.quantile(e, 0.9, 0), color=colour, alpha=0.15)
        ax.plot(ranks, with_sinks.energy(part).reshape(-1, spec.head_dim).numpy().mean(0), color=colour, ls="--",
                lw=1)
for ax, top in zip(axes, (spec.head_dim, 16)):
    ax.axhline(ENERGY, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="rank r (dimensions kept per head)", xlim=(1, top))
axes[0].set(ylabel="fraction of energy captured", title="all ranks")
axes[1].set(title="zoom: r ≤ 16")
axes[0].legend(loc="lower right")
savefig(fig, "energy_vs_rank")

# %% [markdown]
# ## Attention-weighted spectra and the sinks
# Weighting each token by the total attention it receives (summed over queries and over the query heads of its
# GQA group) measures the directions attention actually reads. Computed on the first `WEIGHTED_CHUNKS` sequences
# (the attention probabilities of every layer are needed, processed in memory-bounded micro-batches) and compared
# with the unweighted spectra of the same sequences. The same pass tells how much attention the first token
# (position 0, the attention sink) receives, next to how large its key and value are.

# %%
tic = time.perf_counter()
w_moments, _ = accumulate_moments(model, sub, batch_size=BATCH_SIZE, parts=PARTS, skip_first=SEGMENTS,
                                  weighting="attention")
weighted_seconds = time.perf_counter() - tic
variants = {  # all on the same WEIGHTED_CHUNKS sequences
    "unweighted, all tokens": Spectra.from_moments(combine(sub_moments, 0)),
    f"unweighted, positions < {SINKS} excluded": Spectra.from_moments(combine(sub_moments, SINKS)),
    "attention-weighted, all tokens": Spectra.from_moments(combine(w_moments, 0)),
    f"attention-weighted, positions < {SINKS} excluded": Spectra.from_moments(combine(w_moments, SINKS)),
}
weighted = pd.DataFrame({name: {LABEL[p]: float(s.rank_for_energy(p, ENERGY).double().mean()) for p in PARTS}
                         for name, s in variants.items()})
print(f"{sub.numel():,} tokens, {weighted_seconds:.0f} s")
weighted.round(1).rename_axis(f"mean rank for {ENERGY:.0%}")


# %%
def mean_sq_norm(m):  # (L, H) mean squared norm per token
    return m.s2.diagonal(dim1=-2, dim2=-1).sum(-1) / m.weight


sink_rows = {}
for part in ("keys", "values"):
    ratio = (mean_sq_norm(moments[(0, 1)][part]) / mean_sq_norm(moments[(SINKS, None)][part])).sqrt()  # (L, H)
    sink_rows[f"{part}: RMS norm at position 0 / positions ≥ {SINKS}"] = ratio.mean(1).numpy()
received = {seg: m["keys"].weight for seg, m in w_moments.items()}  # (L, H) attention mass per segment
total = sum(received.values())
sink_rows["share of attention received by position 0"] = (received[(0, 1)] / total).mean(1).numpy()
sink_layers = pd.DataFrame(sink_rows)

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for column in sink_layers.columns[:2]:
    axes[0].plot(layers, sink_layers[column], marker="o", ms=3, label=column.split(":")[0])
axes[0].axhline(1, color="grey", lw=0.8, ls=":")
axes[0].set(xlabel="layer", ylabel=f"RMS norm, position 0 / positions ≥ {SINKS}", yscale="log",
            title="Size of the first token's key and value")
axes[0].legend()
axes[1].plot(layers, sink_layers.iloc[:, 2], marker="o", ms=3, color="k")
axes[1].set(xlabel="layer", ylabel="fraction of all attention", ylim=(0, 1),
            title="Attention received by position 0")
savefig(fig, "sinks_by_layer")
sink_layers.describe().loc[["mean", "min", "max"]].round(2)

# %%
fig, ax = plt.subplots(figsize=(7, 4))
x = np.arange(len(PARTS))
for offset, (name, s) in zip((-0.3, -0.1, 0.1, 0.3), variants.items()):
    ax.bar(x + offset, [float(s.rank_for_energy(p, ENERGY).double().mean()) for p in PARTS], 0.2, label=name)
ax.set_xticks(x, [LABEL[p] for p in PARTS])
ax.set(ylabel=f"mean rank for {ENERGY:.0%} energy",
       title=f"Sinks and attention weighting ({sub.numel():,} tokens)")
ax.legend(fontsize=8)
savefig(fig, "sinks_and_weighting")

# %% [markdown]
# ## Reading
# What the full run (64 x 512 wiki calibration tokens, SmolLM2-135M dequantised from 4-bit GGUF) shows; the quick
# run shows the same ordering with smaller numbers (fewer tokens give a lower-rank estimate):
#
# - **Keys are far lower-rank than values.** Holding 90 % of the energy takes about 25 of 64 dimensions for a
#   post-RoPE key head on average and about 47 for a value head; keys need fewer dimensions than values in almost
#   every (layer, head) (99 %). Effective ranks differ even more (about 9 vs 42): in most key heads the top
#   direction alone holds half of the energy, while a value head needs about 13 directions for half. A
#   feature-axis budget should therefore not be split evenly between K and V.
# - **RoPE raises the keys' rank.** Before RoPE a key head needs about 10 dimensions for 90 %, after RoPE about 25:
#   consistent with the position-dependent rotation smearing each pre-RoPE direction over the 2-D planes RoPE
#   rotates (the figures measure the rise, not its cause). The cache stores post-RoPE
#   keys, so the post-RoPE spectrum is the one a projection of the cached keys faces.
# - **The energy is mostly a mean direction.** Centred (covariance) spectra need far more dimensions for keys
#   (about 40 instead of 25 post-RoPE, about 32 instead of 10 pre-RoPE): a large shared offset carries much of the
#   keys' energy. Uncentred PCA, used here and by the PCA method, keeps that offset in its first direction.
# - **The sinks do not dominate the moments in this model.** Contrary to the usual picture, the first token's key
#   and value are *smaller* than average in most layers (RMS-norm ratio well below 1 beyond the first few layers),
#   though from layer ~12 on it receives roughly half of all attention. Leaving out the first 4 positions changes
#   the mean rank for 90 % by less than one dimension. (Calibration chunks start mid-text without a BOS token; the
#   first position still acts as the sink.)
# - **Attention weighting lowers the key rank.** Weighting tokens by the attention they receive lowers the
#   dimensions needed for 90 % clearly for keys (about 24 -> 20 post-RoPE, 9.5 -> 7 pre-RoPE, on the same 8k
#   tokens) and only slightly for values (about 46 -> 44): the keys attention reads most are more concentrated in
#   a few directions than the average key. Including the sink changes the weighted spectra by about one
#   dimension, although it receives half the attention, because that weight multiplies a small vector.

# %%
def mean_rank(s: Spectra, part: str, fraction: float = ENERGY) -> float:
    return float(s.rank_for_energy(part, fraction).double().mean())


r_keys, r_values = no_sinks.rank_for_energy("keys", ENERGY), no_sinks.rank_for_energy("values", ENERGY)
results = {
    "quick": QUICK,
    "model": MODEL,
    "n_tokens": int(ids.numel()),
    "sinks": SINKS,
    **{f"rank90_{p}": mean_rank(no_sinks, p) for p in PARTS},
    **{f"eff_rank_{p}": float(no_sinks.effective_rank(p).mean()) for p in PARTS},
    "seconds_total": seconds["total"],
    "seconds_forward": seconds["forward"],
    "seconds_accumulate": seconds["accumulate"],
    "seconds_eigh": seconds["eigh"],
    "frac_heads_keys_below_values": float((r_keys < r_values).double().mean()),
    "rank90_with_sinks": {p: mean_rank(with_sinks, p) for p in PARTS},
    "eff_rank_with_sinks": {p: float(with_sinks.effective_rank(p).mean()) for p in PARTS},
    "rank90_centred": {p: mean_rank(centred, p) for p in PARTS},
    "rank50": {p: mean_rank(no_sinks, p, 0.5) for p in PARTS},
    "rank99": {p: mean_rank(no_sinks, p, 0.99) for p in PARTS},
    "rank90_range": {p: [int(no_sinks.rank_for_energy(p, ENERGY).min()),
                         int(no_sinks.rank_for_energy(p, ENERGY).max())] for p in PARTS},
    "rank90_weighted": {name: {p: float(v) for p, v in zip(PARTS, weighted[name])} for name in weighted},
    "sink_key_norm_ratio_by_layer": sink_layers.iloc[:, 0].round(3).tolist(),
    "sink_value_norm_ratio_by_layer": sink_layers.iloc[:, 1].round(3).tolist(),
    "sink_attention_share_by_layer": sink_layers.iloc[:, 2].round(3).tolist(),
    "key_figure": key_figure.name,
}
save_results(results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
