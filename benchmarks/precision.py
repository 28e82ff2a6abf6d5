"""Precision axis (issue 21): continuation perplexity of `quant` at 2/4/8 bits and of the compositions with the
feature and token axes, at the bytes they measure (bf16 view), SmolLM2, wiki eval text.

Protocol "context" for every configuration (prefill the first ``context_frac`` of each chunk, ``compress``, score
the rest), so token eviction, projections, quantization and their compositions are scored on the same tokens; the
quantized caches are written as the model reads (nothing to compress). Budgets are the measured bytes over a full
cache's, floating bytes counted in bf16 (``kv_bytes(dtype="bf16")``).

Each configuration is one JSON under ``--out`` (skipped when it exists); ``--table`` prints the markdown table.
``--logits`` measures the largest |logit| difference of `quant` (8 bits) from the full cache on one chunk.

    python benchmarks/precision.py                   # every configuration in CONFIGS
    python benchmarks/precision.py --only quant-2b-g32 --chunks 2
    python benchmarks/precision.py --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT = Path("data/results/precision")
# label -> (method, budget or None, options)
H2O = {"decode": True}  # H2O evicts the scored tokens too: every configuration holds its budget to the end
CONFIGS = {
    "full": ("full", None, {}),
    "quant-8b-g32": ("quant", None, {"bits": 8, "group_size": 32, "residual": 32}),
    "quant-4b-g32": ("quant", None, {"bits": 4, "group_size": 32, "residual": 32}),
    "quant-2b-g32": ("quant", None, {"bits": 2, "group_size": 32, "residual": 32}),
    "quant-2b-g64": ("quant", None, {"bits": 2, "group_size": 64, "residual": 32}),
    # one eighth of the bf16 bytes
    "h2o@1/8": ("h2o", 0.125, H2O),
    "pca@1/8": ("pca", 0.125, {}),
    "pca+h2o@1/8": ("composed", 0.125, {"feature": "pca", "token": "h2o", "feature_budget": 0.5, "token_options": H2O}),
    "h2o+4b@1/8": ("composed", 0.125, {"feature": None, "token": "h2o", "bits": 4, "token_options": H2O}),
    "pca+4b@1/8": ("composed", 0.125, {"feature": "pca", "token": None, "bits": 4}),
    "pca+h2o+4b@1/8": ("composed", 0.125, {"feature": "pca", "token": "h2o", "bits": 4, "feature_budget": 0.5,
                                           "token_options": H2O}),
    # one sixteenth
    "h2o@1/16": ("h2o", 0.0625, H2O),
    "pca@1/16": ("pca", 0.0625, {}),
    "pca+h2o@1/16": ("composed", 0.0625, {"feature": "pca", "token": "h2o", "feature_budget": 0.25,
                                          "token_options": H2O}),
    "h2o+2b@1/16": ("composed", 0.0625, {"feature": None, "token": "h2o", "bits": 2, "token_options": H2O}),
    "h2o+4b@1/16": ("composed", 0.0625, {"feature": None, "token": "h2o", "bits": 4, "token_options": H2O}),
    "pca+h2o+4b@1/16": ("composed", 0.0625, {"feature": "pca", "token": "h2o", "bits": 4, "feature_budget": 0.5,
                                             "token_options": H2O}),
}


def _method(name, budget, options):
    import kvlab

    return kvlab.methods.get(name, budget, **options)


def run(labels, out: Path, chunks: int, chunk_len: int, context_frac: float) -> None:
    import torch

    import kvlab
    from kvlab.eval.forward import Meter
    from kvlab.eval.perplexity import perplexity

    model, tok = kvlab.load_model("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    for label in labels:
        path = out / f"{label.replace('/', '_')}.json"
        if path.exists():
            continue
        name, budget, options = CONFIGS[label]
        method = _method(name, budget, options).prepare(model, tok)
        tic = time.perf_counter()
        meter = Meter(dtype="bf16")
        r = perplexity(model, tok, method, "wiki", chunk_len=chunk_len, n_chunks=chunks, protocol="context",
                       context_frac=context_frac, progress=False, meter=meter)
        views = {"bf16": meter.kv_dict()}
        record = {"label": label, "method": name, "options": {k: v for k, v in method.options().items()
                                                              if not hasattr(v, "shape")},
                  "ppl": r["ppl"], "tokens": r["tokens"], "chunks": chunks, "chunk_len": chunk_len,
                  "context_frac": context_frac, "kv_bytes": views["bf16"], "budget_bf16": views["bf16"]["budget"],
                  "seconds": time.perf_counter() - tic, "threads": torch.get_num_threads()}
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"{label}: ppl {r['ppl']:.3f}  budget(bf16) {record['budget_bf16']:.4f}  {record['seconds']:.0f}s",
              flush=True)


def logits_gap(chunk_len: int = 512) -> None:
    import torch

    import kvlab

    model, tok = kvlab.load_model("smollm2")
    ids = kvlab.data.text_chunks("wiki", tok, chunk_len=chunk_len, n_chunks=1, split="eval")
    with torch.no_grad():
        full = model(ids).logits
        for bits in (8, 4, 2):
            with kvlab.methods.get("quant", bits=bits, group_size=32, residual=0).apply(model) as cache:
                out = model(ids, past_key_values=cache, use_cache=True).logits
            print(f"quant {bits} bits, residual 0, {chunk_len} tokens: max |logit - full| = "
                  f"{float((out - full).abs().max()):.4f}; mean {float((out - full).abs().mean()):.5f}", flush=True)


def table(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    full = next((r["ppl"] for r in rows if r["label"] == "full"), None)
    print("| configuration | measured budget (bf16) | ppl | x full |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["budget_bf16"]):
        ratio = f"{r['ppl'] / full:.3f}" if full else "—"
        print(f"| {r['label']} | {r['budget_bf16']:.4f} | {r['ppl']:.3f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="labels of CONFIGS to run")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-len", type=int, default=1024)
    parser.add_argument("--context-frac", type=float, default=0.75)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--logits", action="store_true")
    args = parser.parse_args()
    if args.table:
        return table(args.out)
    if args.logits:
        return logits_gap()
    labels = args.only or list(CONFIGS)
    unknown = [x for x in labels if x not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    run(labels, args.out, args.chunks, args.chunk_len, args.context_frac)


if __name__ == "__main__":
    main()
