# %% [markdown]
# # 10 · Explorer: one head under one method
#
# Pick a model, a method, a budget (and method options as `key=value`), a layer and a kv head; the explorer shows
# at once the head's spectrum with the ranks kept, the attention map of a prompt with the kept / evicted tokens
# (token eviction) or the projected keys' attention and its error (feature projection), the measured bytes of the
# prompt's cache vs full, and the perplexity of a short text vs full (each method's own protocol: compressed
# attention throughout for projections, compress the context then continue for eviction).
#
# The model, one capture of the prompt and each method's fitted tensors (the shipped bases) are cached, so a change
# of layer or head answers at once and a change of method or budget in seconds. Logic: `kvlab.explorer`. Run in
# JupyterLab (`make lab`); in the report (nbconvert, no one to move a widget) the same figure is rendered statically.

# %% tags=["parameters"]
QUICK = False
MODEL = "smollm2"
METHOD = "pca"  # full, pca, matryoshka, streaming, h2o, snapkv
BUDGET = 0.5
LAYER = 15
HEAD = 0
PROMPT_TOKENS = 128  # tokens of wiki text in the attention map
PPL_CHUNKS = 1  # perplexity text: chunks of CHUNK_LEN tokens (short, so each change answers in seconds)
CHUNK_LEN = 256
TABLE_METHODS = ["full", "pca", "matryoshka", "streaming", "h2o", "snapkv"]
TABLE_BUDGETS = [0.75, 0.5, 0.25, 0.125]

# %%
if QUICK:
    TABLE_METHODS, TABLE_BUDGETS = ["full", "pca", "h2o"], [0.5, 0.25]

from kvlab.explorer import Explorer
from kvlab.plotting import use_style
from kvlab.report import save_results

use_style()
explorer = Explorer(MODEL, prompt_tokens=PROMPT_TOKENS, ppl_chunks=PPL_CHUNKS, chunk_len=CHUNK_LEN)
shown = explorer.show(method=METHOD, budget=BUDGET, layer=LAYER, head=HEAD)

# %% [markdown]
# ## Every method at a few budgets
# The same measurements as the explorer's bar chart (measured bytes of the prompt's cache, perplexity of the short
# text), for a grid of methods and budgets.

# %%
table = explorer.table(TABLE_METHODS, TABLE_BUDGETS)
table.round(4)

# %%
view = shown or explorer.compute(METHOD, BUDGET, layer=LAYER, head=HEAD)
save_results({
    "model": MODEL,
    "quick": QUICK,
    "selection": view.summary(),
    "table": table.to_dict(orient="records"),
    "prompt_tokens": PROMPT_TOKENS,
    "ppl_tokens": PPL_CHUNKS * CHUNK_LEN,
    "key_figure": "explorer.png",
})
