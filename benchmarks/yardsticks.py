"""The long-context yardsticks (issue 20) for a set of methods at one budget: continuation perplexity after a
compressed context, and needle retrieval (query-aware and query-agnostic) over lengths and depths, with 95 %
intervals. Every configuration is one JSON under ``--out`` (skipped when it exists, so a run resumes and a bounded
run keeps what finished); ``--table`` prints what is there.

    python benchmarks/yardsticks.py --model smollm2 --budget 0.125 --methods full,streaming,h2o,snapkv \\
        --contexts 2048 --docs 8 --needle-lengths 2048 --depths 0.1,0.5,0.9 --needles-per-cell 2
    python benchmarks/yardsticks.py --model smollm2 --table

Streaming and H2O run with ``decode=True`` (they hold the budget over the continuation too); SnapKV compresses the
prompt once (its paper's setting) and keeps what follows, so it holds more: every row carries its measured budget.
Continuation ratios are paired over the same documents against ``full`` (t interval of the per-document NLL
difference, exponentiated).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OPTIONS = {"streaming": {"decode": True}, "h2o": {"decode": True}, "snapkv": {}}
OUT = Path("data/results/yardsticks")


def _method(name: str, budget: float):
    from kvlab import methods

    if name in ("full", "none"):
        return methods.get(name)
    return methods.get(name, budget, **OPTIONS.get(name, {}))


def run(args) -> None:
    import kvlab
    from kvlab.eval import continuation_ppl, needle_grid

    model, tok = kvlab.load_model(args.model)
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    names = args.methods.split(",")
    jobs = [("continuation", c, m) for c in args.contexts for m in names]
    jobs += [("needle", n, m) for n in args.needle_lengths for m in names]
    for kind, length, name in jobs:
        budget = 1.0 if name in ("full", "none") else args.budget
        path = out / f"{kind}-{length}-{name}@{budget:g}.json"
        if path.exists():
            continue
        method = _method(name, budget).prepare(model, tok)
        tic = time.perf_counter()
        if kind == "continuation":
            r = continuation_ppl(model, tok, method, context_len=length, continuation_len=args.continuation,
                                 n_docs=args.docs, progress=False)
            record = {k: v for k, v in r.items() if k != "kv_bytes"}
        else:
            table = needle_grid(model, tok, method, lengths=(length,), depths=args.depths,
                                n_per_cell=args.needles_per_cell, progress=False)
            record = {"rows": table.to_dict(orient="records")}
        record.update(kind=kind, length=length, method=name, budget_nominal=budget, model=args.model,
                      options=OPTIONS.get(name, {}), wall_seconds=time.perf_counter() - tic,
                      command="python benchmarks/yardsticks.py " + " ".join(args.argv))
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{path.name}: {time.perf_counter() - tic:.0f}s", flush=True)


def table(args) -> None:
    import pandas as pd

    from kvlab.eval import summarise
    from kvlab.eval.stats import paired_ratio_interval

    out = Path(args.out) / args.model
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    full = {r["length"]: r for r in records if r["kind"] == "continuation" and r["method"] == "full"}
    print(f"## {args.model}: continuation perplexity ({args.continuation} tokens after a compressed context)\n")
    print("| context | method | measured budget | ppl [95 % CI] | x full [95 % CI, paired] | docs |")
    print("|---|---|---|---|---|---|")
    for r in sorted((r for r in records if r["kind"] == "continuation"), key=lambda r: (r["length"], r["method"])):
        ref = full.get(r["length"])
        ratio = "—"
        if ref is not None and r["method"] != "full" and len(ref["doc_nll"]) == len(r["doc_nll"]) > 1:
            p = paired_ratio_interval(r["doc_nll"], ref["doc_nll"])
            ratio = f"{p['ratio']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
        lo, hi = r["ci95"]
        print(f"| {r['length']} | {r['method']} | {r['budget']:.3f} | {r['ppl']:.2f} [{lo:.2f}, {hi:.2f}] | "
              f"{ratio} | {r['n_docs']} |")
    rows = [dict(row, method=r["method"]) for r in records if r["kind"] == "needle" for row in r["rows"]]
    if rows:
        frame = pd.DataFrame(rows)
        print(f"\n## {args.model}: needle retrieval (hits / n, Wilson 95 % CI)\n")
        print("| length | setting | method | measured budget | hits / n | acc [95 % CI] |")
        print("|---|---|---|---|---|---|")
        for (method, length, setting), part in frame.groupby(["method", "length", "setting"]):
            s = summarise(part, by=("setting",)).iloc[0]
            print(f"| {length} | {setting} | {method} | {part['budget'].mean():.3f} | {s.hits} / {s.n} | "
                  f"{s.acc:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}] |")


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--budget", type=float, default=0.125)
    p.add_argument("--methods", default="full,streaming,h2o,snapkv")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048])
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--needle-lengths", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048])
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.1, 0.5, 0.9])
    p.add_argument("--needles-per-cell", type=int, default=2)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    table(args) if args.table else run(args)


if __name__ == "__main__":
    main()
