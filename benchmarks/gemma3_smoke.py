"""Smoke run of every training-free method (and PCA fitted on the fly, 4 calibration chunks) on the real gemma3-270m:
continuation perplexity after a 600-token context (beyond the 512-token sliding window), 64 tokens scored, 1 document.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/gemma3_smoke.py   # writes data/results/gemma3_smoke/continuation-600.json
"""
import json, time, sys
import kvlab
from kvlab import methods
from kvlab.eval import continuation_ppl

model, tok = kvlab.load_model("gemma3-270m")
print(kvlab.ModelSpec.from_model(model), flush=True)
rows = []
for name, budget, opts in [("none", None, {}), ("full", None, {}), ("streaming", 0.125, {"decode": True}),
                           ("h2o", 0.125, {"decode": True}), ("snapkv", 0.125, {}), ("kvcompress", 0.125, {}),
                           ("pca", 0.5, {"calib_chunks": 4, "source": None})]:
    m = methods.get(name, budget, **opts) if budget else methods.get(name)
    t = time.perf_counter()
    try:
        r = continuation_ppl(model, tok, m, context_len=600, continuation_len=64, n_docs=1, progress=False)
        row = dict(method=name, budget=budget, ppl=r["ppl"], measured=r["budget"],
                   vs_reference=r["budget_vs_reference"], seconds=time.perf_counter() - t)
    except Exception as e:  # report, keep going
        row = dict(method=name, error=repr(e)[:300])
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open("data/results/gemma3_smoke/continuation-600.json", "w"), indent=1)
