# %% [markdown]
# # 09 · The precision axis: quantized KV (KIVI) and its compositions with features and tokens
#
# Quantization is the most deployed KV compression. kvlab's `quant` stores keys quantized **per channel** (a scale
# and zero point per channel per block of `group_size` tokens) and values **per token** (per group of `group_size`
# channels), the `residual` most recent tokens at full precision, codes packed 8 / bits per byte and float16 scales —
# all counted in the measured bytes. Bytes here are in the **bf16 view** (`kv_bytes(dtype="bf16")`: floating
# tensors counted at 2 bytes, what people deploy; integer codes and float16 scales as stored).
#
# 1. The distributions of K and V from real captures: outlier channels, outlier tokens, and the error of each
#    grouping — what motivates KIVI's choice.
# 2. `quant` at 8 / 4 / 2 bits: continuation perplexity and measured bytes.
# 3. The compositions under one byte budget: features x precision, tokens x precision, all three, beside the
#    single axes.
#
# Protocol for 2 and 3: "context" (prefill the first 3/4 of each wiki eval chunk, compress, score the rest), the same
# for every method, so token eviction, projections and quantization are scored on the same tokens.

# %% tags=["parameters"]
QUICK = False
MODEL = "smollm2"
LAYERS = (0, 7, 15, 23, 29)  # captured for section 1
DIST_CHUNKS, DIST_LEN = 4, 512  # calibration text for the distributions
BITS = (8, 4, 2)
GROUP, RESIDUAL = 32, 32
N_CHUNKS, CHUNK_LEN, CONTEXT_FRAC = 4, 1024, 0.75
H2O = {"decode": True}
CONFIGS = {  # label -> (method, budget, options): single axes and compositions at 1/8 of the bf16 bytes
    "h2o": ("h2o", 0.125, H2O),
    "pca": ("pca", 0.125, {}),
    "pca x h2o": ("composed", 0.125, {"feature": "pca", "token": "h2o", "feature_budget": 0.5, "token_options": H2O}),
    "h2o x 4-bit": ("composed", 0.125, {"feature": None, "token": "h2o", "bits": 4, "token_options": H2O}),
    "pca x 4-bit": ("composed", 0.125, {"feature": "pca", "token": None, "bits": 4}),
    "pca x h2o x 4-bit": ("composed", 0.125, {"feature": "pca", "token": "h2o", "bits": 4, "feature_budget": 0.5,
                                              "token_options": H2O}),
}
SEED = 0

# %%
if QUICK:
    LAYERS, DIST_CHUNKS, DIST_LEN = (0, 15), 1, 256
    N_CHUNKS, CHUNK_LEN = 1, 256
    CONFIGS = {k: CONFIGS[k] for k in ("h2o", "pca x h2o x 4-bit")}

import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

import kvlab
from kvlab.analysis.precision import kv_distribution
from kvlab.eval.forward import Meter
from kvlab.eval.perplexity import perplexity
from kvlab.plotting import savefig, use_style
from kvlab.report import save_results

use_style()
torch.manual_seed(SEED)
T_START = time.perf_counter()
model, tok = kvlab.load_model(MODEL)
spec = kvlab.ModelSpec.from_model(model)
seconds = {}
print(f"{MODEL}: {spec.n_layers} layers x {spec.n_kv_heads} kv heads x head_dim {spec.head_dim}; "
      f"{torch.get_num_threads()} threads")

# %% [markdown]
# ## 1 · What K and V look like per channel and per token
# Captured post-RoPE keys and values of wiki calibration text (the first 4 tokens of each chunk, the attention sinks,
# left out). `channel_outlier`: the largest per-channel |x| max over the median channel's; `token_outlier`: the same
# over tokens. `err_per_channel` / `err_per_token`: relative error of 2-bit quantization grouped per channel (blocks
# of 32 tokens) or per token (groups of 32 channels).

