"""Issue 22's table, re-measurable for any method variant, with intervals.

Two measurements per configuration (SmolLM2, 1 thread is enough):

* ``ppl``: protocol "context" on wiki eval text: each of ``--docs`` chunks is 1,024 context tokens + 256 scored
  tokens; the context is prefilled and compressed to the budget, then the 256 are fed and scored. Reported: the
  perplexity over the full cache's on the same chunks ("+x %"), with a 95 % bootstrap interval over documents
  (paired: each resample takes the same documents for the method and for the full cache).
* ``needle``: ``--n`` needle items of ``--needle-len`` tokens at depths (i + 0.5) / n, greedy answer, normalised
  substring match; ``query_agnostic`` (compress the document, then ask: the issue's "question after compression")
  and ``query_aware`` (the question is in the compressed prefill). Reported: hits / n with a Wilson 95 % interval.

A configuration is ``name`` or ``name:opt=value,opt=value`` (values parsed as JSON where they parse: ints, floats,
true/false, null), e.g. ``kvcompress:kernel=7,scope=layer``. Budgets: ``--ppl-budgets`` (fractions kept) and
``--needle-rates`` (compression rates: budget = 1 / rate). Each (configuration, measurement, budget) is one JSON under
``--out``, skipped when it exists (the run resumes); ``--table`` prints the markdown table of what is there.

    OMP_NUM_THREADS=1 python benchmarks/issue22_table.py --configs full h2o streaming snapkv kvcompress
    python benchmarks/issue22_table.py --configs kvcompress:floor=64 --only needle --settings query_aware
    python benchmarks/issue22_table.py --table
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

OUT = Path("data/results/issue22")
SETTINGS = ("query_agnostic", "query_aware")


def parse_config(text: str) -> tuple[str, dict]:
    """``"name:a=1,b=x"`` -> ("name", {"a": 1, "b": "x"})."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"option {item!r} of {text!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def slug(text: str) -> str:
    return text.replace(":", "_").replace(",", "_").replace("=", "-").replace("/", "-")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion hits / n."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ratio(nll, full_nll, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of exp(mean nll - mean full nll) resampling documents (paired); inputs: per-document sums."""
    import torch

    nll, full_nll = torch.as_tensor(nll, dtype=torch.float64), torch.as_tensor(full_nll, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(nll), (reps, len(nll)), generator=gen)
    ratio = (nll[idx].mean(1) - full_nll[idx].mean(1)).exp()
    return float(ratio.quantile(0.025)), float(ratio.quantile(0.975))


def run_ppl(model, tok, name, options, budget, docs, context, continuation):
    import kvlab
    from kvlab.eval.forward import Meter
    from kvlab.eval.perplexity import chunk_nll
    from kvlab import data

    method = kvlab.methods.get(name, None if name == "full" else budget, **options).prepare(model, tok)
    chunks = data.text_chunks("wiki", tok, chunk_len=context + continuation, n_chunks=docs, split="eval")
    meter = Meter()
    nll = chunk_nll(model, method, chunks, batch_size=1, protocol="context",
                    context_frac=context / (context + continuation), progress=False, meter=meter)
    per_doc = nll.nan_to_num(0.0).sum(1) / (~nll.isnan()).sum(1)  # (docs,) mean NLL of the scored tokens
    return {"doc_nll": per_doc.tolist(), "ppl": math.exp(float(per_doc.mean())), "options": method.options(),
            "tokens": int((~nll.isnan()).sum()), **meter.as_dict()}


def run_needle(model, tok, name, options, budget, n, length, setting):
    import kvlab
    from kvlab.eval.longcontext import long_context

    method = kvlab.methods.get(name, None if name == "full" else budget, **options).prepare(model, tok)
    result = long_context(model, tok, method, "needle", length, n, setting=setting, batch_size=1, progress=False)
    hits = int(sum(r["score"] for r in result["records"]))
    return {"hits": hits, "n": result["n"], "options": method.options(), "kv_bytes": result.get("kv_bytes"),
            "records": [{k: r[k] for k in ("depth", "answers", "prediction", "score")} for r in result["records"]]}


def run(args) -> None:
    import kvlab

    model, tok = kvlab.load_model("smollm2")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for config in args.configs:
        name, options = parse_config(config)
        if "ppl" in args.only:
            for b in ([1.0] if name == "full" else args.ppl_budgets):
                jobs.append((config, name, options, "ppl", b, None))
        if "needle" in args.only:
            for rate in ([1] if name == "full" else args.needle_rates):
                for s in args.settings:
                    jobs.append((config, name, options, "needle", 1.0 / rate, s))
    for config, name, options, what, budget, setting in jobs:
        tag = f"{slug(config)}@{budget:g}-{what}" + (f"-{setting}" if setting else "")
        tag += f"-ctx{args.context}-docs{args.docs}" if what == "ppl" else f"-len{args.needle_len}-n{args.n}"
        path = args.out / f"{tag}.json"
        if path.exists():
            print(f"skip {path} (exists)", flush=True)
            continue
        start = time.perf_counter()
        if what == "ppl":
            result = run_ppl(model, tok, name, options, budget, args.docs, args.context, args.continuation)
            extra = {"context": args.context, "continuation": args.continuation, "docs": args.docs}
        else:
            result = run_needle(model, tok, name, options, budget, args.n, args.needle_len, setting)
            extra = {"setting": setting, "needle_len": args.needle_len}
        record = {"config": config, "method": name, "what": what, "budget": budget, **extra, **result,
                  "seconds": time.perf_counter() - start}
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        summary = (f"ppl {record['ppl']:.3f}" if what == "ppl" else f"{record['hits']}/{record['n']}")
        print(f"{tag}: {summary}, {record['seconds']:.0f} s", flush=True)


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    full_ppl = {(r["context"], r["docs"]): r for r in rows if r["what"] == "ppl" and r["method"] == "full"}
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["what"] == "ppl":
            ref = full_ppl.get((r["context"], r["docs"]))
            if ref is None:
                continue
            if r["method"] == "full":
                cell, col = f"ppl {r['ppl']:.2f} (n = {r['docs']} docs)", "ppl 50 %"
            else:
                lo, hi = bootstrap_ratio(r["doc_nll"], ref["doc_nll"])
                ratio = math.exp(sum(r["doc_nll"]) / len(r["doc_nll"]) - sum(ref["doc_nll"]) / len(ref["doc_nll"]))
                bud = (r.get("kv_bytes") or {}).get("budget")
                cell = f"{100 * (ratio - 1):+.1f} % [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]"
                cell += f" ({bud:.2f})" if bud is not None else ""
                col = f"ppl {100 * r['budget']:g} %"
        else:
            lo, hi = wilson(r["hits"], r["n"])
            rate = round(1 / r["budget"])
            cell = f"{r['hits']}/{r['n']} [{lo:.2f}, {hi:.2f}]"
            col = f"needle {'agnostic' if r['setting'] == 'query_agnostic' else 'aware'} {rate}x"
            if r["method"] == "full":
                for k in (2, 8):
                    cells.setdefault(r["config"], {})[
                        f"needle {'agnostic' if r['setting'] == 'query_agnostic' else 'aware'} {k}x"] = cell
                continue
        cells.setdefault(r["config"], {})[col] = cell
    cols = ["ppl 50 %", "ppl 25 %", "needle agnostic 2x", "needle agnostic 8x", "needle aware 2x", "needle aware 8x"]
    lines = ["| configuration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for config in sorted(cells, key=lambda c: (c != "full", c)):
        lines.append(f"| {config} | " + " | ".join(cells[config].get(c, "–") for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["full", "h2o", "streaming", "snapkv", "kvcompress"])
    parser.add_argument("--only", nargs="+", default=["ppl", "needle"], choices=["ppl", "needle"])
    parser.add_argument("--ppl-budgets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--needle-rates", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--docs", type=int, default=24, help="wiki eval chunks for perplexity")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--n", type=int, default=20, help="needle items")
    parser.add_argument("--needle-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of the results under --out and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    if any(not 0 < b <= 1 for b in args.ppl_budgets) or any(r < 1 for r in args.needle_rates) or args.docs < 1 \
            or args.n < 1:
        parser.error("ppl budgets must be in (0, 1], rates >= 1, docs and n >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
