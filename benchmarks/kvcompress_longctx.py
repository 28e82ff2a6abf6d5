"""Long-context table (KV-Compress issue): needle retrieval at 2k tokens for KV-Compress, H2O, SnapKV and StreamingLLM
at compression 2x .. 64x, SmolLM2, both settings (query-aware: question compressed with the document, as in the
KV-Compress paper; query-agnostic: compress the document, then ask).

Each configuration is one ``kvlab.eval.run.evaluate`` call (protocol "context"), written as JSON under ``--out``
(skipped when the file exists, so the run resumes). ``--table`` prints the markdown table of what is there, with the
measured and theoretical budgets (bytes kept / full cache bytes) beside the nominal one.

    python benchmarks/kvcompress_longctx.py --n 10 --rates 2 4 8 16 32 64
    python benchmarks/kvcompress_longctx.py --n 2 --rates 8 --methods kvcompress      # smoke run
    python benchmarks/kvcompress_longctx.py --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = ("kvcompress", "h2o", "snapkv", "streaming")
RATES = (2, 4, 8, 16, 32, 64)
OUT = Path("data/results/kvcompress")


def run(methods, rates, out: Path, n: int, context_len: int, seed: int, with_full: bool) -> None:
    import kvlab
    from kvlab.eval.run import evaluate

    model, tok = kvlab.load_model("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    configs = ([("full", 1)] if with_full else []) + [(m, r) for r in rates for m in methods]
    for name, rate in configs:
        path = out / f"{name}@{rate}x-ctx{context_len}-n{n}-seed{seed}.json"
        if path.exists():
            print(f"skip {path} (exists)")
            continue
        method = kvlab.methods.get(name, None if name == "full" else 1.0 / rate)
        start = time.perf_counter()
        result = evaluate(model, tok, method, tasks=["needle"], limit=n, context_len=context_len, seed=seed,
                          protocol="context", progress=False)
        needle = result["tasks"]["needle"]
        for setting in needle["settings"].values():
            setting.pop("records", None)  # keep the table small; rerun with kvlab eval --json for the answers
        needle.pop("records", None)
        record = {"method": name, "rate": rate, "budget_nominal": 1.0 / rate, "context_len": context_len, "n": n,
                  "seed": seed, "options": method.options(), "kv_bytes": result["kv_bytes"],
                  "acc": {s: v["acc"] for s, v in needle["settings"].items()},
                  "seconds": time.perf_counter() - start, "result": result}
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"{name}@{rate}x: acc {record['acc']}, measured budget {result['kv_bytes']['budget']:.4f} "
              f"(theoretical {result['kv_bytes']['theoretical_budget']:.4f}), {record['seconds']:.0f} s")


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = ["| method | compression | n | query-aware acc | query-agnostic acc | measured budget | theoretical "
             "budget |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["rate"], r["method"] != "full", r["method"])):
        acc = r["acc"]
        lines.append(f"| {r['method']} | {r['rate']}x | {r['n']} | {acc.get('query_aware', float('nan')):.2f} | "
                     f"{acc.get('query_agnostic', float('nan')):.2f} | {r['kv_bytes']['budget']:.4f} | "
                     f"{r['kv_bytes']['theoretical_budget']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rates", nargs="+", type=int, default=list(RATES), help="compression rates (budget = 1/rate)")
    parser.add_argument("--n", type=int, default=10, help="needle items per configuration")
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache reference")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of the results under --out and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    bad = [r for r in args.rates if r < 1]
    if bad or args.n < 1:
        parser.error(f"rates must be >= 1 and n >= 1, got rates {args.rates}, n {args.n}")
    run(args.methods, args.rates, args.out, args.n, args.context_len, args.seed, not args.no_full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