# %%
tic = time.perf_counter()
ids = kvlab.data.text_chunks("wiki", tok, chunk_len=DIST_LEN, n_chunks=DIST_CHUNKS, split="calib")
cap = kvlab.capture(model, ids, what=("keys", "values"), layers=list(LAYERS))
dist = kv_distribution(cap.keys, cap.values, bits=2, group=GROUP, skip=4)
summary = dist.groupby("part")[["channel_outlier", "token_outlier", "err_per_channel", "err_per_token"]].mean()
display(summary.round(3))
seconds["distributions"] = time.perf_counter() - tic

layer, head = LAYERS[-1], 0
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for ax, (part, t) in zip(axes, (("keys", cap.keys[layer]), ("values", cap.values[layer]))):
    x = t[:, head, 4:].reshape(-1, spec.head_dim).abs()
    ax.plot(x.amax(0).numpy(), label="max |x| per channel")
    ax.plot(x.median(0).values.numpy(), label="median |x| per channel")
    ax.set(title=f"{part}, layer {layer}, kv head {head}", xlabel="channel", ylabel="|x|")
    ax.legend()
key_figure = savefig(fig, "channels")

# %% [markdown]
# ## 2 · `quant` at 8, 4 and 2 bits

# %%


def run(method) -> dict:
    meter = Meter(dtype="bf16")
    r = perplexity(model, tok, method, "wiki", chunk_len=CHUNK_LEN, n_chunks=N_CHUNKS, protocol="context",
                   context_frac=CONTEXT_FRAC, progress=False, meter=meter)
    kv = meter.kv_dict()
    return {"ppl": r["ppl"], "tokens": r["tokens"], "budget_bf16": kv["budget"],
            "theoretical_bf16": kv["theoretical_budget"]}


tic = time.perf_counter()
rows = {"full": run(kvlab.methods.get("full"))}
for bits in BITS:
    rows[f"quant {bits}-bit"] = run(kvlab.methods.get("quant", bits=bits, group_size=GROUP, residual=RESIDUAL))
seconds["quant"] = time.perf_counter() - tic
full_ppl = rows["full"]["ppl"]
quant_table = pd.DataFrame(rows).T.assign(x_full=lambda d: d["ppl"] / full_ppl)
display(quant_table.round(4))

# %% [markdown]
# ## 3 · One byte budget over three axes (1/8 of the bf16 bytes)
# Single axes (H2O, PCA at uniform rank 1/8) and compositions: the feature fraction f (rank / head_dim), the
# precision fraction p (bits / 16 + 2 / group_size) and the token fraction t = budget / (f p). H2O evicts the scored
# tokens too (`decode=True`), so every configuration holds its budget to the end.

# %%
tic = time.perf_counter()
comp = {}
for label, (name, budget, options) in CONFIGS.items():
    method = kvlab.methods.get(name, budget, **options).prepare(model, tok)
    comp[label] = run(method)
seconds["compositions"] = time.perf_counter() - tic
comp_table = pd.DataFrame(comp).T.assign(x_full=lambda d: d["ppl"] / full_ppl)
display(comp_table.round(4))

fig, ax = plt.subplots(figsize=(6.5, 4))
for table, marker in ((quant_table.drop(index="full"), "o"), (comp_table, "s")):
    ax.scatter(table["budget_bf16"], table["x_full"], marker=marker)
    for label, row in table.iterrows():
        ax.annotate(label, (row["budget_bf16"], row["x_full"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
ax.set(xscale="log", yscale="log", xlabel="measured bytes / full cache (bf16 view)",
       ylabel="continuation perplexity / full", title="precision, features, tokens")
savefig(fig, "frontier")

# %%
seconds["total"] = time.perf_counter() - T_START
results = {
    "quick": QUICK, "model": MODEL, "layers": list(LAYERS), "group": GROUP, "residual": RESIDUAL,
    "distribution": summary.round(5).to_dict("index"),
    "full_ppl": full_ppl, "quant": quant_table.round(5).to_dict("index"),
    "compositions": comp_table.round(5).to_dict("index"),
    "protocol": {"chunks": N_CHUNKS, "chunk_len": CHUNK_LEN, "context_frac": CONTEXT_FRAC, "dtype_view": "bf16"},
    "seconds": seconds, "key_figure": key_figure.name,
}
save_results(results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
