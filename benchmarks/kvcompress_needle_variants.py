"""KV-Compress metric variants on the needle (issue 6): SmolLM2, 2,048-token needle items, query-aware setting (the
question is compressed with the document), ``n`` items at depths (i + 0.5) / n, greedy answers scored by normalised
substring match. Configurations: the full cache; ``kvcompress`` as the paper (per-token metric, one model-wide
ranking), with max pooling over 7 positions, and with a per-layer budget (``scope="layer"``) with pooling over 7 and
15; SnapKV (pooling 7) at the same budget. One JSON line per configuration on stdout.

    OMP_NUM_THREADS=1 python benchmarks/kvcompress_needle_variants.py 12 > data/results/kvcompress_variants/needle.jsonl
"""

import json
import sys
import time

import kvlab
from kvlab.eval.longcontext import long_context


def main(n: int) -> None:
    model, tok = kvlab.load_model("smollm2")
    configs = [("full", 1.0, {})]
    for budget in (0.5, 0.125):
        configs += [("kvcompress", budget, {}), ("kvcompress", budget, {"kernel": 7}),
                    ("kvcompress", budget, {"kernel": 7, "scope": "layer"}),
                    ("kvcompress", budget, {"kernel": 15, "scope": "layer"}), ("snapkv", budget, {})]
    for name, budget, options in configs:
        method = kvlab.methods.get(name, None if name == "full" else budget, **options)
        start = time.time()
        result = long_context(model, tok, method, "needle", 2048, n, setting="query_aware", batch_size=1,
                              progress=False)
        print(json.dumps({"method": name, "budget": budget, "opts": options, "n": result["n"], "acc": result["acc"],
                          "hits": sum(r["score"] for r in result["records"]), "seconds": round(time.time() - start),
                          "kv_budget": result.get("kv_bytes", {}).get("budget")}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
