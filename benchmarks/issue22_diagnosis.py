"""Issue 22 diagnosis (the numbers of notebook 05 section 6, at 1,024 tokens): needle value tokens kept per (layer, kv head)
after KV-Compress variants and SnapKV at 8x, query-aware, beside the full model's retrieval share. One JSON line each.

    OMP_NUM_THREADS=1 python benchmarks/issue22_diagnosis.py > data/results/issue22/diagnosis.jsonl
"""
import json, time, torch, kvlab
from kvlab.analysis.needle_trace import needle_trace, retrieval_share
model, tok = kvlab.load_model("smollm2")
LEN, N, RATE = 1024, 2, 8
V = {"paper": {}, "pool 15, per layer": {"kernel": 15, "scope": "layer"},
     "pool 15 after, per layer": {"kernel": 15, "scope": "layer", "pool_align": "after"},
     "pool 15, floor 64": {"kernel": 15, "floor": 64}, "snapkv": None}
items = [it for i in range(N) for it in kvlab.data.needle(tok, context_len=LEN, depth=(i + 0.5) / N, seed=i)]
t = time.time()
share = torch.stack([retrieval_share(model, tok, it) for it in items]).mean(0)
top = share.flatten().topk(5).indices
print(json.dumps({"share_max": float(share.max()), "share_top5": share.flatten()[top].tolist(), "top": top.tolist(), "share_layer_mean": share.mean(1).tolist()}), flush=True)
for name, opts in V.items():
    m = kvlab.methods.get("snapkv", 1 / RATE) if opts is None else kvlab.methods.get("kvcompress", 1 / RATE, **opts)
    ts = [needle_trace(model, tok, m, it) for it in items]
    kept = torch.stack([x.kept for x in ts]).mean(0); counts = torch.stack([x.counts.double() for x in ts]).mean(0)
    print(json.dumps({"variant": name, "heads_all_value": [int(x.all_kept().sum()) for x in ts],
        "value_kept_top5": float(kept.flatten()[top].mean()), "counts_top5": counts.flatten()[top].tolist(),
        "counts_median": float(counts.median()), "counts_layer0": counts[0].tolist(), "counts_min": float(counts.min()), "counts_max": float(counts.max()),
        "seconds": round(time.time() - t)}), flush=True)
