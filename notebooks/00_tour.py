# %% [markdown]
# # 00 · A tour of kvlab
#
# Load the bundled model (SmolLM2-135M-Instruct, dequantised to fp32, fully offline), look at the shapes and the
# bytes of its KV cache, check that kvlab's own cache and attention reproduce the plain model exactly, and run a
# tiny evaluation through the same harness every compression method uses.
#
# Next, to look at one head under any method interactively: the explorer, `notebooks/10_explorer.py` (widgets for
# model, method, budget, layer and kv head; run `make lab` and double-click it).

# %% tags=["parameters"]
QUICK = False
MODEL = "smollm2"
SEED = 0
LIMIT = 100  # items per zero-shot task
PPL_CHUNKS = 12  # 512-token perplexity chunks (12 x 512 = 6k tokens)
CONTEXTS = [128, 256, 512, 1024, 2048]

# %%
if QUICK:
    LIMIT, PPL_CHUNKS, CONTEXTS = 20, 4, [64, 128, 256]

import pandas as pd
import torch
import matplotlib.pyplot as plt

import kvlab
from kvlab.eval.run import evaluate
from kvlab.plotting import heatmap, savefig, use_style
from kvlab.report import save_results

use_style()
torch.manual_seed(SEED)
model, tok = kvlab.load_model(MODEL)
spec = kvlab.ModelSpec.from_model(model)
pd.Series(spec.to_dict()).drop("layer_types").to_frame("value")

# %% [markdown]
# ## The cache of one sequence
# One forward pass through kvlab's cache (`full`: every key and value kept). Each layer stores keys and values of
# shape (batch, kv heads, tokens, head_dim); the bytes come from the storage the cache really allocated.

# %%
text = kvlab.data.text("wiki", split="eval")[:4000]
ids = tok(text, return_tensors="pt")["input_ids"][:, : CONTEXTS[-1]]
full = kvlab.methods.get("full")
with torch.no_grad(), full.apply(model) as cache:
    model(ids, past_key_values=cache, use_cache=True)
layer0 = cache.layers[0]
print("keys of layer 0:", tuple(layer0.keys[:, :, : layer0.get_seq_length()].shape), layer0.keys.dtype)
b = cache.kv_bytes()
print(f"{ids.shape[1]} tokens: full {b.full / 2**20:.2f} MiB, measured {b.measured / 2**20:.2f} MiB, "
      f"{spec.kv_bytes_per_token() / 1024:.1f} KiB per token")
b.by("part")

# %% [markdown]
# ## Bytes grow linearly with the context
# Measured bytes of kvlab's `full` cache and of transformers' `DynamicCache` (method `none`) after a prefill of
# each length, against the formula layers x kv heads x head_dim x 2 x 4 bytes per token.

# %%
rows = []
for n in CONTEXTS:
    for name in ("none", "full"):
        method = kvlab.methods.get(name)
        with torch.no_grad(), method.apply(model) as c:
            model(ids[:, :n], past_key_values=c, use_cache=True)
        rows.append(dict(method=name, tokens=n, measured_mib=kvlab.kv_bytes(c).measured / 2**20))
sizes = pd.DataFrame(rows)
fig, ax = plt.subplots(figsize=(6, 4))
for name, group in sizes.groupby("method"):
    ax.plot(group["tokens"], group["measured_mib"], marker="o", label=f"measured ({name})")
ax.plot(CONTEXTS, [n * spec.kv_bytes_per_token() / 2**20 for n in CONTEXTS], "k--", label="formula")
ax.set(xlabel="context length (tokens)", ylabel="KV cache size (MiB)", title=f"{MODEL} KV cache, fp32, batch 1")
ax.legend()
savefig(fig, "cache_bytes_vs_context")
sizes.pivot(index="tokens", columns="method", values="measured_mib")

# %% [markdown]
# ## kvlab's cache and attention change nothing at 100 % budget
# Logits of the plain model (`none`) and of kvlab's `full` cache on the same batch; then both generate.

# %%
with torch.no_grad():
    ref = model(ids[:, :256]).logits
    with full.apply(model) as c:
        ours = model(ids[:, :256], past_key_values=c, use_cache=True).logits
max_diff = float((ref - ours).abs().max())
prompt = tok("The KV cache of a transformer stores", return_tensors="pt")
gen = dict(max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
plain = model.generate(**prompt, **gen)
with full.apply(model) as c:
    kv = model.generate(**prompt, past_key_values=c, **gen)
print(f"max |logit difference| = {max_diff:.2e}; same generated tokens: {torch.equal(plain, kv)}")
print(tok.decode(kv[0]))

# %% [markdown]
# ## What the heads store
# `kvlab.capture` records keys (before and after RoPE), values, queries and attention probabilities per layer and
# kv head. Here: the mean norm of post-RoPE keys and of values per (layer, kv head).

# %%
cap = kvlab.capture(model, ids[:, :256], what=("keys", "values"))
key_norm = torch.stack([cap.keys[l][0].norm(dim=-1).mean(-1) for l in range(spec.n_layers)])  # (L, H_kv)
value_norm = torch.stack([cap.values[l][0].norm(dim=-1).mean(-1) for l in range(spec.n_layers)])
fig, axes = plt.subplots(1, 2, figsize=(8, 6))
heatmap(axes[0], key_norm.T.numpy(), xlabel="layer", ylabel="kv head", cbar_label="mean key norm")
heatmap(axes[1], value_norm.T.numpy(), xlabel="layer", ylabel="kv head", cbar_label="mean value norm")
savefig(fig, "key_value_norms")

# %% [markdown]
# ## A tiny evaluation through the shared harness
# The same call evaluates every method; here the full cache on a seeded subset (n below) and a few perplexity chunks.

# %%
result = evaluate(model, tok, full, tasks=["piqa", "winogrande"], limit=LIMIT, seed=SEED, progress=False)
ppl = evaluate(model, tok, full, ppl=["wiki"], limit=PPL_CHUNKS, progress=False)["ppl"]
print(f"wiki perplexity {ppl['wiki']['ppl']:.2f} over {ppl['wiki']['tokens']} tokens (512-token chunks)")
pd.DataFrame(result["tasks"]).T[["acc", "acc_norm", "n"]]

# %%
save_results({
    "model": MODEL,
    "quick": QUICK,
    "kv_bytes_per_token": spec.kv_bytes_per_token(),
    "full_vs_none_max_logit_diff": max_diff,
    "full_vs_none_same_generation": bool(torch.equal(plain, kv)),
    "tasks": result["tasks"],
    "ppl": ppl,
    "key_figure": "cache_bytes_vs_context.png",
})
