"""Token-axis sweep (issue 5): "compress the context, then continue" at context lengths 512 .. 4096 for StreamingLLM,
H2O, SnapKV and Attention-Gate at budgets 90 % .. 10 %, SmolLM2, wiki eval text.

Each chunk is ``context + continuation`` tokens; the first ``context`` are prefilled and compressed, the
``continuation`` is then fed in one forward and scored (continuation perplexity, over the full cache's). StreamingLLM
and H2O run with ``decode=True`` and the gate evicts every chunk it sees, so those three hold the budget over the
continuation too (equal measured bytes); SnapKV compresses the prompt once (its paper's setting) and keeps the
continuation, so it holds more bytes: its measured budget is in the table. The gate is the shipped artefact (trained
at 50 %) read at every budget by ranking its scores (``selection="topk"``): at 90 % and 10 % it is used at a rate it
was not trained for.

Each configuration is one JSON under ``--out`` (skipped when it exists, so the run resumes); ``--table`` prints the
markdown table of what is there.

    python benchmarks/token_sweep.py                                  # contexts 512 1024 2048 4096, budgets .9 .5 .1
    python benchmarks/token_sweep.py --contexts 512 --budgets 0.5 --chunks 1     # smoke run
    python benchmarks/token_sweep.py --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = ("streaming", "h2o", "snapkv", "attention_gate")
OPTIONS = {"streaming": {"decode": True}, "h2o": {"decode": True}, "snapkv": {},
           "attention_gate": {"target": 0.5}}  # the shipped gate (trained for 50 %), ranked at every budget
OUT = Path("data/results/token_sweep")


def run(methods, contexts, budgets, out: Path, chunks: int, continuation: int) -> None:
    import kvlab
    from kvlab.eval.perplexity import perplexity

    model, tok = kvlab.load_model("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    configs = [(c, "full", 1.0) for c in contexts] + [(c, m, b) for c in contexts for b in budgets for m in methods]
    for context, name, budget in configs:
        path = out / f"{name}@{budget:g}-ctx{context}-cont{continuation}-n{chunks}.json"
        if path.exists():
            print(f"skip {path} (exists)")
            continue
        method = kvlab.methods.get(name, None if name == "full" else budget, **OPTIONS.get(name, {}))
        method.prepare(model, tok)
        chunk_len = context + continuation
        start = time.perf_counter()
        result = perplexity(model, tok, method, "wiki", chunk_len=chunk_len, n_chunks=chunks, protocol="context",
                            context_frac=context / chunk_len, batch_size=1, progress=False)
        record = {"method": name, "budget": budget, "context": context, "continuation": continuation,
                  "chunks": result["n_chunks"], "options": method.options(), "ppl": result["ppl"],
                  "tokens": result["tokens"], "measured_budget": result["kv_bytes"]["budget"],
                  "theoretical_budget": result["kv_bytes"]["theoretical_budget"],
                  "seconds": time.perf_counter() - start}
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"{name}@{budget:g} ctx {context}: ppl {record['ppl']:.3f}, measured {record['measured_budget']:.3f}, "
              f"{record['seconds']:.0f} s", flush=True)


def table(out: Path) -> str:
    import pandas as pd

    rows = pd.DataFrame([json.loads(p.read_text()) for p in sorted(out.glob("*.json"))])
    if rows.empty:
        return f"no results under {out}"
    full = rows[rows.method == "full"].set_index("context").ppl
    rows = rows[rows.method != "full"].assign(ratio=lambda d: d.ppl / d.context.map(full))
    rows["cell"] = [f"{r.ratio:.3f} ({r.measured_budget:.2f})" for r in rows.itertuples()]
    wide = rows.pivot_table(index=["budget", "method"], columns="context", values="cell", aggfunc="first")
    wide = wide.sort_index(level=["budget", "method"], ascending=[False, True])
    contexts = list(wide.columns)
    lines = ["| budget | method | " + " | ".join(f"{c} tokens" for c in contexts) + " |",
             "|---|---|" + "---|" * len(contexts),
             "| 1 | full (ppl) | " + " | ".join(f"{full[c]:.2f}" for c in contexts) + " |"]
    for (budget, method), cells in wide.iterrows():
        lines.append(f"| {budget:g} | {method} | " + " | ".join(str(cells[c]) for c in contexts) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.9, 0.5, 0.1])
    parser.add_argument("--chunks", type=int, default=3, help="chunks of wiki eval text per configuration")
    parser.add_argument("--continuation", type=int, default=256, help="tokens scored after each compressed context")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of the results under --out and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    bad_budgets = [b for b in args.budgets if not 0 < b <= 1]
    if bad_budgets or args.chunks < 1 or args.continuation < 1 or min(args.contexts) < 2:
        parser.error(f"budgets must be in (0, 1], chunks and continuation >= 1, contexts >= 2; got budgets "
                     f"{args.budgets}, chunks {args.chunks}, continuation {args.continuation}, contexts {args.contexts}")
    run(args.methods, args.contexts, args.budgets, args.out, args.chunks, args.continuation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
